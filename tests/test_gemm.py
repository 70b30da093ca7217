"""paperlib.sae.kernels.gemm: oneDNN's fp32 matmul equals torch's, is used only where it applies, does not depend
on the thread count, and carries the sparse TopK step."""

import pytest
import torch

from paperlib.sae.bank import SAEBank, SAEConfig
from paperlib.sae.kernels import gemm
from paperlib.sae.train import TrainConfig, train

pytestmark = pytest.mark.skipif(gemm._linear() is None, reason="this torch build has no oneDNN linear")


@pytest.fixture(autouse=True)
def onednn_on(monkeypatch):
    monkeypatch.setenv("PAPERLIB_ONEDNN", "1")


@pytest.mark.parametrize("shape,bias", [((100, 64, 200), True), ((64, 96, 65), False)])
def test_addmm_equals_torch(shape, bias):
    m, k, n = shape
    torch.manual_seed(0)
    x, w = torch.randn(m, k), torch.randn(k, n)
    b = torch.randn(n) if bias else None
    assert gemm.applies(x, w)
    reference = torch.addmm(b, x, w) if bias else x @ w
    torch.testing.assert_close(gemm.addmm(b, x, w), reference, rtol=1e-5, atol=1e-5)


def test_weight_views_are_read_through_their_strides():
    torch.manual_seed(0)
    x, w = torch.randn(80, 64), torch.randn(128, 96)
    view = w.T[:, :64].T  # [64, 96], not contiguous
    torch.testing.assert_close(gemm.addmm(None, x, view), x @ view.contiguous(), rtol=1e-5, atol=1e-5)


def cases_outside():
    torch.manual_seed(0)
    big = torch.randn(70, 64), torch.randn(64, 80)
    yield "a small dimension", torch.randn(70, 16), torch.randn(16, 80)
    yield "bf16 inputs", big[0].bfloat16(), big[1].bfloat16()
    yield "a weight that needs a gradient", big[0], big[1].clone().requires_grad_()
    yield "an input that needs a gradient", big[0].clone().requires_grad_(), big[1]


@pytest.mark.parametrize("case", list(cases_outside()), ids=lambda c: c[0])
def test_torch_runs_where_onednn_does_not_apply(case):
    _, x, w = case
    assert not gemm.applies(x, w)
    assert torch.equal(gemm.addmm(None, x, w), x @ w)


def test_a_bias_that_needs_a_gradient_keeps_autograd():
    x, w, b = torch.randn(70, 64), torch.randn(64, 80), torch.zeros(80, requires_grad=True)
    assert gemm.applies(x, w) and not gemm.applies(x, w, b)
    gemm.addmm(b, x, w).sum().backward()
    assert torch.equal(b.grad, torch.full((80,), 70.0))


def test_gradients_flow_through_the_fallback():
    x, w = torch.randn(70, 64), torch.randn(64, 80, requires_grad=True)
    gemm.addmm(None, x, w).sum().backward()
    torch.testing.assert_close(w.grad, x.sum(0)[:, None].expand(64, 80))


def test_autocast_and_the_switch_leave_it_to_torch(monkeypatch):
    x, w = torch.randn(70, 64), torch.randn(64, 80)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        assert not gemm.applies(x, w)
        assert gemm.addmm(None, x, w).dtype == torch.bfloat16
    monkeypatch.setenv("PAPERLIB_ONEDNN", "0")
    assert not gemm.applies(x, w)
    monkeypatch.setenv("PAPERLIB_ONEDNN", "1")
    monkeypatch.setattr(gemm, "_linear", lambda: None)  # a torch build without the op
    assert not gemm.applies(x, w)
    assert torch.equal(gemm.addmm(None, x, w), x @ w)


def test_result_does_not_depend_on_the_thread_count():
    torch.manual_seed(0)
    x, w, b = torch.randn(512, 96), torch.randn(96, 700), torch.randn(700)
    threads = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        one = gemm.addmm(b, x, w)
        torch.set_num_threads(max(2, threads))
        many = gemm.addmm(b, x, w)
    finally:
        torch.set_num_threads(threads)
    assert torch.equal(one, many)


def wide_topk_bank(seed=0):
    torch.manual_seed(seed)
    bank = SAEBank(SAEConfig("topk", 64, 1024, k=8, n_seeds=2, seed=1, l1_coeff=1e-2, reconstruction="sum"))
    with torch.no_grad():
        for p in bank.parameters():
            p.add_(0.05 * torch.randn_like(p))
    return bank


def test_sparse_topk_step_through_onednn_equals_the_dense_closed_form():
    bank, x = wide_topk_bank(), torch.randn(300, 64)
    assert gemm.applies(x, bank.W_enc[0].detach())
    dense, dense_parts = bank.loss_and_grads(x, n_rows=300, sparse=False)
    sparse, sparse_parts = bank.loss_and_grads(x, n_rows=300, sparse=True)
    for name in dense:
        torch.testing.assert_close(sparse[name], dense[name], rtol=1e-4, atol=1e-6, msg=name)
    assert torch.equal(sparse_parts["fired"], dense_parts["fired"])


def test_training_through_onednn_is_bitwise_reproducible():
    x = torch.randn(512, 64)
    cfg = TrainConfig(steps=6, lr=1e-3, batch_size=128, log_every=3, seed=2)
    a, b = wide_topk_bank(), wide_topk_bank()
    train(a, x, cfg, progress=False)
    train(b, x, cfg, progress=False)
    assert all(torch.equal(p, q) for p, q in zip(a.parameters(), b.parameters()))


@pytest.fixture
def fresh_choice(monkeypatch, tmp_path):
    """An empty cache and no remembered choice."""
    monkeypatch.setenv("PAPERLIB_CACHE", str(tmp_path))
    monkeypatch.delenv("PAPERLIB_ONEDNN")
    gemm._measured_choice.cache_clear()
    yield tmp_path
    gemm._measured_choice.cache_clear()


@pytest.mark.parametrize("faster", [True, False])
def test_by_default_the_faster_gemm_is_measured_once_and_remembered(monkeypatch, fresh_choice, faster):
    measured = []
    monkeypatch.setattr(gemm, "measure_onednn_faster", lambda: measured.append(1) or faster)
    x, w = torch.randn(70, 64), torch.randn(64, 80)
    assert gemm.applies(x, w) is faster and gemm.applies(x, w) is faster
    assert len(measured) == 1
    [stored] = (fresh_choice / "native").glob("gemm_choice_*.json")
    gemm._measured_choice.cache_clear()  # a new process: reads the file, does not time again
    assert gemm.applies(x, w) is faster and len(measured) == 1
    stored.write_text("{not json")  # a damaged file is measured again, not trusted
    gemm._measured_choice.cache_clear()
    assert gemm.applies(x, w) is faster and len(measured) == 2
    monkeypatch.setenv("PAPERLIB_ONEDNN", "1")
    assert gemm.applies(x, w)
    monkeypatch.setenv("PAPERLIB_ONEDNN", "0")
    assert not gemm.applies(x, w)


def test_the_measurement_times_both_gemms_on_the_same_product(monkeypatch):
    results = []
    monkeypatch.setattr(gemm, "_seconds", lambda product, reps=3: results.append(product()) or len(results))
    assert gemm.measure_onednn_faster()  # oneDNN is timed first, so here it got the smaller "time"
    m, k, n = gemm.PROBE
    assert [r.shape for r in results] == [(m, n), (m, n)]
    torch.testing.assert_close(results[0], results[1], rtol=1e-4, atol=1e-3)


def test_a_misspelt_switch_is_refused(monkeypatch):
    monkeypatch.setenv("PAPERLIB_ONEDNN", "yes")
    with pytest.raises(ValueError, match="PAPERLIB_ONEDNN must be one of auto, 0, 1, got 'yes'"):
        gemm.applies(torch.randn(70, 64), torch.randn(64, 80))
