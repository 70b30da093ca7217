"""Stitching (paper B) by its invariants: the closed form equals brute force, a path starts at S and ends
exactly at L, every step equals the stitched SAE it describes, self-stitching changes nothing."""

import numpy as np
import pytest
import torch

from paperlib.sae.bank import SAEBank, SAEConfig
from paperlib.sae.train import TrainConfig, evaluate, train
from paperlib.sae.view import SAEView
from paperlib.sources.organism import UniformOrganism, sample_uniform
from paperlib.stitching.path import interpolation_path
from paperlib.stitching.stitch import (
    StitchConfig,
    insertion_effects,
    max_cosine,
    reconstruction_mse,
    stitch,
    stitch_moves,
)

D = 8
ORGANISM = UniformOrganism(d=D, n_gt=16, s=2, n_samples=1500, seed=3)


def trained(architecture: str, width: int, seed: int, **fields) -> SAEBank:
    bank = SAEBank(SAEConfig(architecture, d_model=D, n_latents=width, seed=seed, decoder="unit", **fields))
    train(
        bank,
        sample_uniform(ORGANISM).x,
        TrainConfig(steps=150, lr=3e-3, batch_size=500, log_every=150, b_dec_init="mean"),
        progress=False,
    )
    return bank


@pytest.fixture(scope="module")
def x():
    return sample_uniform(ORGANISM).x


@pytest.fixture(scope="module")
def saes():
    return {
        "relu8": trained("relu", 8, 1, l1_coeff=0.05),
        "relu16": trained("relu", 16, 2, l1_coeff=0.05),
        "btk16": trained("batchtopk", 16, 3, k=2),
        "topk12": trained("topk", 12, 4, k=3),
    }


def rel(a, b):
    return abs(a - b) / max(abs(b), 1e-30)


@pytest.mark.parametrize("small,large", [("relu8", "relu16"), ("relu8", "btk16"), ("btk16", "topk12")])
def test_closed_form_delta_mse_equals_brute_force(saes, x, small, large):
    S, L = SAEView.from_bank(saes[small]), SAEView.from_bank(saes[large])
    effects = insertion_effects(S, L, x, chunk_size=333)
    base = reconstruction_mse(S, x)
    keep_all = torch.ones(S.n_latents, dtype=torch.bool)
    for j in torch.randperm(L.n_latents, generator=torch.Generator().manual_seed(0))[:8].tolist():
        add = torch.zeros(L.n_latents, dtype=torch.bool)
        add[j] = True
        brute = reconstruction_mse(stitch(S, L, keep_all, add), x) - base
        assert abs(float(effects.delta_mse[j]) - brute) <= 1e-9 * base, (j, effects.delta_mse[j], brute)
    assert torch.equal(effects.novel, effects.delta_mse < 0)
    assert rel(effects.mse_small, base) < 1e-12
    assert rel(effects.mse_large, float(evaluate(saes[large], x)["mse"][0])) < 1e-5  # evaluate is float32


def test_max_cosine_and_frequency(saes, x):
    S, L = SAEView.from_bank(saes["relu8"]), SAEView.from_bank(saes["relu16"])
    effects = insertion_effects(S, L, x)
    unit = lambda w: w / w.norm(dim=1, keepdim=True)  # noqa: E731
    dense = unit(L.W_dec) @ unit(S.W_dec).T
    torch.testing.assert_close(effects.max_cos, dense.max(1).values)
    assert torch.equal(effects.closest, dense.argmax(1))
    torch.testing.assert_close(effects.frequency, (L.encode(x) > 0).float().mean(0))
    values, index = max_cosine(L.W_dec, S.W_dec, chunk_size=3)
    assert torch.equal(index, effects.closest) and torch.allclose(values, effects.max_cos)


@pytest.mark.parametrize(
    "config",
    [
        StitchConfig(),
        StitchConfig(orphans="remove", bias="first"),
        StitchConfig(threshold=0.3, bias="last", chunk_size=211),
    ],
)
def test_every_step_of_the_path_is_the_stitched_sae_it_describes(saes, x, config):
    S, L = SAEView.from_bank(saes["relu8"]), SAEView.from_bank(saes["btk16"])
    path = interpolation_path(S, L, x, config=config)
    assert rel(path.mse[0], reconstruction_mse(S, x)) < 1e-12
    assert rel(path.mse[-1], reconstruction_mse(L, x)) < 1e-9 and path.endpoint_error < 1e-9 * path.mse_large
    assert path.n_latents[0] == 8 and path.n_latents[-1] == 16
    for step in range(len(path.moves) + 1):
        keep, add, bias = path.members(step)
        stitched = stitch(S, L, keep, add, bias=bias)
        assert rel(path.mse[step], reconstruction_mse(stitched, x)) < 1e-9, step
        assert path.n_latents[step] == stitched.n_latents
        assert abs(path.l0[step] - float((stitched.encode(x) != 0).sum(1).double().mean())) < 1e-9
    keep, add, bias = path.members(len(path.moves))
    assert not keep.any() and add.all() and bias == "large"
    np.testing.assert_allclose(np.diff(path.mse), path.delta, atol=1e-15)
    assert path.violations.tolist() == (np.flatnonzero(path.delta > config.monotone_tol * path.mse_small) + 1).tolist()
    assert path.summary()["steps"] == len(path.moves)


def stitched_after(S, L, members, move):
    """The stitched SAE one ``move`` past ``members``."""
    keep, add, bias = (m.clone() if torch.is_tensor(m) else m for m in members)
    keep[list(move.removed)] = False
    add[list(move.added)] = True
    return stitch(S, L, keep, add, bias="large" if move.kind == "bias" else bias)


@pytest.mark.parametrize("bias", ["ordered", "last"])
def test_each_step_makes_the_best_remaining_move(saes, x, bias):
    """Exact greedy: the MSE rises only where no remaining move would lower it."""
    S, L = SAEView.from_bank(saes["relu8"]), SAEView.from_bank(saes["btk16"])
    path = interpolation_path(S, L, x, config=StitchConfig(bias=bias))
    assert len(path.violations) > 0  # this pair is not monotone: the check below has increases to judge
    for step in range(1, len(path.moves) + 1):
        before = path.members(step - 1)
        remaining = [m for m in path.moves[step - 1 :] if bias == "ordered" or m.kind != "bias"]
        if not remaining:  # the pinned bias swap comes last
            assert path.moves[step - 1].kind == "bias" and step == len(path.moves)
            continue
        options = [reconstruction_mse(stitched_after(S, L, before, move), x) for move in remaining]
        assert path.mse[step] <= min(options) + 1e-6 * path.mse_small, step
        if step in path.violations:
            assert min(options) > path.mse[step - 1]


def test_stitching_an_sae_with_itself_changes_nothing(saes, x):
    S = SAEView.from_bank(saes["relu16"])
    path = interpolation_path(S, S, x)
    assert np.abs(path.mse - path.mse[0]).max() <= 1e-12 * path.mse[0]
    assert (path.n_latents == 16).all() and path.monotone and path.endpoint_error <= 1e-12 * path.mse[0]
    assert all(m.kind in ("swap", "bias") for m in path.moves)
    assert all(sorted(m.removed) == sorted(m.added) for m in path.moves)
    assert torch.equal(path.insertion.max_cos.round(decimals=5), torch.ones(16))


def test_chunking_does_not_change_the_path(saes, x):
    S, L = saes["relu8"], saes["relu16"]
    a, b = interpolation_path(S, L, x, config=StitchConfig(chunk_size=97)), interpolation_path(S, L, x)
    assert a.moves == b.moves
    np.testing.assert_allclose(a.mse, b.mse, rtol=1e-12)


def test_inserting_everything_into_an_empty_sae_gives_the_large_one(saes, x):
    L = SAEView.from_bank(saes["topk12"])
    path = interpolation_path(SAEView.empty(D, L.b_dec), L, x)
    assert [m.kind for m in path.moves].count("insert") == 12 and path.l0[0] == 0
    assert path.n_latents.tolist() == sorted(path.n_latents.tolist())
    assert rel(path.mse[-1], reconstruction_mse(L, x)) < 1e-9
    assert rel(path.mse[0], float((x - L.b_dec).square().mean())) < 1e-6


def oracle(atoms: torch.Tensor) -> SAEView:
    """An SAE that reads off the coefficients of orthonormal atoms exactly."""
    return SAEView(lambda x: (x @ atoms.T).relu(), atoms, torch.zeros(atoms.shape[1]), f"oracle({len(atoms)})")


def orthonormal_data():
    q = torch.linalg.qr(torch.randn(D, D, generator=torch.Generator().manual_seed(5), dtype=torch.float64))[0].float()
    data = sample_uniform(UniformOrganism(d=D, n_gt=D, s=3, n_samples=1000, seed=6))
    return q, data.codes @ q


def test_orthogonal_novel_latents_give_a_monotone_path_in_order_of_benefit():
    q, x = orthonormal_data()
    path = interpolation_path(oracle(q[:4]), oracle(q), x)
    effects = path.insertion
    assert effects.novel.tolist() == [False] * 4 + [True] * 4
    # Theory: each new orthogonal atom lowers the MSE by E[f_j^2] / d regardless of order.
    codes = x @ q[4:].T
    np.testing.assert_allclose(
        sorted(effects.delta_mse[4:].tolist()), sorted((-codes.square().mean(0) / D).tolist()), rtol=1e-5
    )
    assert path.monotone and np.all(np.diff(path.delta) >= 0)  # greedy: most beneficial first
    assert [m.kind for m in path.moves[:4]] == ["insert"] * 4
    assert path.mse[-1] < 1e-10


def test_forced_removals_are_reported_as_violations():
    q, x = orthonormal_data()
    path = interpolation_path(oracle(q), oracle(q[:4]), x, config=StitchConfig(orphans="remove"))
    removals = [t + 1 for t, m in enumerate(path.moves) if m.kind == "remove"]
    assert len(removals) == 4 and not path.monotone
    assert path.violations.tolist() == removals
    assert path.summary()["total_increase"] == pytest.approx(path.mse[-1] - path.mse[0], rel=1e-9)


def test_groups_partition_both_saes_and_follow_the_threshold(saes):
    S, L = SAEView.from_bank(saes["relu8"]), SAEView.from_bank(saes["relu16"])
    for threshold, orphans in ((0.7, "nearest"), (0.5, "remove"), (1.0, "remove"), (-1.0, "nearest")):
        moves = stitch_moves(S, L, threshold=threshold, orphans=orphans)
        assert sorted(i for m in moves for i in m.removed) == list(range(8))
        assert sorted(j for m in moves for j in m.added) == list(range(16))
        group_of = {("L", j): g for g, m in enumerate(moves) for j in m.added}
        group_of.update({("S", i): g for g, m in enumerate(moves) for i in m.removed})
        cos = torch.nn.functional.normalize(S.W_dec, dim=1) @ torch.nn.functional.normalize(L.W_dec, dim=1).T
        for i, j in (cos > threshold).nonzero().tolist():
            assert group_of["S", i] == group_of["L", j]
        if orphans == "remove":
            assert all(
                m.kind != "swap" or any(cos[i, j] > threshold for i in m.removed for j in m.added) for m in moves
            )
        else:
            assert all(m.kind in ("swap", "insert") for m in moves)
    assert len(stitch_moves(S, L, threshold=-1.0)) == 1  # every pair connected: one swap of everything


def test_bad_inputs_are_refused_with_the_fix(saes, x):
    S, L = saes["relu8"], saes["relu16"]
    other = SAEBank(SAEConfig("relu", d_model=6, n_latents=8))
    with pytest.raises(ValueError, match="d_model=8 but the large one d_model=6"):
        insertion_effects(S, other, x)
    with pytest.raises(ValueError, match=r"\[n_tokens >= 1, d_model=8\], got \(10, 5\)"):
        interpolation_path(S, L, torch.randn(10, 5))
    bad = x.clone()
    bad[0, 0] = float("nan")
    with pytest.raises(ValueError, match="NaN/Inf"):
        insertion_effects(S, L, bad)
    for threshold in (1.5, -1.01):
        with pytest.raises(ValueError, match=r"threshold is a cosine and must lie in \[-1, 1\]"):
            StitchConfig(threshold=threshold)
        with pytest.raises(ValueError, match="threshold"):
            stitch_moves(S, L, threshold=threshold)
    with pytest.raises(ValueError, match="orphans"):
        StitchConfig(orphans="keep")
    with pytest.raises(ValueError, match="bias must be"):
        StitchConfig(bias="middle")
    with pytest.raises(ValueError, match="max_gram_entries must be a positive integer"):
        StitchConfig(max_gram_entries=0)
    with pytest.raises(ValueError, match="max_gram_entries=100"):
        interpolation_path(S, L, x, config=StitchConfig(max_gram_entries=100))
    with pytest.raises(ValueError, match=r"bank of 2 seeds; pass bank\[i\]"):
        insertion_effects(SAEBank(SAEConfig("relu", d_model=D, n_latents=4, n_seeds=2)), L, x)
    with pytest.raises(ValueError, match="no inference threshold yet"):
        SAEView.from_bank(SAEBank(SAEConfig("batchtopk", d_model=D, n_latents=4, k=1)))
    broken = SAEView(lambda x: x[:, :3], torch.randn(4, D), torch.zeros(D), "broken")
    with pytest.raises(ValueError, match=r"broken.encode returned shape \(1500, 3\), expected \[1500, n_latents=4\]"):
        insertion_effects(S, broken, x)
    with pytest.raises(ValueError, match="W_dec must be"):
        SAEView(lambda x: x, torch.randn(4, D), torch.zeros(D + 1))
    with pytest.raises(ValueError, match="keep and add must be bool masks"):
        stitch(S, L, torch.ones(8, dtype=torch.bool), torch.ones(15, dtype=torch.bool))
    with pytest.raises(ValueError, match="max_code_entries=10"):
        interpolation_path(S, L, x, config=StitchConfig(max_code_entries=10))
    with pytest.raises(TypeError, match="SAEBank or SAEView"):
        insertion_effects(S.W_dec, L, x)
