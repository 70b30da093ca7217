"""The paper profile's path in miniature: notebooks 06 and 11 (paper A) and 08-10 (paper B) run as the paper
profile runs them (source: stream, the L1 family uncalibrated), on random Pythia- and GPT-2-shaped models built in
code and a local corpus, their sweeps split into real subprocess jobs by submitit's local executor. Everything the
paper profile does runs here except the hub download and CUDA kernels."""

import json

import pytest

from paperlib.runs.sweep import NAMESPACE

pytest.importorskip("submitit")
papermill = pytest.importorskip("papermill")

from conftest import N_LAYERS  # noqa: E402
from test_notebooks import NOTEBOOKS  # noqa: E402


def paper_shaped(tiny, family: str) -> dict:
    """What the paper profile sets, at the tiny models' scale."""
    return dict(model=tiny["models"][family], layer=N_LAYERS - 2, corpus=tiny["corpus"], context_length=16,
                n_tokens=16 * 40, eval_rows=256, steps=24, batch_size=64, lr=3e-3, warmup_steps=3,
                calibrate_l1=False, source="stream", executor="local", jobs=2, device="cpu",
                precision="bf16")  # fmt: skip  # the paper profile's "native" on its GPU, whatever CPU runs the test


def run(number: str, parameters: dict, root) -> dict:
    """The notebook run by papermill with its cache and figures under ``root`` (as ``make figures`` runs it)."""
    source = next(p for p in NOTEBOOKS if p.stem.startswith(number))
    papermill.execute_notebook(str(source), str(root / source.name), parameters=parameters,
                               cwd=str(source.parent), progress_bar=False)  # fmt: skip
    return json.loads((root / "figures" / "smoke" / f"{source.stem}.json").read_text())


def sweep_entries(root) -> list:
    return sorted((root / "cache" / NAMESPACE).glob("*"))


@pytest.fixture
def place(tmp_path, monkeypatch):
    monkeypatch.setenv("PAPERLIB_CACHE", str(tmp_path / "cache"))
    monkeypatch.setenv("PAPERLIB_FIGURES", str(tmp_path / "figures"))
    return tmp_path


@pytest.fixture(scope="module")
def paper_b(tiny, tmp_path_factory):
    """One cache for paper B's three notebooks, as in a profile run: 09 and 10 reuse 08's families."""
    root = tmp_path_factory.mktemp("paper-b")
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("PAPERLIB_CACHE", str(root / "cache"))
        patch.setenv("PAPERLIB_FIGURES", str(root / "figures"))
        shared = dict(widths=[32, 64, 128], bridge_width=64, sparsity=4)
        yield root, {**paper_shaped(tiny, "gpt2"), **shared}


def test_notebooks_06_and_11_as_the_paper_profile_runs_them(tiny, place):
    numbers = run("06", {**paper_shaped(tiny, "gpt_neox"), "n_latents": 64, "sparsities": [4, 8], "zipf_tokens": 2000,
                         "loss_contexts": 2, "chance_samples": 2}, place)  # fmt: skip
    runs = numbers["runs"]
    assert len(runs) == 8 * 2 and all(r["l1_calibration"] is None for r in runs.values())
    # every configuration trained from the stream by the sweep's jobs (plus 06's fp32 check), none from the cache
    assert len(sweep_entries(place)) == 8 * 2 + 1 and not (place / "cache" / "llm-sae").exists()
    assert list((place / "cache" / "sweep_jobs").glob("*_0_log.out"))  # submitit's job logs: real subprocesses
    assert numbers["setting"]["rows"] > 256 and all(0 < r["fvu"] < 1.5 for r in runs.values())
    # 11's doubling study from the same stream: its grid's top budget is 06's (reused), the smaller one is new,
    # and both of its architectures at that budget train in one sweep before the study reads them back
    before = sweep_entries(place)
    study = run("11", {**paper_shaped(tiny, "gpt_neox"), "n_latents": 64, "architectures": ["topk", "relu"],
                       "sparsity": 4, "token_grid": [768, 1536], "chance_samples": 2}, place)  # fmt: skip
    assert len(sweep_entries(place)) == len(before) + 2
    assert [p["tokens"] for p in study["studies"]["relu"]] == [768, 1536]
    assert all(p["passes"] is None for p in study["studies"]["topk"])  # a stream makes no second pass


def test_notebooks_08_to_10_as_the_paper_profile_runs_them(paper_b):
    root, parameters = paper_b
    numbers = run("08", {**parameters, "path_tokens": 64}, root)
    assert numbers["setting"]["widths"] == [32, 64, 128]
    assert len(sweep_entries(root)) == 2 * 3 and not (root / "cache" / "llm-sae").exists()  # both families, streamed
    run("09", {**parameters, "meta_steps": 20, "saebench_steps": 10, "explorer_latents": 10}, root)
    trained = sweep_entries(root)
    run("10", {**parameters, "meta_steps": 20, "chance_samples": 2, "n_boot": 50}, root)
    assert sweep_entries(root) == trained, "10 reuses 08's and 09's streamed SAEs: it trains none"
    assert not (root / "cache" / "llm-sae").exists()
