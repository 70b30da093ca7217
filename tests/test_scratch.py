"""paperlib.sae.kernels.scratch: kept temporaries change no number, are handed out only inside ``reuse``,
and the sparse TopK step that uses them sums W_enc's gradient in place whatever the layout of W_enc."""

import pytest
import torch

from paperlib.sae.bank import SAEBank, SAEConfig
from paperlib.sae.kernels import scratch
from paperlib.sae.kernels.params import Params
from paperlib.sae.kernels.sparse_topk import sparse_topk_grads


@pytest.fixture(autouse=True)
def torch_gemm(monkeypatch):
    monkeypatch.setenv("PAPERLIB_ONEDNN", "0")  # the route that writes into the kept buffer


def test_buffers_exist_only_inside_reuse_and_are_kept_there():
    assert scratch.buffer("b", (3, 4), torch.float32, torch.device("cpu")) is None
    with scratch.reuse():
        first = scratch.buffer("b", (3, 4), torch.float32, torch.device("cpu"))
        assert first is not None and first.shape == (3, 4)
        assert scratch.buffer("b", (3, 4), torch.float32, torch.device("cpu")) is first
        assert scratch.buffer("b", (3, 5), torch.float32, torch.device("cpu")) is not first  # another shape
        with scratch.reuse():  # a nested run keeps its own
            assert scratch.buffer("b", (3, 4), torch.float32, torch.device("cpu")) is not first
    assert scratch.buffer("b", (3, 4), torch.float32, torch.device("cpu")) is None


def params_of(seed: int) -> Params:
    torch.manual_seed(seed)
    bank = SAEBank(SAEConfig("topk", 64, 1024, k=8, n_seeds=2, seed=seed, l1_coeff=1e-2))
    with torch.no_grad():
        for p in bank.parameters():
            p.add_(0.05 * torch.randn_like(p))
    return Params(bank.W_dec.detach(), bank.W_enc.detach(), bank.b_enc.detach(), bank.b_dec.detach())


def bits(grads) -> list[torch.Tensor]:
    return [*grads.grads, grads.sums, grads.fired]


def test_the_sparse_step_gives_the_same_bits_with_kept_buffers_over_consecutive_steps():
    batches = [torch.randn(300, 64, generator=torch.Generator().manual_seed(s)) for s in range(3)]
    params = [params_of(s) for s in range(3)]
    fresh = [sparse_topk_grads(p, x, 8, 300, 1e-2, 64) for p, x in zip(params, batches)]
    with scratch.reuse():
        kept = [sparse_topk_grads(p, x, 8, 300, 1e-2, 64) for p, x in zip(params, batches)]
    for a, b in zip(fresh, kept):
        assert all(torch.equal(u, v) for u, v in zip(bits(a), bits(b)))


def test_w_enc_of_either_layout_gets_the_same_gradient():
    params = params_of(0)
    assert params.W_enc[0].T.is_contiguous()  # a bank keeps W_enc latent-major: summed in place
    row_major = params._replace(W_enc=params.W_enc.contiguous())  # e.g. weights loaded from a file
    x = torch.randn(300, 64, generator=torch.Generator().manual_seed(5))
    a, b = sparse_topk_grads(params, x, 8, 300, 1e-2, 64), sparse_topk_grads(row_major, x, 8, 300, 1e-2, 64)
    assert all(torch.equal(u, v) for u, v in zip(bits(a), bits(b)))
