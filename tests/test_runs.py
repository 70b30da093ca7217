"""trained_bank: train once, reload the whole state from the store."""

import numpy as np
import pytest
import torch

from paperlib.runs.trained import trained_bank
from paperlib.sae.bank import SAEConfig
from paperlib.sae.train import TrainConfig
from paperlib.store import Store


@pytest.fixture
def store(tmp_path):
    return Store(tmp_path)


def data():
    return torch.randn(512, 8, generator=torch.Generator().manual_seed(0))


def test_second_call_reloads_without_touching_the_data(store):
    sae = SAEConfig("batchtopk", d_model=8, n_latents=16, k=2, n_seeds=2)
    schedule = TrainConfig(steps=20, lr=1e-2, batch_size=64, log_every=10, checkpoint_fractions=(0.5, 1.0))
    first = trained_bank(data, {"name": "gaussian"}, sae, schedule, store=store, progress=False)

    def untouchable():
        raise AssertionError("a cached run must not load its data")

    again = trained_bank(untouchable, {"name": "gaussian"}, sae, schedule, store=store, progress=False)
    assert again.key == first.key
    for name, value in first.bank.state_dict().items():
        assert torch.equal(value, again.bank.state_dict()[name]), name
    assert torch.isfinite(again.bank.threshold).all(), "BatchTopK's inference threshold must survive the cache"
    assert sorted(again.checkpoints) == [10, 20]
    np.testing.assert_array_equal(first.history["step"], again.history["step"])
    x = data()
    torch.testing.assert_close(first.bank.encode(x), again.bank.encode(x))


def test_a_different_data_key_trains_a_different_run(store):
    sae = SAEConfig("topk", d_model=8, n_latents=16, k=2)
    schedule = TrainConfig(steps=5, lr=1e-2, log_every=5)
    a = trained_bank(data(), "a", sae, schedule, store=store, progress=False)
    b = trained_bank(lambda: 2 * data(), "b", sae, schedule, store=store, progress=False)
    assert a.key != b.key
    assert not torch.equal(a.bank.W_dec, b.bank.W_dec)


def test_firing_rates_count_the_rows_each_latent_fires_on():
    from paperlib.runs.trained import firing_rates
    from paperlib.sae.bank import SAEBank

    bank = SAEBank(SAEConfig("topk", d_model=8, n_latents=16, k=3, n_seeds=2))
    x = data()
    rates = firing_rates(bank, x, chunk_size=100)
    expected = (bank.encode(x) > 0).float().mean(1)
    torch.testing.assert_close(rates, expected)
    torch.testing.assert_close(rates.sum(1), torch.full((2,), 3.0))  # exactly k latents per row
    exact = firing_rates(bank, x, chunk_size=100, dtype=torch.float64)
    counts = (bank.encode(x) > 0).sum(1)  # integers: count / rows is one correctly rounded division
    assert exact.dtype == torch.float64 and torch.equal(exact, counts.double() / x.shape[0])


@pytest.mark.skipif(torch.cuda.is_available(), reason="needs a machine without CUDA")
def test_an_unavailable_device_is_refused_before_the_data_is_read(store):
    def untouchable():
        raise AssertionError("the device must be checked first")

    with pytest.raises(ValueError, match="cuda is not available on this machine"):
        trained_bank(
            untouchable,
            "x",
            SAEConfig("topk", 8, 16, k=2),
            TrainConfig(steps=2),
            store=store,
            device="cuda",
            progress=False,
        )


def test_massive_rows_are_left_out_of_training_and_the_filter_is_checked():
    from paperlib.runs.trained import without_massive_rows

    x = data()
    x[[5, 300]] *= 50  # ~50x the median norm: "massive activations"
    with pytest.warns(RuntimeWarning, match="left out 2 of 512 training rows whose norm exceeds 10x the median"):
        kept = without_massive_rows(x)
    torch.testing.assert_close(kept, x[[i for i in range(512) if i not in (5, 300)]])
    assert without_massive_rows(x, factor=None) is x
    assert without_massive_rows(x, factor=100.0).shape == x.shape  # 50x stays under 100x
    for bad in (1.0, 0.5, float("nan"), True, "10"):
        with pytest.raises(ValueError, match="max_norm_factor must be a number > 1"):
            without_massive_rows(x, factor=bad)


def test_an_activation_run_trains_without_the_massive_rows(store):
    from paperlib.sources.activations import MemoryActivations
    from paperlib.runs.trained import activation_run

    x = data()
    x[7] *= 50
    acts = MemoryActivations(x)
    sae, schedule = SAEConfig("topk", d_model=8, n_latents=16, k=2), TrainConfig(steps=4, lr=1e-2, batch_size=64)
    with pytest.warns(RuntimeWarning, match="left out 1 of 448"):
        filtered = activation_run(acts, sae, schedule, eval_rows=64, store=store, progress=False)
    clean = torch.cat([x[:7], x[8:448]])
    expected = trained_bank(clean, "expected", sae, schedule, store=store, progress=False)
    torch.testing.assert_close(filtered.bank.W_dec, expected.bank.W_dec)
    kept_all = activation_run(acts, sae, schedule, eval_rows=64, store=store, max_norm_factor=None, progress=False)
    assert kept_all.key != filtered.key
    with pytest.raises(ValueError, match="max_norm_factor"):
        activation_run(acts, sae, schedule, eval_rows=64, store=store, max_norm_factor=0, progress=False)
