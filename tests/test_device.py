"""Where SAEs train: ``paperlib.device()`` unless the caller names a device (paperlib.sae.train's rule).

The CPU cases run everywhere; the CUDA cases run where CUDA is present (a GPU machine) and are
skipped otherwise: training there must give what the CPU gives, up to float rounding, for every
architecture, through every entry point."""

import pytest
import torch

from paperlib.runs.trained import trained_bank
from paperlib.sae.bank import SAEBank, SAEConfig
from paperlib.sae.train import TrainConfig, train
from paperlib.store import Store

needs_cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA (a GPU machine)")
no_cuda = pytest.mark.skipif(torch.cuda.is_available(), reason="needs a machine without CUDA")

ARCHITECTURES = {  # one small config per architecture of the zoo
    "relu": dict(l1_coeff=1e-2),
    "relu_dnorm": dict(l1_coeff=1e-2),
    "gated": dict(l1_coeff=1e-2),
    "panneal": dict(l1_coeff=1e-2),
    "jumprelu": dict(l0_coeff=1e-2),
    "topk": dict(k=3, aux_coeff=1 / 32),
    "batchtopk": dict(k=3, aux_coeff=1 / 32),
    "matryoshka": dict(k=3, aux_coeff=1 / 32),
}


def data(rows: int = 256, d: int = 8) -> torch.Tensor:
    return torch.randn(rows, d, generator=torch.Generator().manual_seed(0))


def schedule(**kwargs) -> TrainConfig:
    return TrainConfig(**{"steps": 12, "lr": 1e-2, "batch_size": 64, "log_every": 6, "precision": "fp32", **kwargs})


def config(architecture: str) -> SAEConfig:
    return SAEConfig(architecture, d_model=8, n_latents=32, n_seeds=2, **ARCHITECTURES[architecture])


def assert_same_state(banks: dict[str, SAEBank], label: str) -> None:
    """Every parameter and buffer of the CUDA bank equals the CPU bank's up to float rounding."""
    for name, value in banks["cpu"].state_dict().items():
        torch.testing.assert_close(
            banks["cuda"].state_dict()[name].cpu(),
            value,
            rtol=1e-4,
            atol=1e-5,
            equal_nan=True,
            msg=lambda m, name=name: f"{label} {name}: {m}",
        )


def test_every_zoo_architecture_has_a_config_here():
    from paperlib.sae.architectures import ARCHITECTURES as ZOO

    assert set(ARCHITECTURES) == set(ZOO), "add the new architecture to this file's table"


def test_the_environment_variable_reaches_training(monkeypatch):
    monkeypatch.setenv("PAPERLIB_DEVICE", "cpu")
    bank = SAEBank(config("topk"))
    train(bank, data(), schedule(), progress=False)
    assert bank.W_dec.device.type == "cpu"


@no_cuda
def test_an_absent_device_named_by_the_environment_is_refused_by_train(monkeypatch):
    monkeypatch.setenv("PAPERLIB_DEVICE", "cuda")
    with pytest.raises(ValueError, match="PAPERLIB_DEVICE='cuda': cuda is not available"):
        train(SAEBank(config("topk")), data(), schedule(), progress=False)


@no_cuda
def test_the_environment_variable_reaches_matching(monkeypatch):
    from paperlib.metrics.matching import match

    monkeypatch.setenv("PAPERLIB_DEVICE", "cuda")
    with pytest.raises(ValueError, match="PAPERLIB_DEVICE='cuda': cuda is not available"):
        match(data(4), data(4))
    monkeypatch.setenv("PAPERLIB_DEVICE", "cpu")
    assert match(data(4), data(4)).mcc == pytest.approx(1.0)


@no_cuda
def test_an_absent_device_is_refused_before_the_data_is_checked():
    with pytest.raises(ValueError, match="device='cuda': cuda is not available"):
        train(SAEBank(config("topk")), "not data", schedule(), progress=False, device="cuda")


def test_the_device_type_is_part_of_a_cached_runs_key(tmp_path):
    store = Store(tmp_path)
    run = trained_bank(data, "gaussian", config("topk"), schedule(), store=store, device="cpu", progress=False)
    key = store.path("sae", {"data": "gaussian", "sae": config("topk"), "train": schedule(), "device": "cpu"}).name
    assert run.key == key
    again = trained_bank(
        lambda: pytest.fail("a cached run must not load its data"),
        "gaussian",
        config("topk"),
        schedule(),
        store=store,
        device="auto",
        progress=False,
    )
    assert again.key == run.key  # "auto" is this machine's device: the same entry


@needs_cuda
@pytest.mark.parametrize("architecture", sorted(ARCHITECTURES))
def test_training_on_cuda_matches_the_cpu(architecture):
    """fp32 on both; the scatter-adds of a CUDA step may sum in any order, so equal up to rounding."""
    banks = {dev: SAEBank(config(architecture)) for dev in ("cpu", "cuda")}
    histories = {dev: train(bank, data(), schedule(), progress=False, device=dev) for dev, bank in banks.items()}
    assert banks["cuda"].W_dec.device.type == "cuda"
    assert_same_state(banks, architecture)
    torch.testing.assert_close(
        torch.as_tensor(histories["cuda"]["fvu"]), torch.as_tensor(histories["cpu"]["fvu"]), rtol=1e-4, atol=1e-6
    )


@needs_cuda
def test_a_cached_run_trains_on_the_gpu_by_default_and_comes_back_on_the_cpu(tmp_path, monkeypatch):
    monkeypatch.delenv("PAPERLIB_DEVICE", raising=False)
    store, seen = Store(tmp_path), []

    def where(bank: SAEBank) -> float:
        seen.append(bank.W_dec.device.type)
        return 0.0

    run = trained_bank(
        data, "gaussian", config("topk"), schedule(), store=store, progress=False, callbacks={"where": where}
    )
    assert set(seen) == {"cuda"}
    assert run.bank.W_dec.device.type == "cpu"
    assert (
        run.key
        == store.path("sae", {"data": "gaussian", "sae": config("topk"), "train": schedule(), "device": "cuda"}).name
    )


@needs_cuda
def test_bf16_training_on_cuda_stays_close_to_fp32():
    """The default profiles train in bf16: on the GPU the same step as on CPUs with AVX512-BF16."""
    x = data(1024, 16)
    sae = SAEConfig("topk", d_model=16, n_latents=64, k=4, n_seeds=2, aux_coeff=1 / 32)
    fvu = {}
    for precision in ("fp32", "bf16"):
        bank = SAEBank(sae)
        fvu[precision] = train(bank, x, schedule(precision=precision, steps=40), progress=False, device="cuda")["fvu"][
            -1
        ]
    torch.testing.assert_close(torch.as_tensor(fvu["bf16"]), torch.as_tensor(fvu["fp32"]), rtol=0.05, atol=0.01)


@needs_cuda
def test_the_sparse_topk_step_on_cuda_matches_the_cpu():
    """Wide enough for the sparse closed form (paperlib.sae.kernels.sparse_topk), whose CUDA path is the torch tail."""
    sae = SAEConfig("topk", d_model=16, n_latents=1024, k=8, n_seeds=2, aux_coeff=1 / 32)
    banks = {dev: SAEBank(sae) for dev in ("cpu", "cuda")}
    for dev, bank in banks.items():
        train(bank, data(512, 16), schedule(), progress=False, device=dev)
    assert_same_state(banks, "topk (sparse)")
