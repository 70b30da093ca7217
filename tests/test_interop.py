"""Saving/loading our SAEs bitwise, and reading decoders written in each foreign library's exact layout.

The foreign files are written here the way each library writes them (tensor names, shapes and
file names checked against their sources: SAELens ``sae_weights.safetensors`` + ``cfg.json``;
EleutherAI sparsify ``SparseCoder.save_to_disk``; saprmarks dictionary_learning ``ae.pt`` state
dicts of its dictionary classes + ``config.json``), never mocked.
"""

import json
import shutil
import re

import numpy as np
import pytest
import torch
from safetensors.torch import save_file
from torch import nn

from paperlib.interop import Decoder, load_bank, load_sae, read_decoder, save_sae, save_single
from paperlib.sae.bank import SAEBank, SAEConfig

D, N = 8, 24


def _bank(architecture: str = "relu", n_seeds: int = 3, dtype=torch.float32) -> SAEBank:
    k = 3 if architecture == "topk" else None
    bank = SAEBank(SAEConfig(architecture, D, N, k=k, l1_coeff=0.25, n_seeds=n_seeds, seed=7, init_scale=0.1))
    bank = bank.to(dtype)
    gen = torch.Generator().manual_seed(1)
    with torch.no_grad():  # every parameter distinct from its initial value, so the test sees them all
        for p in bank.parameters():
            p.copy_(torch.randn(p.shape, generator=gen, dtype=dtype))
    return bank


@pytest.mark.parametrize("architecture", ["relu", "topk"])
def test_save_load_round_trip_is_bitwise(tmp_path, architecture):
    bank = _bank(architecture)
    paths = save_sae(bank, tmp_path / "bank")
    assert paths == [tmp_path / "bank" / f"seed_{i}" for i in range(3)]
    for i, path in enumerate(paths):
        assert sorted(p.name for p in path.iterdir()) == ["cfg.json", "sae_weights.safetensors"]  # no temp files
        loaded = load_sae(path)
        assert loaded.cfg == bank.seed(i).cfg and loaded.cfg.seed == 7 + i and loaded.cfg.n_seeds == 1
        for name in ("W_enc", "b_enc", "W_dec", "b_dec"):
            assert torch.equal(getattr(loaded, name)[0], getattr(bank, name)[i]), name
        x = torch.randn(5, D)
        assert torch.equal(loaded(x)[0], bank.seed(i)(x)[0])


@pytest.mark.parametrize("architecture", ["relu", "topk", "gated"])
def test_load_bank_rebuilds_what_save_sae_wrote_bitwise(tmp_path, architecture):
    bank = _bank(architecture)
    bank.tokens_since_fired.fill_(5.0)  # buffers travel too (NaN would not compare equal: set them)
    bank.threshold.copy_(torch.tensor([0.1, 0.2, 0.3]))
    loaded = load_bank(save_sae(bank, tmp_path / "bank")[0].parent)
    assert loaded.cfg == bank.cfg
    for (name, want), (other, got) in zip(bank.state_dict().items(), loaded.state_dict().items()):
        assert name == other and torch.equal(got, want), name


def test_load_bank_keeps_float64(tmp_path):
    bank = _bank(dtype=torch.float64)
    assert torch.equal(load_bank(save_sae(bank, tmp_path)[0].parent).W_dec, bank.W_dec)


def test_load_bank_refuses_a_missing_seed_and_foreign_seeds(tmp_path):
    with pytest.raises(FileNotFoundError, match="no seed_<i> directories.*load_sae reads one seed"):
        load_bank(tmp_path)
    save_sae(_bank("topk"), tmp_path / "gap")
    shutil.rmtree(tmp_path / "gap" / "seed_1")
    with pytest.raises(ValueError, match=r"seed directories \[0, 2\] are not 0..1; a seed is missing"):
        load_bank(tmp_path / "gap")
    save_sae(_bank("topk"), tmp_path / "mixed")
    save_single(_bank("relu", n_seeds=1), tmp_path / "mixed" / "seed_2")
    with pytest.raises(ValueError, match="seed_2: its config is not seed_0's.*do not hold one bank"):
        load_bank(tmp_path / "mixed")
    with pytest.raises(FileNotFoundError, match="load_bank reads a whole save_sae directory"):
        load_sae(tmp_path / "mixed")


def test_saved_config_is_saelens_style(tmp_path):
    save_sae(_bank("topk", n_seeds=1), tmp_path)
    cfg = json.loads((tmp_path / "seed_0" / "cfg.json").read_text())
    assert (cfg["d_in"], cfg["d_sae"], cfg["architecture"], cfg["k"]) == (D, N, "topk", 3)
    assert cfg["paperlib"]["architecture"] == "topk" and cfg["paperlib"]["l1_coeff"] == 0.25
    save_single(_bank("relu", n_seeds=1), tmp_path / "single")
    assert json.loads((tmp_path / "single" / "cfg.json").read_text())["architecture"] == "standard"
    assert (tmp_path / "single" / "sae_weights.safetensors").stat().st_mode & 0o777 == 0o644


def test_float64_bank_round_trips_in_its_dtype(tmp_path):
    bank = _bank(n_seeds=1, dtype=torch.float64)
    loaded = load_sae(save_single(bank, tmp_path))
    assert loaded.W_dec.dtype == torch.float64 and torch.equal(loaded.W_dec, bank.W_dec)


def test_read_decoder_of_our_format(tmp_path):
    bank = _bank()
    paths = save_sae(bank, tmp_path)
    dec = read_decoder(paths[2])
    assert isinstance(dec, Decoder) and dec.layout == "paperlib" and dec.path == paths[2] / "sae_weights.safetensors"
    assert dec.W_dec.dtype == np.float32 and np.array_equal(dec.W_dec, bank.W_dec[2].detach().numpy())
    assert np.array_equal(dec.W_enc, bank.W_enc[2].detach().numpy())
    assert (dec.n_latents, dec.d_model) == (N, D)


def test_save_single_refuses_a_bank(tmp_path):
    with pytest.raises(ValueError, match="bank of one seed, got 3"):
        save_single(_bank(), tmp_path)


# ------------------------------------------------------------------------------------ foreign layouts


def _rand(*shape, seed=0, dtype=torch.float32):
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed)).to(dtype)


def write_saelens(path, W_dec, dtype=torch.float32):
    """SAELens: cfg.json + sae_weights.safetensors with W_enc [d_in, d_sae], W_dec [d_sae, d_in]."""
    n, d = W_dec.shape
    path.mkdir(parents=True)
    tensors = {"W_enc": W_dec.T.contiguous(), "b_enc": torch.zeros(n), "W_dec": W_dec, "b_dec": torch.zeros(d)}
    save_file({k: v.to(dtype) for k, v in tensors.items()}, path / "sae_weights.safetensors")
    cfg = {
        "architecture": "standard",
        "d_in": d,
        "d_sae": n,
        "dtype": "float32",
        "apply_b_dec_to_input": True,
        "hook_name": "blocks.0.hook_resid_post",
        "normalize_activations": "none",
    }
    (path / "cfg.json").write_text(json.dumps(cfg))
    return path


def write_sparsify(path, W_dec):
    """sparsify SparseCoder.save_to_disk: sae.safetensors of its state dict + cfg.json with d_in."""
    n, d = W_dec.shape
    path.mkdir(parents=True)
    state = {"encoder.weight": W_dec.clone(), "encoder.bias": torch.zeros(n), "W_dec": W_dec, "b_dec": torch.zeros(d)}
    save_file(state, path / "sae.safetensors")
    cfg = {
        "activation": "topk",
        "expansion_factor": 32,
        "normalize_decoder": True,
        "num_latents": n,
        "k": 4,
        "multi_topk": False,
        "skip_connection": False,
        "transcode": False,
        "d_in": d,
    }
    (path / "cfg.json").write_text(json.dumps(cfg))
    return path


class _LinearSAE(nn.Module):
    """The module structure of dictionary_learning's AutoEncoderTopK / BatchTopKSAE (nn.Linear decoder)."""

    def __init__(self, d: int, n: int, W_dec: torch.Tensor) -> None:
        super().__init__()
        self.register_buffer("k", torch.tensor(4, dtype=torch.int))
        self.register_buffer("threshold", torch.tensor(-1.0))
        self.decoder = nn.Linear(n, d, bias=False)
        self.encoder = nn.Linear(d, n)
        self.b_dec = nn.Parameter(torch.zeros(d))
        with torch.no_grad():
            self.decoder.weight.copy_(W_dec.T)
            self.encoder.weight.copy_(W_dec)


def write_dictionary_learning(path, state: dict, dict_class: str, d: int, n: int, config: bool = True):
    path.mkdir(parents=True)
    torch.save(state, path / "ae.pt")
    if config:
        trainer = {
            "trainer_class": "TopKTrainer",
            "dict_class": dict_class,
            "activation_dim": d,
            "dict_size": n,
            "k": 4,
            "lr": 1e-3,
            "layer": 3,
            "lm_name": "EleutherAI/pythia-70m-deduped",
        }
        (path / "config.json").write_text(json.dumps({"trainer": trainer, "buffer": {"d_submodule": d}}))
    return path / "ae.pt"


def test_reads_saelens_directory_and_file(tmp_path):
    W = _rand(N, D)
    path = write_saelens(tmp_path / "sl", W)
    for target in (path, path / "sae_weights.safetensors", path / "cfg.json"):
        dec = read_decoder(target)
        assert dec.layout == "saelens" and np.array_equal(dec.W_dec, W.numpy())
        assert np.array_equal(dec.W_enc, W.T.numpy())


def test_reads_saelens_in_bfloat16_as_float32(tmp_path):
    W = _rand(N, D)
    dec = read_decoder(write_saelens(tmp_path / "bf", W, dtype=torch.bfloat16))
    assert dec.W_dec.dtype == np.float32 and np.array_equal(dec.W_dec, W.to(torch.bfloat16).float().numpy())


def test_reads_sparsify(tmp_path):
    W = _rand(N, D, seed=1)
    path = write_sparsify(tmp_path / "layers.3", W)
    for target in (path, path / "sae.safetensors"):
        dec = read_decoder(target)
        assert dec.layout == "sparsify" and np.array_equal(dec.W_dec, W.numpy())
        assert dec.W_enc.shape == (D, N)


def test_multi_hookpoint_sparsify_checkpoint_points_to_its_layers(tmp_path):
    for layer in ("layers.0", "layers.1"):
        write_sparsify(tmp_path / "ckpt" / layer, _rand(N, D))
    with pytest.raises(ValueError, match=r"2 SAE directories one level down \(layers.0, layers.1\)"):
        read_decoder(tmp_path / "ckpt")


@pytest.mark.parametrize("dict_class", ["AutoEncoderTopK", "BatchTopKSAE"])
def test_reads_dictionary_learning_topk_module(tmp_path, dict_class):
    W = _rand(N, D, seed=2)
    ae = write_dictionary_learning(tmp_path / "dl", _LinearSAE(D, N, W).state_dict(), dict_class, D, N)
    for target in (ae, ae.parent):
        dec = read_decoder(target)
        assert dec.layout == "dictionary_learning" and np.array_equal(dec.W_dec, W.numpy())
        assert np.array_equal(dec.W_enc, W.T.numpy())


def test_reads_dictionary_learning_autoencoder_and_gated(tmp_path):
    W = _rand(N, D, seed=3)
    standard = {
        "bias": torch.zeros(D),
        "encoder.weight": W.clone(),
        "encoder.bias": torch.zeros(N),
        "decoder.weight": W.T.contiguous(),
    }
    gated = {
        "decoder_bias": torch.zeros(D),
        "encoder.weight": W.clone(),
        "r_mag": torch.zeros(N),
        "gate_bias": torch.zeros(N),
        "mag_bias": torch.zeros(N),
        "decoder.weight": W.T.contiguous(),
    }
    for name, state in (("standard", standard), ("gated", gated)):
        ae = write_dictionary_learning(tmp_path / name, state, "AutoEncoder", D, N, config=False)
        assert np.array_equal(read_decoder(ae).W_dec, W.numpy())


def test_reads_dictionary_learning_jumprelu_parameters(tmp_path):
    W = _rand(N, D, seed=4)
    state = {
        "W_enc": W.T.contiguous(),
        "b_enc": torch.zeros(N),
        "W_dec": W,
        "b_dec": torch.zeros(D),
        "threshold": torch.full((N,), 1e-3),
    }
    dec = read_decoder(write_dictionary_learning(tmp_path / "jr", state, "JumpReluAutoEncoder", D, N))
    assert np.array_equal(dec.W_dec, W.numpy()) and np.array_equal(dec.W_enc, W.T.numpy())


def test_square_dictionary_follows_each_class_convention(tmp_path):
    """d == n: shapes cannot tell the orientation, the parameter's name (nn.Linear vs W_dec) does."""
    W = _rand(D, D, seed=5)  # not symmetric, so a wrong transpose would show
    linear = write_dictionary_learning(tmp_path / "lin", _LinearSAE(D, D, W).state_dict(), "AutoEncoderTopK", D, D)
    param = write_dictionary_learning(
        tmp_path / "par", {"W_dec": W, "W_enc": W.T.contiguous()}, "JumpReluAutoEncoder", D, D
    )
    assert np.array_equal(read_decoder(linear).W_dec, W.numpy())
    assert np.array_equal(read_decoder(param).W_dec, W.numpy())


def test_transposed_fork_is_recognised_from_config_sizes(tmp_path):
    W = _rand(N, D, seed=6)  # a fork storing decoder.weight as [n, d]; config.json says n=24, d=8
    ae = write_dictionary_learning(tmp_path / "fork", {"decoder.weight": W}, "AutoEncoderTopK", D, N)
    assert np.array_equal(read_decoder(ae).W_dec, W.numpy())
    bad = write_dictionary_learning(tmp_path / "bad", {"decoder.weight": _rand(5, 7)}, "AutoEncoderTopK", D, N)
    with pytest.raises(ValueError, match=r"shape \(5, 7\), which fits neither dict_size=24"):
        read_decoder(bad)


def test_reads_dictionary_learning_training_checkpoint(tmp_path):
    W = _rand(N, D, seed=7)
    state = {"ae_state_dict": _LinearSAE(D, N, W).state_dict(), "step": 100, "is_final": True}
    assert np.array_equal(
        read_decoder(write_dictionary_learning(tmp_path / "ck", state, "BatchTopKSAE", D, N)).W_dec, W.numpy()
    )


# ------------------------------------------------------------------------------------------ errors


def _path(p) -> str:
    return re.escape(str(p))


def test_missing_path(tmp_path):
    with pytest.raises(FileNotFoundError, match=_path(tmp_path / "nope") + ": no such file"):
        read_decoder(tmp_path / "nope")
    with pytest.raises(FileNotFoundError, match="no such file"):
        load_sae(tmp_path / "nope")


def test_unknown_layout_lists_accepted_ones(tmp_path):
    (tmp_path / "empty").mkdir()
    with pytest.raises(
        ValueError, match=_path(tmp_path / "empty") + ": unknown SAE layout; accepted layouts: .*sparsify"
    ):
        read_decoder(tmp_path / "empty")
    (tmp_path / "notes.txt").write_text("hi")
    with pytest.raises(ValueError, match="unknown file type.*dictionary_learning"):
        read_decoder(tmp_path / "notes.txt")
    save_file({"W_dec": _rand(N, D)}, tmp_path / "lonely.safetensors")
    with pytest.raises(ValueError, match="without a sibling cfg.json"):
        read_decoder(tmp_path / "lonely.safetensors")


def test_missing_weights_file(tmp_path):
    path = tmp_path / "cfg_only"
    path.mkdir()
    (path / "cfg.json").write_text("{}")
    with pytest.raises(FileNotFoundError, match=_path(path) + ".*no weights file: expected sae_weights.safetensors"):
        read_decoder(path)
    (tmp_path / "dl").mkdir()
    (tmp_path / "dl" / "config.json").write_text("{}")
    with pytest.raises(FileNotFoundError, match="no ae.pt"):
        read_decoder(tmp_path / "dl")
    with pytest.raises(FileNotFoundError, match="sae_weights.safetensors: weights file is missing"):
        load_sae(_config_without_weights(tmp_path))


def _config_without_weights(tmp_path):
    path = tmp_path / "ours"
    save_single(_bank(n_seeds=1), path)
    (path / "sae_weights.safetensors").unlink()
    return path


def test_corrupt_weights(tmp_path):
    path = write_saelens(tmp_path / "sl", _rand(N, D))
    (path / "sae_weights.safetensors").write_bytes(b"\x00garbage, not a safetensors header")
    with pytest.raises(
        ValueError, match=_path(path / "sae_weights.safetensors") + ": corrupt or unreadable safetensors"
    ):
        read_decoder(path)
    ae = write_dictionary_learning(tmp_path / "dl", {"decoder.weight": _rand(D, N)}, "AutoEncoder", D, N)
    ae.write_bytes(ae.read_bytes()[:40])
    with pytest.raises(ValueError, match=_path(ae) + ": corrupt or unreadable torch file"):
        read_decoder(ae)
    (path / "cfg.json").write_text("{not json")
    (path / "sae_weights.safetensors").unlink()
    save_file({"W_dec": _rand(N, D)}, path / "sae_weights.safetensors")
    with pytest.raises(ValueError, match="cfg.json: cannot read JSON config"):
        read_decoder(path)


def test_nan_and_inf_in_decoder_count_latents(tmp_path):
    W = _rand(N, D)
    W[3, 1] = float("nan")
    W[5] = float("nan")
    W[7, 0] = float("inf")
    with pytest.raises(ValueError, match=r"decoder has NaN/Inf in 3 of 24 latents"):
        read_decoder(write_saelens(tmp_path / "sl", W))


def test_wrong_rank_and_missing_tensor(tmp_path):
    path = write_saelens(tmp_path / "sl", _rand(N, D))
    save_file({"W_dec": _rand(2, N, D)}, path / "sae_weights.safetensors")
    with pytest.raises(ValueError, match=r"W_dec must be a 2-D matrix, got rank 3 with shape \(2, 24, 8\)"):
        read_decoder(path)
    save_file({"W_enc": _rand(D, N)}, path / "sae_weights.safetensors")
    with pytest.raises(ValueError, match=r"no tensor W_dec \(found W_enc\)"):
        read_decoder(path)
    ae = write_dictionary_learning(tmp_path / "dl", {"decoder.weight": _rand(D)}, "AutoEncoder", D, N)
    with pytest.raises(ValueError, match="decoder.weight must be a 2-D matrix, got rank 1"):
        read_decoder(ae)
    ae = write_dictionary_learning(tmp_path / "dl2", {"encoder.weight": _rand(N, D)}, "AutoEncoder", D, N)
    with pytest.raises(ValueError, match="not a dictionary_learning SAE: neither 'decoder.weight'"):
        read_decoder(ae)


def test_config_disagreeing_with_weights(tmp_path):
    path = write_saelens(tmp_path / "sl", _rand(N, D))
    (path / "cfg.json").write_text(json.dumps({"d_in": D, "d_sae": 2 * N}))
    with pytest.raises(ValueError, match=r"W_dec has shape \(24, 8\) but cfg.json says d_sae=48"):
        read_decoder(path)


def test_load_sae_refuses_foreign_and_bank_directories(tmp_path):
    path = write_saelens(tmp_path / "sl", _rand(N, D))
    with pytest.raises(ValueError, match="no 'paperlib' object.*use read_decoder"):
        load_sae(path)
    save_sae(_bank(), tmp_path / "bank")
    with pytest.raises(FileNotFoundError, match=r"no cfg.json.*3 SAE directories one level down \(seed_0"):
        load_sae(tmp_path / "bank")
