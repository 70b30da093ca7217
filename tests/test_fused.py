"""The fused CPU kernels (fused.py): equal to the torch paths, independent of the thread count, used
only where they apply, and a clean fallback when they cannot be compiled."""

import pytest
import torch

from paperlib.sae.bank import SAEBank, SAEConfig
from paperlib.sae import threads as thread_choice
from paperlib.sae.kernels import fused
from paperlib.sae.kernels.dispatch import kernel_for
from paperlib.sae.train import TrainConfig, train


def perturbed_bank(architecture="topk", d=5, n=7, k=2, seeds=3, **overrides):
    """Odd sizes (padding inside the kernel), non-zero biases, L1 on."""
    torch.manual_seed(0)
    bank = SAEBank(
        SAEConfig(
            architecture,
            d,
            n,
            k=k if architecture == "topk" else None,
            l1_coeff=1e-2,
            n_seeds=seeds,
            seed=3,
            **overrides,
        )
    )
    with torch.no_grad():
        for p in bank.parameters():
            p.add_(0.1 * torch.randn_like(p))
    return bank


def both_paths(bank, x, monkeypatch):
    monkeypatch.setenv("PAPERLIB_FUSED", "1")
    assert kernel_for(bank.cfg, x) == "fused"
    on = bank.loss_and_grads(x, n_rows=x.shape[0])
    monkeypatch.setenv("PAPERLIB_FUSED", "0")
    assert kernel_for(bank.cfg, x) == "dense"
    return on, bank.loss_and_grads(x, n_rows=x.shape[0])


@pytest.mark.parametrize(
    "architecture,k,reconstruction", [("relu", None, "mean"), ("topk", 2, "mean"), ("topk", 6, "sum")]
)
def test_fused_step_equals_the_torch_path(architecture, k, reconstruction, monkeypatch):
    bank = perturbed_bank(architecture, k=k, reconstruction=reconstruction)
    x = torch.randn(2 * 2048 + 17, 5)  # two full kernel chunks and a ragged tail
    (grads, parts), (ref_grads, ref_parts) = both_paths(bank, x, monkeypatch)
    for name, ref in ref_grads.items():
        torch.testing.assert_close(grads[name], ref, rtol=1e-4, atol=1e-4 * float(ref.abs().max()), msg=name)
    for name in ("sq_err", "l1", "l0"):
        torch.testing.assert_close(parts[name], ref_parts[name], rtol=1e-5, atol=1e-3)
    assert torch.equal(parts["fired"], ref_parts["fired"])
    assert (parts["l0"] > 0).all() and (parts["l1"] > 0).all()


def test_topk_selection_at_the_largest_supported_k(monkeypatch):
    bank = perturbed_bank("topk", d=8, n=40, k=fused.MAX_K, seeds=1)
    x = torch.randn(300, 8)
    (grads, parts), (ref_grads, ref_parts) = both_paths(bank, x, monkeypatch)
    assert torch.equal(parts["l0"], ref_parts["l0"])
    torch.testing.assert_close(grads["W_enc"], ref_grads["W_enc"], rtol=1e-4, atol=1e-6)


@pytest.mark.parametrize("reconstruction", ["mean", "sum"])
def test_sparse_topk_tail_equals_its_torch_version(reconstruction, monkeypatch):
    torch.manual_seed(2)
    bank = SAEBank(SAEConfig("topk", 16, 600, k=8, l1_coeff=1e-2, n_seeds=2, reconstruction=reconstruction))
    with torch.no_grad():
        for p in bank.parameters():
            p.add_(0.05 * torch.randn_like(p))
        bank.b_enc.sub_(2.8)  # some rows have fewer than k positive pre-activations: zero codes in the top k
    x = torch.randn(700, 16)
    results = {}
    for flag in ("1", "0"):
        monkeypatch.setenv("PAPERLIB_FUSED", flag)
        results[flag] = bank.loss_and_grads(x, n_rows=700, sparse=True)
    (grads, parts), (ref_grads, ref_parts) = results["1"], results["0"]
    assert (ref_parts["l0"] < 700 * 8).all() and (ref_parts["l0"] > 0).all()  # zero codes occur, and real ones
    for name, ref in ref_grads.items():
        torch.testing.assert_close(grads[name], ref, rtol=1e-4, atol=1e-4 * float(ref.abs().max()), msg=name)
    for name in ("sq_err", "l1", "l0"):
        torch.testing.assert_close(parts[name], ref_parts[name], rtol=1e-5, atol=1e-4)
    assert torch.equal(parts["fired"], ref_parts["fired"])


@pytest.mark.parametrize("threads", [2, 3, 7])
def test_sparse_tail_does_not_depend_on_the_thread_count(threads):
    # Every sum of the step after the GEMM runs in our kernel in a fixed order, so uneven latent and
    # dimension partitions (3 and 7 threads over 600 latents and 18 dims) give the same bits. (On an
    # Intel CPU b_dec's gradient once differed by ~1e-7 between 1 and 2 threads, when two of its
    # sums were left to torch/MKL; this no longer depends on which library the CPU picks.)
    torch.manual_seed(4)
    bank = SAEBank(SAEConfig("topk", 18, 600, k=8, l1_coeff=1e-2, n_seeds=2))
    with torch.no_grad():
        bank.b_enc.add_(0.1 * torch.randn_like(bank.b_enc))
        bank.b_dec.add_(0.1 * torch.randn_like(bank.b_dec))
    x = torch.randn(500, 18)
    before = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        one, one_parts = bank.loss_and_grads(x, n_rows=500, sparse=True)
        torch.set_num_threads(threads)
        thread_choice._kernel_choosers.clear()  # a fresh chooser's first call runs at the full thread count
        many, many_parts = bank.loss_and_grads(x, n_rows=500, sparse=True)
    finally:
        torch.set_num_threads(before)
    for name in one:
        assert torch.equal(one[name], many[name]), name
    for name in ("sq_err", "l1", "l0"):
        assert torch.equal(one_parts[name], many_parts[name]), name


def test_sparse_tail_b_dec_gradient_equals_a_float64_reference():
    torch.manual_seed(5)
    bank = SAEBank(SAEConfig("topk", 18, 600, k=8, l1_coeff=1e-2, n_seeds=1))
    with torch.no_grad():
        bank.b_dec.add_(0.1 * torch.randn_like(bank.b_dec))
    x = torch.randn(300, 18)
    grads, _ = bank.loss_and_grads(x, n_rows=300, sparse=True)
    ref = bank.double()
    total, _, _ = ref.loss(x.double())
    (expected,) = torch.autograd.grad(total, ref.b_dec)
    torch.testing.assert_close(grads["b_dec"].double(), expected, rtol=1e-5, atol=1e-6)


def test_result_does_not_depend_on_the_thread_count(monkeypatch):
    bank = perturbed_bank("relu")
    x = torch.randn(3 * 2048 + 5, 5)
    threads = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        one, _ = bank.loss_and_grads(x, n_rows=x.shape[0])
        torch.set_num_threads(max(2, threads))
        thread_choice._kernel_choosers.clear()  # a fresh chooser's first call runs at the full thread count
        many, _ = bank.loss_and_grads(x, n_rows=x.shape[0])
    finally:
        torch.set_num_threads(threads)
    for name in one:
        assert torch.equal(one[name], many[name]), name


def test_training_through_the_fused_step_matches_the_torch_path(monkeypatch):
    x = torch.randn(600, 5)
    runs = {}
    for flag in ("1", "0"):
        monkeypatch.setenv("PAPERLIB_FUSED", flag)
        bank = perturbed_bank("topk")
        history = train(bank, x, TrainConfig(steps=40, lr=1e-2, log_every=40), progress=False)
        runs[flag] = bank, history
    (bank, history), (ref_bank, _) = runs["1"], runs["0"]
    assert history.final("loss")[0] < history["loss"][0][0]  # it trains
    for (name, p), ref in zip(bank.named_parameters(), ref_bank.parameters()):
        torch.testing.assert_close(p, ref, rtol=1e-3, atol=1e-4, msg=name)


def test_used_only_where_it_applies(monkeypatch):
    monkeypatch.setenv("PAPERLIB_FUSED", "1")
    x = torch.randn(8, 5)
    assert kernel_for(perturbed_bank("relu").cfg, x) == "fused"
    assert kernel_for(perturbed_bank("relu").cfg, x.double()) == "dense"
    assert kernel_for(perturbed_bank("relu", d=64, n=128).cfg, torch.randn(8, 64)) == "dense"  # beyond MAX_WEIGHTS
    assert kernel_for(perturbed_bank("topk", d=5, n=48, k=fused.MAX_K + 1).cfg, x) == "dense"
    assert kernel_for(perturbed_bank("topk", d=5, n=48, k=2).cfg, x, sparse=True) == "sparse"
    with torch.autocast("cpu", dtype=torch.bfloat16):  # precision="bf16": the torch path autocasts
        assert kernel_for(perturbed_bank("relu").cfg, x) == "dense"
    x_llm = torch.randn(8, 64)  # an LLM-sized TopK SAE (k small next to n) takes the sparse path by default
    assert kernel_for(SAEConfig("topk", 64, 2048, k=8), x_llm) == "sparse"
    assert kernel_for(SAEConfig("topk", 64, 2048, k=8), x_llm, sparse=False) == "dense"
    with pytest.raises(ValueError, match="sparse path is for TopK"):
        kernel_for(SAEConfig("relu", 64, 2048), x_llm, sparse=True)


def test_without_a_compiler_it_warns_once_and_trains_on_the_torch_path(monkeypatch, tmp_path):
    monkeypatch.setenv("PAPERLIB_CACHE", str(tmp_path))  # nothing compiled yet
    monkeypatch.setenv("CXX", "false")  # a "compiler" that always fails
    monkeypatch.setattr(fused, "_warned", False)
    fused._library.cache_clear()
    bank = perturbed_bank("relu", d=3, n=5)
    sparse_bank = SAEBank(SAEConfig("topk", 8, 600, k=4, n_seeds=1))
    x, x_sparse = torch.randn(40, 3), torch.randn(50, 8)
    try:
        with pytest.warns(UserWarning, match="could not be compiled.*PAPERLIB_FUSED=0") as record:
            grads, _ = bank.loss_and_grads(x, n_rows=40)
        assert [w.filename for w in record if "could not be compiled" in str(w.message)] == [__file__]
        sparse_grads, _ = sparse_bank.loss_and_grads(x_sparse, n_rows=50, sparse=True)
    finally:
        fused._library.cache_clear()  # later tests compile with the real compiler again
    monkeypatch.setenv("PAPERLIB_FUSED", "0")
    ref, _ = bank.loss_and_grads(x, n_rows=40)
    sparse_ref, _ = sparse_bank.loss_and_grads(x_sparse, n_rows=50, sparse=True)
    for name in ref:
        assert torch.equal(grads[name], ref[name]), name
        assert torch.equal(sparse_grads[name], sparse_ref[name]), name
    assert not list((tmp_path / "native").glob("*.so"))  # nothing half-built left behind


def test_a_compiled_kernel_is_reused_from_the_cache(monkeypatch, tmp_path):
    monkeypatch.setenv("PAPERLIB_CACHE", str(tmp_path))
    first = fused._build("fused_step", {"d": 4, "n": 6, "k": 0})
    stamp = first.stat().st_mtime_ns
    assert fused._build("fused_step", {"d": 4, "n": 6, "k": 0}) == first and first.stat().st_mtime_ns == stamp
    assert fused._build("fused_step", {"d": 4, "n": 6, "k": 2}) != first


@pytest.mark.parametrize("architecture, k", [("relu", None), ("topk", 3)])
def test_training_at_changing_thread_counts_gives_the_same_bits(monkeypatch, architecture, k):
    """train() picks each step's thread count by timing (paperlib.sae.threads); since every number of a
    fused step is thread-count independent, a run whose count changes every step equals one at one thread."""
    x = torch.randn(700, 16, generator=torch.Generator().manual_seed(3)).abs()
    cfg = SAEConfig(architecture, 16, 32, k=k, l1_coeff=1e-2, n_seeds=2, seed=4)
    schedule = TrainConfig(steps=30, lr=3e-3, batch_size=256, log_every=30)
    before = torch.get_num_threads()
    picks = []
    try:
        torch.set_num_threads(1)
        thread_choice._kernel_choosers.clear()
        steady = SAEBank(cfg)
        train(steady, x, schedule, progress=False)
        torch.set_num_threads(2)
        monkeypatch.setattr(
            thread_choice.ThreadChooser, "pick", lambda self: picks.append(1 + len(picks) % 2) or picks[-1]
        )
        switching = SAEBank(cfg)
        train(switching, x, schedule, progress=False)
    finally:
        torch.set_num_threads(before)
        thread_choice._kernel_choosers.clear()
    assert len(picks) >= schedule.steps and set(picks) == {1, 2}  # every step, at one and two threads
    for name, value in steady.state_dict().items():  # bitwise (an unused threshold is NaN in both)
        torch.testing.assert_close(value, switching.state_dict()[name], rtol=0, atol=0, equal_nan=True, msg=name)
