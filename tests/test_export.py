"""export_sae: the files SAELens and sparsify load, checked here against their formats (the key sets
below are those of SAELens 6.54.12's inference classes, saes/*.py ``initialize_weights``, and of what
its ``save_model`` / ``save_inference_model`` write; sparsify 1.3.3's ``SparseCoder`` state dict and
``SparseCoderConfig``). tests/peers loads the same exports in the real libraries (make test-peers)."""

import json

import numpy as np
import pytest
import torch
from safetensors import safe_open

import paperlib.interop as io
from paperlib.atomic import temporaries
from paperlib.interop import export_sae, export_single, load_sae, read_decoder
from paperlib.sae.architectures import ARCHITECTURES
from paperlib.sae.bank import SAEBank, SAEConfig

D, N, K = 8, 24, 3

STANDARD = {"W_enc": (D, N), "b_enc": (N,), "W_dec": (N, D), "b_dec": (D,)}
JUMPRELU = {**STANDARD, "threshold": (N,)}
GATED = {"W_enc": (D, N), "W_dec": (N, D), "b_dec": (D,), "b_gate": (N,), "b_mag": (N,), "r_mag": (N,)}
# paperlib architecture -> (SAELens cfg.json architecture, state dict of that inference class)
SAELENS = {
    "relu": ("standard", STANDARD),
    "relu_dnorm": ("standard", STANDARD),
    "panneal": ("standard", STANDARD),
    "topk": ("topk", STANDARD),
    "jumprelu": ("jumprelu", JUMPRELU),
    "batchtopk": ("jumprelu", JUMPRELU),
    "matryoshka": ("jumprelu", JUMPRELU),
    "gated": ("gated", GATED),
}
SAELENS_CFG = {
    "d_in",
    "d_sae",
    "dtype",
    "device",
    "apply_b_dec_to_input",
    "normalize_activations",
    "reshape_activations",
    "metadata",
    "architecture",
}
SPARSIFY = {"encoder.weight": (N, D), "encoder.bias": (N,), "W_dec": (N, D), "b_dec": (D,)}
SPARSIFY_CFG = {
    "activation",
    "expansion_factor",
    "normalize_decoder",
    "num_latents",
    "k",
    "multi_topk",
    "skip_connection",
    "transcode",
    "d_in",
}


def _bank(architecture: str, n_seeds: int = 2, dtype=torch.float32) -> SAEBank:
    k = K if ARCHITECTURES[architecture].needs_k else None
    bank = SAEBank(SAEConfig(architecture, D, N, k=k, n_seeds=n_seeds, seed=5)).to(dtype)
    gen = torch.Generator().manual_seed(1)
    with torch.no_grad():  # every parameter distinct, so a tensor under the wrong name would show
        for p in bank.parameters():
            p.copy_(torch.randn(p.shape, generator=gen, dtype=dtype))
        bank.threshold.copy_(torch.rand(n_seeds, generator=gen, dtype=dtype))  # BatchTopK's, as after training
    return bank


def _tensors(path) -> dict[str, torch.Tensor]:
    with safe_open(str(path), framework="pt") as fh:
        return {name: fh.get_tensor(name) for name in fh.keys()}


def test_every_architecture_has_a_saelens_export():
    assert set(SAELENS) == set(ARCHITECTURES)


@pytest.mark.parametrize("architecture", sorted(SAELENS))
def test_saelens_export_has_exactly_the_inference_class_tensors_and_config(tmp_path, architecture):
    bank = _bank(architecture)
    paths = export_sae(bank, tmp_path, metadata={"hook_name": "blocks.3.hook_resid_post"})
    assert paths == [tmp_path / "seed_0", tmp_path / "seed_1"]
    expected_arch, expected_tensors = SAELENS[architecture]
    for i, path in enumerate(paths):
        assert sorted(p.name for p in path.iterdir()) == ["cfg.json", "sae_weights.safetensors"]
        tensors = _tensors(path / "sae_weights.safetensors")
        assert {name: tuple(t.shape) for name, t in tensors.items()} == expected_tensors
        assert all(t.dtype == torch.float32 for t in tensors.values())
        for name in ("W_enc", "W_dec", "b_dec"):
            assert torch.equal(tensors[name], getattr(bank, name)[i].detach()), name
        b_enc = tensors["b_gate"] if architecture == "gated" else tensors["b_enc"]
        assert torch.equal(b_enc, bank.b_enc[i].detach())
        if architecture == "jumprelu":
            assert torch.equal(tensors["threshold"], bank.log_threshold[i].detach().exp())
        if architecture in ("batchtopk", "matryoshka"):
            assert torch.equal(tensors["threshold"], bank.threshold[i].expand(N))
        if architecture == "gated":
            assert torch.equal(tensors["b_mag"], bank.b_mag[i].detach())
            assert torch.equal(tensors["r_mag"], bank.r_mag[i].detach())
        cfg = json.loads((path / "cfg.json").read_text())
        topk_fields = {"k", "rescale_acts_by_decoder_norm"} if architecture == "topk" else set()
        assert set(cfg) == SAELENS_CFG | topk_fields
        assert (cfg["architecture"], cfg["d_in"], cfg["d_sae"], cfg["dtype"]) == (expected_arch, D, N, "float32")
        assert (cfg["apply_b_dec_to_input"], cfg["normalize_activations"], cfg["reshape_activations"]) == (
            True,
            "none",
            "none",
        )
        if topk_fields:
            assert (cfg["k"], cfg["rescale_acts_by_decoder_norm"]) == (K, False)
        meta = cfg["metadata"]
        assert meta["sae_lens_version"] == "6.54.12"  # present, >= 6.0: not reinterpreted as a pre-6.0 config
        assert meta["hook_name"] == "blocks.3.hook_resid_post"
        assert meta["training_architecture"] == architecture and meta["training_architecture_details"]["seed"] == 5 + i


def test_sparsify_export_of_topk(tmp_path):
    bank = _bank("topk")
    for i, path in enumerate(export_sae(bank, tmp_path, layout="sparsify")):
        assert sorted(p.name for p in path.iterdir()) == ["cfg.json", "sae.safetensors"]
        tensors = _tensors(path / "sae.safetensors")
        assert {name: tuple(t.shape) for name, t in tensors.items()} == SPARSIFY
        assert torch.equal(tensors["encoder.weight"], bank.W_enc[i].detach().T)
        assert torch.equal(tensors["encoder.bias"], bank.b_enc[i].detach())
        assert torch.equal(tensors["W_dec"], bank.W_dec[i].detach())
        assert torch.equal(tensors["b_dec"], bank.b_dec[i].detach())
        cfg = json.loads((path / "cfg.json").read_text())
        assert set(cfg) == SPARSIFY_CFG
        assert (cfg["activation"], cfg["num_latents"], cfg["k"], cfg["d_in"]) == ("topk", N, K, D)
        assert not (cfg["multi_topk"] or cfg["skip_connection"] or cfg["transcode"])


def test_float64_bank_exports_in_its_dtype(tmp_path):
    bank = _bank("topk", dtype=torch.float64)
    path = export_sae(bank, tmp_path / "sl")[1]
    assert json.loads((path / "cfg.json").read_text())["dtype"] == "float64"
    assert torch.equal(_tensors(path / "sae_weights.safetensors")["W_dec"], bank.W_dec[1].detach())
    path = export_sae(bank, tmp_path / "sp", layout="sparsify")[1]
    assert torch.equal(_tensors(path / "sae.safetensors")["W_dec"], bank.W_dec[1].detach())


def test_save_sae_keeps_a_float64_bank_in_float64(tmp_path):
    bank = _bank("relu", dtype=torch.float64)
    loaded = load_sae(io.save_sae(bank, tmp_path)[1])
    assert loaded.W_dec.dtype == torch.float64 and torch.equal(loaded.W_dec[0], bank.W_dec[1])


def test_exports_are_read_by_read_decoder_but_not_by_load_sae(tmp_path):
    bank = _bank("gated")
    for layout, path in (
        ("saelens", export_sae(bank, tmp_path / "sl")[1]),
        ("sparsify", export_sae(_bank("topk"), tmp_path / "sp", layout="sparsify")[1]),
    ):
        dec = read_decoder(path)
        assert dec.layout == layout and dec.W_dec.shape == (N, D) and dec.W_enc.shape == (D, N)
    assert np.array_equal(read_decoder(tmp_path / "sl" / "seed_1").W_dec, bank.W_dec[1].detach().numpy())
    with pytest.raises(ValueError, match="no 'paperlib' object"):
        load_sae(tmp_path / "sl" / "seed_1")


def test_export_single_writes_into_the_directory_and_refuses_a_bank(tmp_path):
    path = export_single(_bank("relu", n_seeds=1), tmp_path / "one")
    assert path == tmp_path / "one" and (path / "sae_weights.safetensors").stat().st_mode & 0o777 == 0o644
    with pytest.raises(ValueError, match="export_single needs a bank of one seed, got 2; use export_sae"):
        export_single(_bank("relu"), tmp_path / "two")


# ------------------------------------------------------------------------------------------ errors


@pytest.mark.parametrize(
    "layout, message",
    [
        ("paperlib", "unknown export layout 'paperlib'.*save_sae writes paperlib's own layout"),
        ("SAELens", "unknown export layout 'SAELens': choose 'saelens'.*or 'sparsify'"),
    ],
)
def test_unknown_layout(tmp_path, layout, message):
    with pytest.raises(ValueError, match=message):
        export_sae(_bank("relu"), tmp_path, layout=layout)
    assert list(tmp_path.iterdir()) == []


@pytest.mark.parametrize("architecture", sorted(set(ARCHITECTURES) - {"topk"}))
def test_sparsify_refuses_all_but_topk_and_points_to_saelens(tmp_path, architecture):
    with pytest.raises(ValueError, match=f"sparsify has TopK SAEs only.*a {architecture} SAE.*layout='saelens' takes"):
        export_sae(_bank(architecture), tmp_path, layout="sparsify")
    assert list(tmp_path.iterdir()) == []


@pytest.mark.parametrize("architecture", ["batchtopk", "matryoshka"])
def test_untrained_batchtopk_is_refused_and_no_seed_is_written(tmp_path, architecture):
    bank = _bank(architecture)
    bank.threshold[1] = float("nan")  # seed 1 never trained; seed 0 is fine but must not be written alone
    with pytest.raises(ValueError, match=rf"{architecture} SAE \(seed=6\) has no inference threshold yet.*train it"):
        export_sae(bank, tmp_path)
    assert list(tmp_path.iterdir()) == []


def test_bad_metadata(tmp_path):
    with pytest.raises(ValueError, match="sparsify's has no place for it"):
        export_sae(_bank("topk"), tmp_path, layout="sparsify", metadata={"hook_name": "x"})
    with pytest.raises(ValueError, match="metadata must be a mapping.*got list"):
        export_sae(_bank("topk"), tmp_path, metadata=["hook_name"])
    with pytest.raises(ValueError, match="metadata must be JSON-serialisable"):
        export_sae(_bank("topk"), tmp_path, metadata={"model": object()})
    assert list(tmp_path.iterdir()) == []


def test_a_failed_write_leaves_the_previous_export_and_no_temporaries(tmp_path, monkeypatch):
    bank = _bank("jumprelu", n_seeds=1)
    path = export_single(bank, tmp_path / "sae")
    before = {p.name: p.read_bytes() for p in path.iterdir()}

    def crash(tensors, filename, *args, **kwargs):  # a disk that fills up half-way through the weights
        with open(filename, "wb") as fh:
            fh.write(b"\x00" * 100)
        raise OSError("No space left on device")

    monkeypatch.setattr(io, "save_file", crash)
    with torch.no_grad():
        bank.W_dec.add_(1)
    with pytest.raises(OSError, match="No space left"):
        export_single(bank, path)
    assert {p.name: p.read_bytes() for p in path.iterdir()} == before
    with pytest.raises(OSError, match="No space left"):
        export_single(bank, tmp_path / "fresh")
    assert list((tmp_path / "fresh").iterdir()) == []  # no cfg.json claiming weights that are not there
    assert temporaries(tmp_path) == []
