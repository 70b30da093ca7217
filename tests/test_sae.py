"""The SAE bank: shapes, seeds, TopK's exact k, closed-form gradients equal to autograd."""

import pytest
import torch

from paperlib.sae.bank import SAEBank, SAEConfig


def make(architecture="topk", **overrides):
    fields = dict(
        architecture=architecture,
        d_model=6,
        n_latents=12,
        k=3 if architecture == "topk" else None,
        l1_coeff=1e-2,
        n_seeds=4,
        seed=7,
    )
    fields.update(overrides)
    return SAEBank(SAEConfig(**fields))


def test_shapes():
    bank = make()
    x = torch.randn(10, 6)
    recon, codes = bank(x)
    assert recon.shape == (4, 10, 6) and codes.shape == (4, 10, 12)
    assert bank.W_enc.shape == (4, 6, 12) and bank.W_dec.shape == (4, 12, 6)
    assert bank.decoder_directions().shape == (4, 12, 6)


@pytest.mark.parametrize("k", [1, 3, 9, 12])
def test_topk_codes_have_exactly_k_active_latents(k):
    bank = make(k=k)
    with torch.no_grad():
        bank.b_enc.fill_(10.0)  # every pre-activation positive: exactly k must survive
    codes = bank.encode(torch.randn(50, 6))
    assert ((codes > 0).sum(-1) == k).all()


def test_topk_keeps_the_largest_pre_activations():
    bank = make(k=2, n_seeds=1)
    x = torch.randn(30, 6)
    pre = torch.baddbmm(bank.b_enc[:, None], x - bank.b_dec[:, None], bank.W_enc).detach()
    codes = bank.encode(x).detach()
    top2 = pre.topk(2, dim=-1).values.clamp(min=0)
    assert torch.allclose(codes.sort(-1, descending=True).values[..., :2], top2)


def test_relu_codes_are_the_positive_pre_activations():
    bank = make("relu")
    x = torch.randn(20, 6)
    pre = torch.baddbmm(bank.b_enc[:, None], x - bank.b_dec[:, None], bank.W_enc)
    assert torch.equal(bank.encode(x), pre.relu())


def test_seeds_differ_and_same_seed_gives_same_weights():
    bank = make()
    w = bank.W_dec.detach()
    assert not torch.allclose(w[0], w[1])
    again = make()
    assert all(torch.equal(p, q) for p, q in zip(bank.parameters(), again.parameters()))
    # Seed i of a bank is the SAE a bank of one starting at seed + i would build.
    alone = make(n_seeds=1, seed=9)
    assert torch.equal(bank.seed(2).W_dec, alone.W_dec)
    assert torch.equal(bank.seed(2).W_enc, bank.W_enc[2:3])


def test_tied_initialisation_with_requested_norm():
    bank = make(init_scale=0.1)
    assert torch.allclose(bank.W_dec.norm(dim=-1), torch.full((4, 12), 0.1))
    assert torch.equal(bank.W_enc, bank.W_dec.transpose(1, 2))


@pytest.mark.parametrize("fused", ["1", "0"])  # the fused CPU kernel (fused.py) and the torch path
@pytest.mark.parametrize("architecture", ["relu", "topk"])
def test_closed_form_gradients_equal_autograd(architecture, fused, monkeypatch):
    monkeypatch.setenv("PAPERLIB_FUSED", fused)
    torch.manual_seed(0)
    bank = make(architecture, init_scale=0.5)
    with torch.no_grad():
        for p in bank.parameters():
            p.add_(0.1 * torch.randn_like(p))  # non-trivial biases too
    x = torch.randn(257, 6)
    grads, parts = bank.loss_and_grads(x, n_rows=257, chunk_size=64)  # several uneven chunks
    recon, codes = bank(x)
    mse = (recon - x).square().mean(dim=(1, 2))
    loss = mse + bank.cfg.l1_coeff * codes.abs().sum(-1).mean(-1)
    loss.sum().backward()
    for name, param in bank.named_parameters():
        torch.testing.assert_close(grads[name], param.grad, rtol=1e-4, atol=1e-7, msg=name)
    torch.testing.assert_close(parts["sq_err"] / (257 * 6), mse.detach())


def test_bad_configurations_are_clear_errors():
    with pytest.raises(ValueError, match="unknown SAE architecture 'gated2'"):
        SAEConfig("gated2", d_model=4, n_latents=8)
    with pytest.raises(ValueError, match="needs 1 <= k <= n_latents=8, got k=9"):
        SAEConfig("topk", d_model=4, n_latents=8, k=9)
    with pytest.raises(ValueError, match="takes no k"):
        SAEConfig("relu", d_model=4, n_latents=8, k=2)
    with pytest.raises(ValueError, match="d_model must be a positive integer"):
        SAEConfig("relu", d_model=0, n_latents=8)


def test_wrong_input_width_names_the_expected_shape():
    with pytest.raises(ValueError, match=r"\[batch, d_model=6\], got \(5, 7\)"):
        make().encode(torch.randn(5, 7))


@pytest.mark.parametrize("k,reconstruction", [(3, "mean"), (12, "sum")])
def test_sparse_topk_path_equals_the_dense_closed_form(k, reconstruction):
    torch.manual_seed(1)
    bank = make(k=k, n_latents=200, d_model=16, n_seeds=2, reconstruction=reconstruction, l1_coeff=1e-2)
    with torch.no_grad():
        for p in bank.parameters():
            p.add_(0.05 * torch.randn_like(p))
    x = torch.randn(300, 16)
    dense, dense_parts = bank.loss_and_grads(x, n_rows=300, sparse=False)
    sparse, sparse_parts = bank.loss_and_grads(x, n_rows=300, sparse=True)
    for name in dense:
        torch.testing.assert_close(sparse[name], dense[name], rtol=1e-4, atol=1e-6, msg=name)
    for name in ("sq_err", "l1", "l0"):
        torch.testing.assert_close(sparse_parts[name], dense_parts[name], rtol=1e-5, atol=1e-5)
    assert torch.equal(sparse_parts["fired"], dense_parts["fired"])


def test_sparse_path_is_chosen_only_where_it_pays_off():
    from paperlib.sae.kernels.sparse_topk import sparse_pays_off

    assert sparse_pays_off(32, 16384) and sparse_pays_off(32, 4096)
    assert not sparse_pays_off(3, 32) and not sparse_pays_off(128, 1024)
    with pytest.raises(ValueError, match="sparse path is for TopK"):
        make("relu").loss_and_grads(torch.randn(4, 6), n_rows=4, sparse=True)


def test_topk_with_auxk_trains_in_closed_form_exactly_while_no_latent_is_dead(monkeypatch):
    # AuxK is exactly zero until a latent has been silent for dead_tokens: the closed-form (sparse)
    # step must then train like autograd on loss(), and autograd must take over once one is dead.
    from paperlib.sae.train import TrainConfig, train

    torch.manual_seed(0)
    x = torch.randn(2048, 16)
    cfg = SAEConfig("topk", 16, 600, k=8, n_seeds=2, aux_coeff=1 / 32, decoder="unit", reconstruction="sum")
    schedule = TrainConfig(steps=30, lr=1e-3, batch_size=256, log_every=30)
    fast = SAEBank(cfg)
    assert fast.closed_form_now()
    train(fast, x, schedule, progress=False)
    monkeypatch.setattr(SAEBank, "closed_form_now", lambda self: False)
    slow = SAEBank(cfg)
    train(slow, x, schedule, progress=False)
    for (name, p), ref in zip(fast.named_parameters(), slow.parameters()):
        torch.testing.assert_close(p, ref, rtol=1e-4, atol=1e-5, msg=name)
    monkeypatch.undo()
    with torch.no_grad():
        fast.tokens_since_fired[0, 3] = cfg.dead_tokens  # one dead latent: AuxK is live again
    assert not fast.closed_form_now()
    with pytest.raises(ValueError, match="while latents are dead"):
        fast.loss_and_grads(x[:64], n_rows=64)
    assert not SAEBank(SAEConfig("batchtopk", 16, 64, k=4)).closed_form_now()


def test_one_seed_of_a_float64_bank_stays_float64():
    bank = SAEBank(SAEConfig("jumprelu", 8, 16, n_seeds=3, seed=2)).double()
    with torch.no_grad():
        bank.W_dec.add_(1e-12 * torch.randn_like(bank.W_dec))  # below float32's resolution
    one = bank.seed(1)
    assert one.W_dec.dtype == torch.float64 and one.cfg.seed == 3
    for name, value in one.state_dict().items():  # bitwise; an untrained threshold is NaN in both
        torch.testing.assert_close(value[0], bank.state_dict()[name][1], rtol=0, atol=0, equal_nan=True, msg=name)


def test_indexing_a_bank_gives_one_sae_without_the_seed_axis():
    bank = SAEBank(SAEConfig("topk", d_model=6, n_latents=10, k=3, n_seeds=3, seed=4))
    with torch.no_grad():
        bank.b_dec.add_(0.1 * torch.randn_like(bank.b_dec))
    x = torch.randn(7, 6)
    recon, codes = bank(x)
    for i, one in enumerate(bank):  # iteration stops at the last seed (IndexError)
        assert torch.equal(one.W_dec, bank.W_dec[i].detach()) and torch.equal(one.b_dec, bank.b_dec[i].detach())
        # a single-seed GEMM need not round like one seed of a batched one (it does not on an AVX2 AMD EPYC)
        torch.testing.assert_close(one.encode(x), codes[i].detach(), rtol=1e-6, atol=1e-6)
        torch.testing.assert_close(one.decode(one.encode(x)), recon[i])
        assert (one.n_latents, one.d_model) == (10, 6)
    assert i == 2
    with pytest.raises(IndexError, match="seed index 3 out of range for a bank of 3"):
        bank[3]
    with pytest.raises(IndexError, match="seed index 1 out of range for a bank of 1"):
        SAEBank(SAEConfig("relu", 6, 10))[1]
    with pytest.raises(TypeError, match="index a bank with a seed number"):
        bank[0:2]


def test_loss_outputs_are_named():
    bank = SAEBank(SAEConfig("relu", d_model=4, n_latents=6, l1_coeff=0.1, n_seeds=2))
    x = torch.randn(5, 4)
    out = bank.loss_and_reconstruction(x)
    assert out.recon.shape == (2, 5, 4) and out.codes.shape == (2, 5, 6) and set(out.parts) == {"recon", "l1"}
    total, parts, codes = bank.loss(x)  # still unpacks as a tuple
    assert torch.equal(total, bank.loss(x).total) and torch.equal(codes, out.codes)
