"""bf16 matmuls in training: close to fp32 on every gradient path, really bf16, and never in evaluation."""

import warnings

import numpy as np
import pytest
import torch

from paperlib.metrics.consistency import chance_mcc, gt_mcc
from paperlib import runtime
from paperlib.runtime import matmul_precision, resolve_precision
from paperlib.sae.bank import SAEBank, SAEConfig
from paperlib.sae.train import TrainConfig, evaluate, train
from paperlib.sources.organism import UniformOrganism, sample_uniform

ORGANISM = UniformOrganism(d=32, n_gt=48, s=3, n_samples=1024, seed=0)


def relative_error(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a.float() - b.float()).norm() / b.float().norm())


def test_auto_means_bf16_on_cuda_and_fp32_on_cpu():
    assert resolve_precision("auto", "cpu") == "fp32"
    assert resolve_precision("auto", "cuda") == "bf16"
    assert resolve_precision("bf16", "cpu") == "bf16"


@pytest.mark.parametrize("native", [True, False])
def test_native_means_bf16_only_where_the_hardware_multiplies_it(monkeypatch, native):
    """Both outcomes whatever CPU runs the test: on one without AVX512-BF16/AMX, bf16 is emulated (54x slower than
    fp32 on an AVX2 AMD EPYC), so the notebooks' "native" must fall back to fp32 there."""
    monkeypatch.setattr(runtime, "cpu_has_native_bf16", lambda: native)
    assert resolve_precision("native", "cpu") == ("bf16" if native else "fp32")
    assert resolve_precision("native", "cuda") == "bf16"
    assert resolve_precision("auto", "cpu") == "fp32"  # the library's default keeps CPU runs in fp32


@pytest.mark.parametrize("bad", ["fp16", "float32", ""])
def test_unknown_precision_is_refused_with_the_choices(bad):
    with pytest.raises(ValueError, match=r"precision must be one of \('auto', 'native', 'fp32', 'bf16'\)"):
        resolve_precision(bad, "cpu")
    with pytest.raises(ValueError, match=r"TrainConfig.precision must be one of"):
        TrainConfig(steps=1, precision=bad)


def closed_form_grads(bank: SAEBank, x: torch.Tensor, precision: str, sparse: bool | None = None) -> dict:
    with matmul_precision(precision, "cpu"):
        grads, _ = bank.loss_and_grads(x, x.shape[0], chunk_size=256, sparse=sparse)
    return grads


def autograd_grads(bank: SAEBank, x: torch.Tensor, precision: str) -> dict:
    bank.zero_grad(set_to_none=True)
    with matmul_precision(precision, "cpu"):
        total, _, _ = bank.loss(x)
    total.backward()
    return {name: p.grad.clone() for name, p in bank.named_parameters()}


# Tolerances: bf16 keeps 8 significant bits, so ReLU-like gradients land within ~0.5% of fp32. TopK
# also re-selects its latents from rounded pre-activations: near-ties flip (1-2% of samples here),
# which moves its gradients by up to ~10%. A wrong term or transpose would be off by O(1).
SMOOTH, SELECTING = 0.02, 0.15
PATHS = {
    "relu, closed form": (dict(architecture="relu", l1_coeff=1e-3), SMOOTH, lambda b, x, p: closed_form_grads(b, x, p)),
    "gated, autograd": (dict(architecture="gated", l1_coeff=1e-3), SMOOTH, autograd_grads),
    "topk, closed form (dense)": (
        dict(architecture="topk", k=3),
        SELECTING,
        lambda b, x, p: closed_form_grads(b, x, p, False),
    ),
    "topk, closed form (sparse)": (
        dict(architecture="topk", k=3),
        SELECTING,
        lambda b, x, p: closed_form_grads(b, x, p, True),
    ),
    "topk + AuxK, autograd": (dict(architecture="topk", k=3, aux_coeff=1 / 32), SELECTING, autograd_grads),
}


@pytest.mark.parametrize("path", PATHS)
def test_bf16_gradients_are_close_to_fp32_but_not_equal(path):
    fields, tolerance, grads_of = PATHS[path]
    bank = SAEBank(SAEConfig(d_model=32, n_latents=64, n_seeds=2, seed=0, **fields))
    x = sample_uniform(ORGANISM).x
    exact, low = grads_of(bank, x, "fp32"), grads_of(bank, x, "bf16")
    for name, reference in exact.items():
        error = relative_error(low[name], reference)
        # identical to fp32 would mean the matmuls never ran in bf16
        assert 0 < error < tolerance, f"{path}: {name} relative error {error:.2e}"


def test_compiled_bf16_step_matches_eager_bf16(monkeypatch):
    bank = SAEBank(SAEConfig("relu", d_model=32, n_latents=64, n_seeds=2, seed=0, l1_coeff=1e-3))
    x = sample_uniform(ORGANISM).x
    monkeypatch.setenv("PAPERLIB_COMPILE", "0")
    eager = closed_form_grads(bank, x, "bf16")
    monkeypatch.setenv("PAPERLIB_COMPILE", "1")
    compiled = closed_form_grads(bank, x, "bf16")
    exact = closed_form_grads(bank, x, "fp32")
    for name in eager:
        assert relative_error(compiled[name], exact[name]) > 0, f"compiled {name} ignored the bf16 autocast"
        assert relative_error(compiled[name], eager[name]) < SMOOTH


def test_bf16_training_learns_like_fp32_and_evaluates_in_fp32():
    data = sample_uniform(ORGANISM)
    results = {}
    for precision in ("fp32", "bf16"):
        bank = SAEBank(SAEConfig("topk", d_model=32, n_latents=48, k=3, n_seeds=2, seed=1))
        cfg = TrainConfig(steps=300, lr=3e-3, batch_size=256, log_every=300, precision=precision)
        history = train(bank, data.x, cfg, progress=False)
        assert all(p.dtype == torch.float32 for p in bank.parameters())
        assert history.final("mse").dtype == "float32"
        results[precision] = (bank, history.final("mse"), gt_mcc(data.dictionary, bank.decoder_directions()))
    (fp32_bank, fp32_mse, fp32_gt), (bf16_bank, bf16_mse, bf16_gt) = results.values()
    assert not torch.equal(fp32_bank.W_dec, bf16_bank.W_dec)
    assert abs(bf16_mse - fp32_mse).max() < 0.2 * fp32_mse.max()
    chance = chance_mcc(48, 48, 32, n_samples=50)
    assert min(bf16_gt) > chance.mean + 5 * chance.std
    # the logged metrics are fp32: they equal a plain fp32 evaluation of the final bank
    np.testing.assert_allclose(bf16_mse, evaluate(bf16_bank, data.x)["mse"], rtol=1e-6)


def test_bf16_on_a_cpu_without_native_bf16_warns_once_at_the_start(monkeypatch):
    import paperlib.sae.train

    monkeypatch.setattr(paperlib.sae.train, "cpu_has_native_bf16", lambda: False)
    data = sample_uniform(ORGANISM)
    with pytest.warns(UserWarning, match=r"no native bf16 .* use precision='fp32'") as record:
        train(
            SAEBank(SAEConfig("relu", d_model=32, n_latents=48, n_seeds=1)),
            data.x,
            TrainConfig(steps=2, precision="bf16"),
            progress=False,
        )
    assert [w.filename for w in record if "no native bf16" in str(w.message)] == [__file__]  # names the caller
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        train(
            SAEBank(SAEConfig("relu", d_model=32, n_latents=48, n_seeds=1)),
            data.x,
            TrainConfig(steps=2, precision="fp32"),
            progress=False,
        )
