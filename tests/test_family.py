"""The SAE family (notebooks 08-10): 06's rules per width, distinct seeds, cached stitching results equal
to direct computation, and the self-contained HTML explorer."""

import json
import math
import re
from dataclasses import replace

import numpy as np
import pytest
import torch

from paperlib.explorer import write_explorer
from paperlib.explain.contexts import top_tokens
from paperlib.metrics.stability import cross_seed_similarity
from paperlib.runs.family import FamilyConfig, cached_insertion, cached_path, cached_top_contexts, train_family
from paperlib.sources.activations import MemoryActivations
from paperlib.stitching.path import path_from_tensors, path_tensors
from paperlib.stitching.stitch import novel_fraction
from paperlib.runs.zoo import llm_schedule
from paperlib.sae.bank import SAEBank
from paperlib.sae.train import PAPER_CHECKPOINTS
from paperlib.sae.zoo_presets import zoo_config
from paperlib.sources.organism import UniformOrganism, sample_uniform
from paperlib.stitching.path import interpolation_path
from paperlib.stitching.stitch import insertion_effects, max_cosine
from paperlib.store import Store

D = 8


@pytest.fixture(scope="module")
def store(tmp_path_factory):
    return Store(tmp_path_factory.mktemp("family-cache"))


@pytest.fixture(scope="module")
def acts():
    x = sample_uniform(UniformOrganism(d=D, n_gt=16, s=2, n_samples=1200, seed=5)).x
    return MemoryActivations(x, "organism d8")


@pytest.fixture(scope="module")
def family(acts, store):
    config = FamilyConfig("batchtopk", widths=(8, 16, 32), sparsity=2, seed=7, bridge_width=16, bridge_seeds=2)
    schedule = llm_schedule(steps=60, lr=3e-3, batch_size=200, seed=7, eval_rows=200, warmup_steps=5)
    return train_family(acts, config, schedule, eval_rows=200, store=store)


def test_config_rejects_bad_input_by_name():
    with pytest.raises(ValueError, match="architecture"):
        FamilyConfig("mystery", widths=(8, 16))
    with pytest.raises(ValueError, match="increasing"):
        FamilyConfig("relu", widths=(16, 8))
    with pytest.raises(ValueError, match="increasing"):
        FamilyConfig("relu", widths=(16,))
    with pytest.raises(ValueError, match="bridge_width"):
        FamilyConfig("relu", widths=(8, 16), sparsity=2, bridge_width=12)
    with pytest.raises(ValueError, match="sparsity"):
        FamilyConfig("topk", widths=(8, 16), sparsity=9)
    with pytest.raises(KeyError, match="not in the family"):
        FamilyConfig("relu", widths=(8, 16), sparsity=2).member_seed(32)


def test_each_width_follows_the_zoo_rule_of_notebook_06_with_its_own_seed():
    config = FamilyConfig("batchtopk", widths=(288, 576, 1152, 2304), sparsity=32, seed=42, bridge_width=1152)
    bridge = config.sae_config(1152, 576)
    assert bridge == replace(
        zoo_config("batchtopk", d_model=576, n_latents=1152, sparsity=32, data_scale=1.0, n_seeds=3, seed=42),
        aux_coeff=1 / 32,
    )  # 06's run: a cache hit
    relu = FamilyConfig("relu", widths=(288, 576), sparsity=32).sae_config(576, 576)
    assert (
        relu.aux_coeff == 0
        and relu.l1_coeff == zoo_config("relu", d_model=576, n_latents=576, sparsity=32, data_scale=1.0).l1_coeff
    )
    seeds = [config.member_seed(w) + i for w in config.widths for i in range(config.n_seeds(w))]
    assert len(set(seeds)) == len(seeds), seeds
    schedule = llm_schedule(steps=800, lr=1e-3, batch_size=1024, seed=42, eval_rows=16384, warmup_steps=50)
    assert schedule.checkpoint_fractions == PAPER_CHECKPOINTS and schedule.eval_rows == 4096
    assert config.schedule_for(1152, schedule) == schedule
    assert config.schedule_for(576, schedule).checkpoint_fractions == ()


def test_distinct_seeds_avoid_shared_initial_dictionaries():
    # Same seed, two widths: the smaller initial dictionary is a prefix of the larger one.
    small, large = (
        SAEBank(zoo_config("relu", d_model=D, n_latents=n, sparsity=2, data_scale=1.0, seed=3)) for n in (16, 32)
    )
    assert torch.equal(small.W_dec[0], large.W_dec[0, :16])
    config = FamilyConfig("relu", widths=(16, 32), sparsity=2, seed=3)
    a, b = (SAEBank(config.sae_config(w, D)) for w in config.widths)
    assert max_cosine(a.W_dec[0], b.W_dec[0])[0].max() < 0.999


def test_train_family_reuses_the_cache_and_marks_dead_latents(family, acts, store):
    assert family.run(16).bank.n_seeds == 2 and family.run(8).bank.n_seeds == 1
    assert sorted(family.run(16).checkpoints) and not family.run(32).checkpoints
    again = train_family(
        acts,
        family.config,
        llm_schedule(steps=60, lr=3e-3, batch_size=200, seed=7, eval_rows=200, warmup_steps=5),
        eval_rows=200,
        store=store,
    )
    for w in family.widths:
        assert again.runs[w].key == family.runs[w].key
        assert torch.equal(again.runs[w].bank.W_dec, family.runs[w].bank.W_dec)
    assert family.window == 1000  # 1000 training rows, 60 x 200 tokens seen: one epoch
    alive = family.alive(32)
    assert alive.shape == (32,) and alive.dtype == torch.bool
    assert torch.equal(alive, family.run(32).bank.tokens_since_fired[0] < 1000)
    assert family.view(16, seed=1).n_latents == 16
    with pytest.raises(IndexError):
        family.view(8, seed=1)


def test_cached_stitching_equals_the_direct_computation(family, acts, store):
    x = acts.fp32(slice(1000, 1200))
    small, large = family.view(8), family.view(16, seed=1)
    key = {"small": family.ref(8), "large": family.ref(16, 1), "data": "last 200 rows"}
    direct = interpolation_path(small, large, x)
    for _ in range(2):  # computed, then loaded
        path = cached_path(small, large, x, key, store=store)
        for name in ("n_latents", "mse", "l0", "delta", "violations"):
            np.testing.assert_array_equal(getattr(path, name), getattr(direct, name))
        assert path.moves == direct.moves and path.sizes == (8, 16)
        torch.testing.assert_close(path.insertion.delta_mse, direct.insertion.delta_mse)
    assert path.endpoint_error < 1e-9 * path.mse_large
    back = path_from_tensors(*path_tensors(direct))
    assert back.summary() == direct.summary()
    ins = cached_insertion(small, large, x, key, store=store)
    torch.testing.assert_close(ins.delta_mse, insertion_effects(small, large, x).delta_mse)
    assert novel_fraction(ins) == ins.fraction_novel
    assert math.isnan(novel_fraction(ins, alive=torch.zeros(16, dtype=torch.bool)))  # no live latent: undefined
    first = torch.arange(16) < 4
    assert novel_fraction(ins, alive=first) == float(ins.novel[:4].double().mean())


def test_top_contexts_and_tokens(family, acts, store):
    x = acts.fp32(slice(1000, 1200))
    view = family.view(32)
    found = cached_top_contexts(view, x, {"sae": family.ref(32), "data": "last 200 rows"}, n_top=4, store=store)
    codes = view.encode(x)
    for latent in range(32):
        fired = int((codes[:, latent] > 0).sum())
        assert int(found.n_fired[0, latent]) == fired
        if fired:
            assert float(found.values[0, latent, 0]) == pytest.approx(float(codes[:, latent].max()))
    tokens = top_tokens(found, lambda row: f" t{row % 3}", n=2)
    assert len(tokens) == 32 and all(len(t) <= 2 and all(s.startswith("t") for s in t) for t in tokens)


def test_memory_activations_reject_bad_input():
    with pytest.raises(ValueError, match="float tensor"):
        MemoryActivations(torch.ones(5, dtype=torch.long))
    with pytest.raises(ValueError, match="NaN"):
        MemoryActivations(torch.tensor([[1.0, float("nan")], [0.0, 1.0]]))
    a, b = MemoryActivations(torch.ones(3, 2)), MemoryActivations(2 * torch.ones(3, 2))
    assert a.config != b.config and a.config == MemoryActivations(torch.ones(3, 2)).config


def test_explorer_is_self_contained_and_escapes_text(tmp_path):
    latents = [
        {
            "id": 3,
            "label": "Paris",
            "frequency": 0.01,
            "contexts": ["in «Paris»</script><b>x</b>"],
            "parts": [[0, 0.5]],
            "cosine": 0.9,
            "tags": ["example"],
            "neighbours": [{"sae": "288", "latent": 7, "cos": 0.8, "label": "France"}],
        },
        {"id": 5, "label": "the", "frequency": 0.2, "contexts": []},
    ]
    meta = {0: {"label": "cities", "frequency": 0.02, "members": [[3, 0.5, "Paris"]]}}
    path = write_explorer(tmp_path / "x.html", "Explorer <test>", "notes", latents, meta_latents=meta)
    page = path.read_text()
    assert not re.search(r"(src|href)\s*=|https?://|@import", page), "the page must load nothing from outside"
    assert "<b>x</b>" not in page and "Explorer &lt;test&gt;" in page
    blob = re.search(r'<script type="application/json" id="data">(.*?)</script>', page, re.S).group(1)
    data = json.loads(blob)
    assert data["latents"][0]["contexts"][0] == latents[0]["contexts"][0]
    assert data["meta_latents"]["0"]["members"] == [[3, 0.5, "Paris"]]
    with pytest.raises(ValueError, match=r"latents\[1\] has no 'label'"):
        write_explorer(
            tmp_path / "y.html", "t", "n", [latents[0], {"id": 1, "frequency": 0.1, "contexts": []}], meta_latents=meta
        )
    with pytest.raises(ValueError, match="meta-latent id"):
        write_explorer(tmp_path / "y.html", "t", "n", [{**latents[0], "parts": [[9, 1.0]]}], meta_latents=meta)
    with pytest.raises(ValueError, match="appears twice"):
        write_explorer(tmp_path / "y.html", "t", "n", [latents[1], latents[1]])
    with pytest.raises(ValueError, match="finite"):
        write_explorer(tmp_path / "y.html", "t", "n", [{**latents[1], "frequency": float("nan")}])
    assert not (tmp_path / "y.html").exists()


def test_cross_seed_similarity_counts_each_pair_from_both_sides():
    from paperlib.metrics.consistency import pw_mcc

    gen = torch.Generator().manual_seed(0)
    base = torch.randn(12, D, generator=gen)
    runs = [base + 0.1 * torch.randn(12, D, generator=gen) for _ in range(3)]
    pw = pw_mcc(runs)
    sim = cross_seed_similarity(pw.matches, pw.pairs, 3, 12)
    assert sim.shape == (3, 12)
    np.testing.assert_allclose(sim.mean(1).mean(), pw.mean, rtol=1e-12)  # each pair counted from both sides
    mcc = {(i, j): value for i, j, value in pw.pairs}
    assert sim[0].mean() == pytest.approx((mcc[0, 1] + mcc[0, 2]) / 2)  # run 0: its pairs with runs 1 and 2
