"""Faults and bad inputs: nothing is silently wrong.

A checkpoint or cache entry is reused only when everything that determines it matches; a manifest
of the wrong shape or with edited content is treated as corrupt; a run that diverges says so; bad
devices, configuration fields and data are refused at the boundary with a message naming the input
and the fix; the CLI's chance level does not depend on the order of the runs; interrupted writes
leave no orphan for ever.
"""

import json
import os
import re
import time
import warnings

import numpy as np
import pytest
import torch

from paperlib.__main__ import main
from paperlib.atomic import atomic_path, is_temporary, temporary_dir
from paperlib.sae.bank import SAEBank, SAEConfig
from paperlib.sae.train import TrainConfig, train
from paperlib.sources import activations as A
from paperlib.sources.organism import UniformOrganism, sample_uniform
from paperlib.store import Store
from test_activations import cfg as activation_cfg
from test_activations import interrupt_extraction
from test_interop import _rand, write_saelens

ORGANISM = UniformOrganism(d=8, n_gt=12, s=2, n_samples=600, seed=0)
NO_CUDA = pytest.mark.skipif(torch.cuda.is_available(), reason="needs a machine without CUDA")


def bank(**overrides) -> SAEBank:
    fields = dict(d_model=8, n_latents=12, k=2, n_seeds=2, seed=1)
    fields.update(overrides)
    return SAEBank(SAEConfig("topk", **fields))


def _run(capsys, *argv) -> tuple[int, str, str]:
    code = main(list(argv))
    captured = capsys.readouterr()
    return code, captured.out, captured.err


# ------------------------------------------------------------- 1. resuming only the same run
@pytest.mark.parametrize(
    "change,field",
    [
        ({"lr": 3e-3}, "train.lr"),
        ({"steps": 8}, "train.steps"),
        ({"batch_size": 100}, "train.batch_size"),
        ({"data": True}, "data.sha256"),
        ({"rows": 500}, "data.shape"),
    ],
)
def test_a_checkpoint_of_another_schedule_or_data_is_refused(tmp_path, change, field):
    x = sample_uniform(ORGANISM).x
    base = dict(steps=4, lr=1e-3, log_every=2, checkpoint_fractions=(1.0,), checkpoint_dir=str(tmp_path / "run"))
    train(bank(), x, TrainConfig(**base), progress=False)
    change = dict(change)
    if change.pop("data", False):
        x = x.clone()
        x[17, 3] += 1e-3
    x = x[: change.pop("rows", len(x))]
    with pytest.raises(ValueError) as err:
        train(bank(), x, TrainConfig(**{**base, **change}), progress=False)
    message = str(err.value)
    assert str(tmp_path / "run") in message and field in message
    assert "use another checkpoint_dir" in message and "delete" in message


def test_the_same_run_still_resumes_and_a_record_less_checkpoint_is_refused(tmp_path):
    x = sample_uniform(ORGANISM).x
    cfg = TrainConfig(steps=4, lr=1e-3, log_every=2, checkpoint_fractions=(1.0,), checkpoint_dir=str(tmp_path))
    first = bank()
    train(first, x, cfg, progress=False)
    again = bank()
    train(again, x.numpy(), cfg, progress=False)  # same bytes as numpy: the same run, resumed at its end
    assert all(torch.equal(p, q) for p, q in zip(first.parameters(), again.parameters()))
    state = torch.load(tmp_path / "train_state.pt", weights_only=False)
    for key in ("sae", "train", "data"):
        del state[key]
    torch.save(state, tmp_path / "train_state.pt")
    with pytest.raises(ValueError, match="does not record the schedule and data"):
        train(bank(), x, cfg, progress=False)


# --------------------------------------------------------- 2, 3. manifests: shape and seal
@pytest.mark.parametrize("manifest", ["[]", "null", '{"files": []}', '{"files": {"tensors.safetensors": 1}}', '"x"'])
def test_store_manifest_of_the_wrong_shape_is_corrupt_and_recomputed(tmp_path, manifest):
    store = Store(tmp_path)
    entry = store.save("runs", {"a": 1}, {"w": torch.ones(3)}, {})
    (entry.path / "manifest.json").write_text(manifest)
    with pytest.warns(UserWarning, match="is corrupt"):
        assert store.load("runs", {"a": 1}) is None
    assert not entry.path.exists()
    assert torch.equal(store.cached("runs", {"a": 1}, lambda: ({"w": torch.zeros(2)}, {})).tensors["w"], torch.zeros(2))


def test_store_meta_of_the_wrong_shape_is_corrupt(tmp_path):
    from paperlib.store import file_sha256

    store = Store(tmp_path)
    entry = store.save("runs", {"a": 1}, {"w": torch.ones(3)}, {})
    (entry.path / "meta.json").write_text("[]")
    manifest = json.loads((entry.path / "manifest.json").read_text())
    manifest["files"]["meta.json"] = file_sha256(entry.path / "meta.json")
    (entry.path / "manifest.json").write_text(json.dumps(manifest))
    with pytest.warns(UserWarning, match="is corrupt"):
        assert store.load("runs", {"a": 1}) is None


@pytest.mark.parametrize("damage", ["list", "null", "no_plan", "bad_shards", "scale", "sumsq", "not_json"])
def test_activation_manifest_of_the_wrong_shape_or_edited_is_reextracted(tiny, tmp_path, damage):  # noqa: F811
    store = Store(tmp_path)
    config = activation_cfg(tiny)
    good = A.load_activations(config, store=store, progress=False)
    reference, scale = good.x.clone(), good.scale
    file = good.path / "manifest.json"
    manifest = json.loads(file.read_text())
    edits = {
        "list": [],
        "null": None,
        "no_plan": {**manifest, "plan": []},
        "bad_shards": {**manifest, "plan": {**manifest["plan"], "shards": [[0, 1]]}},
        "scale": {**manifest, "scale": manifest["scale"] * 2},
        "sumsq": {**manifest, "done": {**manifest["done"], "0": {**manifest["done"]["0"], "sumsq": 1.0}}},
    }
    file.write_text("{not json" if damage == "not_json" else json.dumps(edits[damage]))
    del good
    with pytest.warns(UserWarning, match="manifest.json") as record:
        fixed = A.load_activations(config, store=store, progress=False)
    assert [w.filename for w in record if "manifest.json" in str(w.message)] == [__file__]  # names the caller
    assert fixed.meta["extraction"]["shards_this_run"] == [0, 1, 2, 3, 4]
    assert torch.equal(fixed.x, reference) and fixed.scale == scale


def test_activation_manifests_from_before_the_seal_are_checked_and_sealed(tiny, tmp_path):  # noqa: F811
    store = Store(tmp_path)
    config = activation_cfg(tiny)
    good = A.load_activations(config, store=store, progress=False)
    file = good.path / "manifest.json"
    legacy = json.loads(file.read_text())
    del legacy["sha256"]
    file.write_text(json.dumps(legacy, indent=1))
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        again = A.load_activations(config, store=store, progress=False)  # consistent: accepted, not re-extracted
    assert again.scale == good.scale and "sha256" in json.loads(file.read_text())
    file.write_text(json.dumps({**legacy, "scale": legacy["scale"] * 1.5}))
    with pytest.warns(UserWarning, match="scale does not agree"):
        assert A.load_activations(config, store=store, progress=False).scale == good.scale


def test_an_edited_or_malformed_journal_is_ignored_not_trusted(tiny, tmp_path, monkeypatch):  # noqa: F811
    config = activation_cfg(tiny)
    reference = A.load_activations(config, store=Store(tmp_path / "ref"), progress=False)
    store = Store(tmp_path / "run")
    interrupt_extraction(config, store)
    journal_file = store.root / "activations" / reference.path.name / "progress.json"
    journal = json.loads(journal_file.read_text())
    journal["done"]["0"]["sumsq"] *= 4  # would change the scale
    journal_file.write_text(json.dumps(journal))
    with pytest.warns(UserWarning, match="progress.json does not match its own hash") as record:
        resumed = A.load_activations(config, store=store, progress=False)
    assert [w.filename for w in record if "progress.json" in str(w.message)] == [__file__]  # names the caller
    assert resumed.meta["extraction"]["shards_this_run"] == [0, 1, 2, 3, 4] and resumed.scale == reference.scale


# --------------------------------------------------------------- 4. divergence is reported
def test_a_finite_divergence_warns_with_the_numbers_and_the_fix():
    x = sample_uniform(ORGANISM).x
    sae = SAEBank(SAEConfig("relu", d_model=8, n_latents=12, n_seeds=2))
    with pytest.warns(RuntimeWarning, match=r"training diverged .* seed 0: loss [\d.]+ -> [\d.]+, FVU") as record:
        history = train(sae, x, TrainConfig(steps=40, lr=3.0, log_every=20), progress=False)
    message = str(record[0].message)
    assert "SAEConfig(architecture='relu'" in message and "lower TrainConfig.lr (now 3)" in message
    assert np.isfinite(history["loss"]).all() and history.final("fvu").min() > 1


def test_a_run_that_learns_stays_silent():
    x = sample_uniform(ORGANISM).x
    with warnings.catch_warnings():
        warnings.simplefilter("error", RuntimeWarning)
        for lr in (3e-3, 3e-1):
            train(bank(), x, TrainConfig(steps=40, lr=lr, batch_size=200, log_every=10), progress=False)


# ------------------------------------------------------------------- 5. unavailable devices
@NO_CUDA
def test_cuda_without_cuda_is_refused_up_front_everywhere(capsys, tmp_path, monkeypatch):
    from paperlib.metrics.consistency import chance_mcc, match, pw_mcc
    from paperlib.metrics.matching import match as sparse_match
    from paperlib.runtime import device, resolve_device

    with pytest.raises(ValueError, match=r"device='cuda': cuda is not available on this machine; use device='cpu'"):
        resolve_device("cuda")
    small = np.eye(4)
    for call in (
        lambda: match(small, small, device="cuda"),
        lambda: pw_mcc([small, small], device="cuda"),
        lambda: chance_mcc(4, 4, 4, n_samples=1, device="cuda"),
        lambda: sparse_match(small, small, device="cuda"),
    ):
        with pytest.raises(ValueError, match="cuda is not available"):
            call()
    assert str(resolve_device("auto")) == str(resolve_device(None)) == "cpu"
    monkeypatch.setenv("PAPERLIB_DEVICE", "cuda")
    with pytest.raises(ValueError, match="PAPERLIB_DEVICE='cuda'.*unset it"):
        device()
    monkeypatch.delenv("PAPERLIB_DEVICE")
    run = str(write_saelens(tmp_path / "a", _rand(8, 4)))
    started = time.perf_counter()
    code, out, err = _run(capsys, "consistency", run, run, "--device", "cuda")
    assert code == 2 and out == "" and time.perf_counter() - started < 5
    assert "--device cuda: cuda is not available on this machine; use --device cpu or --device auto" in err


# ------------------------------------------------- 6. CLI: chance per pair, zero rows, certified
@pytest.fixture(scope="module")
def widths(tmp_path_factory) -> dict[str, str]:
    root = tmp_path_factory.mktemp("widths")
    return {f"w{n}": str(write_saelens(root / f"w{n}", _rand(n, 8, seed=n))) for n in (16, 24, 40)}


def test_chance_level_is_the_mean_over_pairs_whatever_the_order(capsys, widths):
    from paperlib.metrics.consistency import chance_mcc, chance_pw_mcc

    orders = [["w16", "w16", "w24", "w40"], ["w40", "w24", "w16", "w16"], ["w24", "w16", "w40", "w16"]]
    chances = []
    for order in orders:
        code, out, _ = _run(capsys, "consistency", *(widths[w] for w in order), "--json", "--chance-samples", "2")
        assert code == 0
        chances.append(json.loads(out)["chance"])
    assert chances[0] == chances[1] == chances[2]
    per_pair = [
        chance_mcc(min(a, b), max(a, b), 8, n_samples=2).mean
        for a, b in [(16, 16), (16, 24), (16, 40), (16, 24), (16, 40), (24, 40)]
    ]
    assert chances[0]["mean"] == pytest.approx(np.mean(per_pair), abs=1e-12)
    assert chance_pw_mcc([16, 24, 40], 8, n_samples=2).mean == pytest.approx(
        chance_pw_mcc([40, 16, 24], 8, n_samples=2).mean, abs=0
    )
    code, out, _ = _run(capsys, "consistency", *(widths[w] for w in orders[1]), "--chance-samples", "2")
    assert "mean over the 6 pairs of each pair's chance level" in out and "16 x 40" in out


def test_the_table_says_whether_matchings_are_certified(capsys, widths):
    code, out, _ = _run(capsys, "consistency", widths["w16"], widths["w24"], "--chance-samples", "0")
    assert code == 0 and "matchings: all 1 certified optimal" in out


@pytest.mark.parametrize("signed", [True, False])
def test_zero_rows_score_zero_at_every_size(monkeypatch, signed):
    """Above DENSE_LIMIT (lowered here so that tiny problems take the sparse path) zero rows are
    scored like below it: cosine 0, still matched; checked against scipy on the full matrix."""
    from scipy.optimize import linear_sum_assignment

    import paperlib.metrics.consistency as C

    monkeypatch.setattr(C, "DENSE_LIMIT", 4)
    rng = np.random.default_rng(3)
    for _ in range(60):
        n_a, n_b, d = int(rng.integers(5, 13)), int(rng.integers(5, 13)), int(rng.integers(2, 6))
        a, b = rng.standard_normal((n_a, d)), rng.standard_normal((n_b, d))
        a[rng.random(n_a) < rng.random()] = 0
        b[rng.random(n_b) < rng.random()] = 0
        result = C.match(a, b, signed=signed)
        sim = C.as_dictionary(a) @ C.as_dictionary(b).T
        sim = sim if signed else np.abs(sim)
        rows, cols = linear_sum_assignment(sim, maximize=True)
        assert result.certified and result.mcc == pytest.approx(sim[rows, cols].mean(), abs=1e-12)
        assert len(set(result.rows)) == len(set(result.cols)) == min(n_a, n_b)
        np.testing.assert_allclose(sim[result.rows, result.cols], result.similarity, atol=1e-12)


def test_cli_reports_zero_rows_and_can_drop_them(capsys, tmp_path):
    W = _rand(12, 8, seed=5)
    dead = W.clone()
    dead[:3] = 0
    a, b = str(write_saelens(tmp_path / "a", W)), str(write_saelens(tmp_path / "b", dead))
    code, out, _ = _run(capsys, "consistency", a, b, "--chance-samples", "0")
    assert code == 0 and "3 zero-norm rows scored 0; --drop-dead leaves them out" in out
    assert "PW-MCC = 0.7500" in out
    code, out, _ = _run(capsys, "consistency", a, b, "--json", "--drop-dead", "--chance-samples", "1")
    result = json.loads(out)
    assert result["pw_mcc"] == pytest.approx(1.0) and [r["zero_rows"] for r in result["runs"]] == [0, 3]
    assert result["chance"]["by_widths"][0]["n_a"] == 9 and result["chance"]["by_widths"][0]["n_b"] == 12
    assert result["pairs"][0]["rows"] == list(range(3, 12))  # the live latents, by their own index
    assert result["stability"]["latents"][1][:3] == [[None]] * 3  # dropped, not scored


# -------------------------------------------------------------------- 7. bad training inputs
@pytest.mark.parametrize(
    "fields,message",
    [
        ({"k": True}, r"needs 1 <= k <= n_latents=12, got k=True"),
        ({"d_model": True}, "SAEConfig.d_model must be a positive integer, got True"),
        ({"aux_k": -1}, r"SAEConfig.aux_k must be a positive integer or None"),
        ({"aux_k": True}, r"SAEConfig.aux_k must be a positive integer or None"),
        ({"l1_coeff": "1e-3"}, "SAEConfig.l1_coeff must be a finite number, got '1e-3'"),
        ({"init_scale": float("inf")}, "SAEConfig.init_scale must be a finite number"),
        ({"seed": 1.5}, "SAEConfig.seed must be an integer"),
    ],
)
def test_bad_sae_config_fields_are_refused(fields, message):
    with pytest.raises(ValueError, match=message):
        SAEConfig("topk", **{**dict(d_model=8, n_latents=12, k=2), **fields})


@pytest.mark.parametrize(
    "fields,message",
    [
        ({"steps": True}, "TrainConfig.steps must be a positive integer, got True"),
        ({"batch_size": True}, "TrainConfig.batch_size must be a positive integer or None"),
        ({"lr": "1e-3"}, r"TrainConfig.lr must be a positive finite number \(e.g. 1e-3\), got '1e-3'"),
        ({"lr": float("inf")}, "TrainConfig.lr must be a positive finite number"),
        ({"seed": False}, "TrainConfig.seed must be an integer"),
        ({"normalize": 1}, "TrainConfig.normalize must be True or False"),
        ({"decay_fraction": "0.1"}, "TrainConfig.decay_fraction must be a number"),
        ({"checkpoint_fractions": ("0.5",)}, "TrainConfig.checkpoint_fractions must be a tuple of numbers"),
    ],
)
def test_bad_train_config_fields_are_refused(fields, message):
    with pytest.raises(ValueError, match=message):
        TrainConfig(**{"steps": 10, **fields})


def test_bad_training_data_is_refused_and_numpy_is_accepted():
    cfg = TrainConfig(steps=3, lr=1e-3, log_every=3)
    with pytest.raises(ValueError, match=r"training data has no rows \(shape \(0, 8\)\)"):
        train(bank(), torch.zeros(0, 8), cfg, progress=False)
    with pytest.raises(ValueError, match="must be a torch.Tensor or numpy array .* got list"):
        train(bank(), [[0.0] * 8], cfg, progress=False)
    with pytest.raises(ValueError, match="floating-point activations, got dtype torch.int64"):
        train(bank(), torch.ones(10, 8, dtype=torch.long), cfg, progress=False)
    x = sample_uniform(ORGANISM).x
    from_tensor, from_numpy = bank(), bank()
    train(from_tensor, x, cfg, progress=False)
    train(from_numpy, x.numpy().astype(np.float64), cfg, progress=False)  # converted to float32 like a tensor
    assert all(torch.equal(p, q) for p, q in zip(from_tensor.parameters(), from_numpy.parameters()))


# ------------------------------------------------------------- 8. orphans of interrupted writes
def _age(path, seconds):
    old = time.time() - seconds
    for p in [path, *path.rglob("*")] if path.is_dir() else [path]:
        os.utime(p, (old, old))


def test_temporaries_are_recognisable_and_stale_ones_are_removed(capsys, tmp_path, monkeypatch):
    root = tmp_path / "cache"
    target = root / "sae" / "numbers.json"
    with pytest.raises(KeyboardInterrupt):
        with atomic_path(target) as tmp:
            assert is_temporary(tmp.name) and tmp.suffix == ".json"
            raise KeyboardInterrupt
    orphan_file = root / "sae" / ".state.pt.abcd1234.paperlib-tmp.pt"  # as a killed atomic_path leaves it
    orphan_file.write_bytes(b"x" * 100)
    orphan_dir = temporary_dir(root / "sae", "0123456789abcdef0123")
    (orphan_dir / "tensors.safetensors").write_bytes(b"y" * 100)
    legacy = root / "sae" / ".0123456789abcdef0123.k2j3h4g5"  # a store temporary from before the tag
    legacy.mkdir()
    fresh = root / "sae" / ".numbers.json.q1w2e3r4.paperlib-tmp.json"  # a concurrent writer's
    fresh.write_text("{}")
    keep = root / "sae" / "key0"
    keep.mkdir()
    (keep / "tensors.safetensors").write_bytes(b"z")
    for path in (orphan_file, orphan_dir, legacy):
        _age(path, 2 * 3600)
    monkeypatch.setenv("PAPERLIB_CACHE", str(root))
    code, out, _ = _run(capsys, "cache", "info", "--json")
    info = json.loads(out)
    assert info["temporaries"]["count"] == 4 and info["temporaries"]["stale"] == 3
    assert info["namespaces"][0]["entries"] == 1
    code, out, _ = _run(capsys, "cache", "info")
    assert re.search(
        r"temporary files of interrupted writes: 4 .* 3 older than 60 min; `python -m paperlib "
        r"cache clean`",
        out,
    )
    code, out, _ = _run(capsys, "cache", "clean")
    assert code == 0 and "removed 3 temporary file(s)" in out
    assert fresh.exists() and keep.exists() and not any(p.exists() for p in (orphan_file, orphan_dir, legacy))
    assert _run(capsys, "cache", "clean", "--max-age", "-1")[0] == 2


def test_opening_a_store_removes_stale_temporaries_once(tmp_path):
    stale = temporary_dir(tmp_path / "runs", "abc")
    fresh = temporary_dir(tmp_path / "runs", "def")
    _age(stale, 2 * 3600)
    Store(tmp_path)
    assert not stale.exists() and fresh.exists()


def test_a_checkpoint_dir_sheds_its_stale_temporaries(tmp_path):
    orphan = tmp_path / ".train_state.pt.abcd1234.paperlib-tmp.pt"
    orphan.write_bytes(b"half a checkpoint")
    _age(orphan, 2 * 3600)
    cfg = TrainConfig(steps=2, lr=1e-3, log_every=2, checkpoint_fractions=(1.0,), checkpoint_dir=str(tmp_path))
    train(bank(), sample_uniform(ORGANISM).x, cfg, progress=False)
    assert not orphan.exists() and (tmp_path / "train_state.pt").exists()
