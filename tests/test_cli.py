"""``python -m paperlib`` end to end on SAE files written here in every supported layout.

The main cases run the real interpreter in subprocesses, started together so their start-up
(importing torch) overlaps; the remaining variants call ``main(argv)`` in-process, which runs the
same code path from argument parsing to exit code.
"""

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from paperlib.__main__ import main
from test_interop import _LinearSAE, _rand, write_dictionary_learning, write_saelens, write_sparsify

D, N = 16, 32
REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def runs(tmp_path_factory) -> dict[str, str]:
    """One dictionary in three layouts (a copy, and a permuted, rescaled copy), unrelated random
    dictionaries, a sign-flipped copy, one of another d_model, and a corrupt run."""
    root = tmp_path_factory.mktemp("runs")
    W = _rand(N, D, seed=10)
    perm = torch.randperm(N, generator=torch.Generator().manual_seed(0))
    scaled = W[perm] * torch.linspace(0.2, 5.0, N)[:, None]
    flipped = W.clone()
    flipped[:4] *= -1
    paths = {
        "a": write_saelens(root / "a", W),
        "copy": write_sparsify(root / "copy", W.clone()),
        "perm": write_dictionary_learning(root / "perm", _LinearSAE(D, N, scaled).state_dict(), "BatchTopKSAE", D, N),
        "rand1": write_saelens(root / "rand1", _rand(N, D, seed=11)),
        "rand2": write_saelens(root / "rand2", _rand(N, D, seed=12)),
        "flip": write_saelens(root / "flip", flipped),
        "wide": write_saelens(root / "wide", _rand(N, D + 4, seed=13)),
        "corrupt": write_saelens(root / "corrupt", W),
    }
    (paths["corrupt"] / "sae_weights.safetensors").write_bytes(b"\x07not safetensors")
    return {k: str(v) for k, v in paths.items()}


@pytest.fixture(scope="module")
def cli(runs) -> dict[str, subprocess.CompletedProcess]:
    """Run the subprocess cases concurrently; each finishes before any test reads it."""
    cases = {
        "same": [runs["a"], runs["copy"], runs["perm"]],
        "random": [runs["a"], runs["rand1"], runs["rand2"], "--json"],
        "wide": [runs["a"], runs["copy"], runs["wide"]],
    }
    env = {**os.environ, "PAPERLIB_COMPILE": "0", "PYTHONPATH": str(REPO)}
    procs = {
        name: subprocess.Popen(
            [sys.executable, "-m", "paperlib", "consistency", *args],
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
            env=env,
            cwd=REPO,
        )
        for name, args in cases.items()
    }
    done = {}
    for name, proc in procs.items():
        out, err = proc.communicate(timeout=120)
        done[name] = subprocess.CompletedProcess(proc.args, proc.returncode, out, err)
    return done


def test_identical_and_permuted_rescaled_copies_score_one(cli, runs):
    res = cli["same"]
    assert res.returncode == 0, res.stderr
    assert "PW-MCC = 1.0000 ± 0.0000 over 3 pairs" in res.stdout
    assert "signed cosine" in res.stdout and "chance  = 0.4" in res.stdout
    for run, layout in (("a", "saelens"), ("copy", "sparsify"), ("perm", "dictionary_learning")):
        assert f"{runs[run]}  ({layout}, {N} latents)" in res.stdout


def test_random_runs_score_near_chance_and_json_is_a_valid_document(cli, runs):
    from paperlib.metrics.consistency_json import validate

    res = cli["random"]
    assert res.returncode == 0, res.stderr
    out = validate(json.loads(res.stdout))
    assert out["certified"] is True and out["schema_version"] == 1
    assert [r["n_latents"] for r in out["runs"]] == [N, N, N] and out["d_model"] == D and out["cosine"] == "signed"
    assert [r["layout"] for r in out["runs"]] == ["saelens"] * 3 and out["chance"]["samples"] == 3
    assert [r["path"] for r in out["runs"]] == [runs["a"], runs["rand1"], runs["rand2"]]
    assert [(p["a"], p["b"]) for p in out["pairs"]] == [(0, 1), (0, 2), (1, 2)]
    mccs = [p["mcc"] for p in out["pairs"]]
    assert out["pw_mcc"] == pytest.approx(np.mean(mccs)) and out["pw_mcc_std"] == pytest.approx(np.std(mccs))
    assert abs(out["pw_mcc"] - out["chance"]["mean"]) < 0.06
    # random runs: stability follows its chance curve, not 1
    curve, chance = np.array(out["stability"]["curve"]), np.array(out["stability"]["chance_curve"])
    assert np.abs(curve - chance).max() < 0.15 and curve[-1] < 0.1


def test_mismatched_d_model_exits_2_naming_the_run(cli, runs):
    res = cli["wide"]
    assert res.returncode == 2 and res.stdout == "" and "Traceback" not in res.stderr
    assert res.stderr.startswith("paperlib: error: ")
    assert f"run '{runs['wide']}' has d_model {D + 4} but run '{runs['a']}' has d_model {D}" in res.stderr
    assert "same activations" in res.stderr


def _run(capsys, *argv) -> tuple[int, str, str]:
    code = main(list(argv))
    captured = capsys.readouterr()
    return code, captured.out, captured.err


def test_abs_on_a_sign_flipped_copy(capsys, runs):
    code, out, _ = _run(capsys, "consistency", runs["a"], runs["flip"], "--json", "--abs", "--chance-samples", "0")
    result = json.loads(out)
    assert code == 0 and result["cosine"] == "absolute" and result["pw_mcc"] == pytest.approx(1.0, abs=1e-6)
    assert result["chance"] is None
    code, out, _ = _run(capsys, "consistency", runs["a"], runs["flip"], "--json", "--chance-samples", "0")
    assert code == 0 and json.loads(out)["pw_mcc"] < 0.95  # the 4 flipped atoms cannot score +1


def test_table_without_chance_and_on_an_explicit_device(capsys, runs):
    code, out, _ = _run(capsys, "consistency", runs["a"], runs["copy"], "--chance-samples", "0", "--device", "cpu")
    assert code == 0 and "chance level: skipped" in out and "|cos|" not in out
    assert "PAPERLIB_DEVICE" not in os.environ or os.environ["PAPERLIB_DEVICE"] != "cpu"  # restored


@pytest.mark.parametrize(
    "argv,message",
    [
        (["{a}"], "needs at least two runs to compare, got 1 ('{a}')"),
        (["{a}", "{missing}"], "run '{missing}' does not exist; check the path"),
        (["{a}", "{corrupt}"], "cannot read run '{corrupt}': {corrupt}/sae_weights.safetensors: corrupt or unreadable"),
        (["{a}", "{copy}", "--chance-samples", "-1"], "--chance-samples must be >= 0"),
        (["{a}", "{copy}", "--device", "nonsense"], "--device nonsense"),
    ],
)
def test_input_errors_exit_2_with_a_message(capsys, runs, tmp_path, argv, message):
    names = {**runs, "missing": str(tmp_path / "missing")}
    code, out, err = _run(capsys, "consistency", *(a.format(**names) for a in argv))
    assert code == 2 and out == ""
    assert err.startswith("paperlib: error: ") and message.format(**names) in err


def test_usage_errors_exit_2(capsys):
    assert main([]) == 2
    assert main(["consistency", "--bogus"]) == 2
    assert "usage: paperlib" in capsys.readouterr().err


def test_cache_info_counts_entries_per_namespace(capsys, tmp_path, monkeypatch):
    root = tmp_path / "cache"
    for ns, n in (("organism", 2), ("sae", 1)):
        for i in range(n):
            entry = root / ns / f"key{i}"
            entry.mkdir(parents=True)
            (entry / "tensors.safetensors").write_bytes(b"x" * 1000)
    (root / "sae" / ".key9.tmp").mkdir()  # an interrupted write is not an entry
    monkeypatch.setenv("PAPERLIB_CACHE", str(root))
    code, out, _ = _run(capsys, "cache", "info")
    assert code == 0 and f"cache root: {root}" in out
    assert re.search(r"organism +2 entries +2\.0 KiB", out) and re.search(r"sae +1 entry +1000 B", out)
    assert re.search(r"total +3 entries", out)
    code, out, _ = _run(capsys, "cache", "info", "--json")
    info = json.loads(out)
    assert info["namespaces"] == [
        {"namespace": "organism", "entries": 2, "bytes": 2000},
        {"namespace": "sae", "entries": 1, "bytes": 1000},
    ]
    monkeypatch.setenv("PAPERLIB_CACHE", str(tmp_path / "none"))
    code, out, _ = _run(capsys, "cache", "info")
    assert code == 0 and "does not exist yet" in out
