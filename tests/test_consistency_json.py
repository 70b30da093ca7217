"""The consistency document: written by the CLI, valid against the shipped schema, complete enough to
recompute the result without the weights, read back by `consistency show`, refused when it lies."""

import hashlib
import json

import jsonschema
import numpy as np
import pytest
import torch

from paperlib.__main__ import main
from paperlib.interop import read_decoder
from paperlib.metrics.consistency_json import SCHEMA_VERSION, read, schema, validate
from test_interop import _rand, write_saelens, write_sparsify

D = 48  # wide enough that the runs' own atoms stay far below the shared ones


@pytest.fixture()
def runs(tmp_path) -> list[str]:
    """Three runs of different widths and layouts sharing 12 atoms."""
    common = _rand(12, D, seed=1)
    widths = (20, 24, 28)
    paths = []
    for i, n in enumerate(widths):
        W = np.vstack(
            [
                common.numpy() + 0.02 * np.random.default_rng(i).standard_normal((12, D)),
                _rand(n - 12, D, seed=10 + i).numpy(),
            ]
        )
        write = write_sparsify if i == 1 else write_saelens
        paths.append(str(write(tmp_path / f"run{i}", torch.from_numpy(W.astype(np.float32)))))
    return paths


def _document(capsys, tmp_path, runs, *extra) -> tuple[dict, str]:
    out = tmp_path / "results" / "consistency.json"
    assert main(["consistency", *runs, "--out", str(out), "--chance-samples", "2", *extra]) == 0
    table = capsys.readouterr().out
    return json.loads(out.read_text()), table


def test_the_shipped_schema_is_a_valid_json_schema():
    jsonschema.Draft202012Validator.check_schema(schema())
    assert schema()["properties"]["schema_version"]["const"] == SCHEMA_VERSION


def test_written_document_is_valid_complete_and_traceable(capsys, tmp_path, runs):
    doc, _ = _document(capsys, tmp_path, runs)
    jsonschema.validate(doc, schema())
    assert not list((tmp_path / "results").glob(".*"))  # written atomically, no temporary left
    decoders = [read_decoder(r) for r in runs]
    for run, dec in zip(doc["runs"], decoders):
        assert run["sha256"] == hashlib.sha256(dec.path.read_bytes()).hexdigest()
        assert run["n_latents"] == dec.n_latents and run["weights"] == str(dec.path)
    assert [r["layout"] for r in doc["runs"]] == ["saelens", "sparsify", "saelens"]
    assert set(doc["software"]) >= {"paperlib", "torch", "numpy", "scipy", "python"}
    # every pair's matching recomputes its MCC from the weights: one-to-one, cosines true
    units = [d.W_dec / np.linalg.norm(d.W_dec, axis=1, keepdims=True) for d in decoders]
    for pair in doc["pairs"]:
        a, b = units[pair["a"]], units[pair["b"]]
        assert len(set(pair["rows"])) == len(pair["rows"]) == min(len(a), len(b)) == len(set(pair["cols"]))
        cos = np.einsum("ij,ij->i", a[pair["rows"]], b[pair["cols"]])
        np.testing.assert_allclose(pair["cosine"], cos, atol=1e-5)
        assert pair["mcc"] == pytest.approx(np.mean(pair["cosine"])) and pair["solver"] == "dense"
    assert doc["pw_mcc"] == pytest.approx(np.mean([p["mcc"] for p in doc["pairs"]]))
    # per-latent stability: the 12 shared atoms reappear in both other runs, the rest by chance only
    stability = doc["stability"]
    latents = [np.array(run) for run in stability["latents"]]
    assert [len(x) for x in latents] == [20, 24, 28]
    everywhere_09 = stability["everywhere"][stability["thresholds"].index(0.9)]
    assert everywhere_09 == pytest.approx(36 / 72)
    assert stability["chance_curve"][-1] < 0.05 < stability["curve"][-1]


def test_show_reads_it_back_without_the_weights_and_prints_the_same_table(capsys, tmp_path, runs):
    doc, table = _document(capsys, tmp_path, runs)
    path = tmp_path / "results" / "consistency.json"
    assert main(["consistency", "show", str(path)]) == 0
    shown = capsys.readouterr().out
    assert shown.endswith(table) and "[1] verified, [2] verified, [3] verified" in shown
    for run in doc["runs"]:  # shared without the weights
        (tmp_path / run["weights"]).unlink()
    assert main(["consistency", "show", str(path)]) == 0
    assert "[1] absent, [2] absent, [3] absent" in capsys.readouterr().out


def test_json_flag_prints_the_same_document(capsys, tmp_path, runs):
    doc, _ = _document(capsys, tmp_path, runs)
    assert main(["consistency", *runs, "--json", "--chance-samples", "2"]) == 0
    printed = json.loads(capsys.readouterr().out)
    assert {k: v for k, v in printed.items() if k != "created"} == {k: v for k, v in doc.items() if k != "created"}


def _rewrite(path, change) -> None:
    doc = json.loads(path.read_text())
    change(doc)
    path.write_text(json.dumps(doc))


@pytest.mark.parametrize(
    "change,message",
    [
        (lambda d: d.update(schema_version=2), "unknown schema_version 2; this paperlib reads version 1"),
        (lambda d: d.update(schema_version="1"), "unknown schema_version '1'"),
        (lambda d: d.pop("schema_version"), "unknown schema_version None"),
        (lambda d: d.pop("pairs"), r"at \(top level\): 'pairs' is a required property"),
        (lambda d: d["runs"][0].update(sha256="abc"), "at runs/0/sha256"),
        (lambda d: d["pairs"][0].update(b=7), r"pair \(0, 7\) names runs outside 0..2"),
        (lambda d: d["pairs"][0]["cosine"].pop(), "unequal lengths"),
        (lambda d: d["stability"]["curve"].pop(), "one value per threshold"),
        (lambda d: d["stability"]["latents"][0].pop(), "every latent of every run"),
    ],
)
def test_a_document_that_is_not_what_it_claims_is_refused(capsys, tmp_path, runs, change, message):
    _document(capsys, tmp_path, runs)
    path = tmp_path / "results" / "consistency.json"
    _rewrite(path, change)
    with pytest.raises(ValueError, match=message):
        read(path)
    assert main(["consistency", "show", str(path)]) == 2
    err = capsys.readouterr().err
    assert err.startswith(f"paperlib: error: {path}: ") and "Traceback" not in err


def test_weights_that_changed_since_are_refused(capsys, tmp_path, runs):
    doc, _ = _document(capsys, tmp_path, runs)
    weights = tmp_path / doc["runs"][1]["weights"]
    weights.write_bytes(weights.read_bytes()[:-4] + b"\0\0\0\1")
    path = tmp_path / "results" / "consistency.json"
    assert main(["consistency", "show", str(path)]) == 2
    err = capsys.readouterr().err
    assert f"run [2] {runs[1]!r}" in err and "changed since the document was written" in err
    assert "re-run `python -m paperlib consistency`" in err


@pytest.mark.parametrize("content,message", [(b"{not json", "not JSON"), (b"[1, 2]", "a JSON object was expected")])
def test_files_that_are_not_documents_are_refused(capsys, tmp_path, content, message):
    path = tmp_path / "x.json"
    path.write_bytes(content)
    assert main(["consistency", "show", str(path)]) == 2
    assert message in capsys.readouterr().err
    assert main(["consistency", "show", str(tmp_path / "missing.json")]) == 2
    assert "cannot read" in capsys.readouterr().err


def test_validate_accepts_what_compare_writes_with_drop_dead_and_abs(capsys, tmp_path, runs):
    doc, _ = _document(capsys, tmp_path, runs, "--drop-dead", "--abs", "--thresholds", "0.2,0.95")
    assert validate(doc)["cosine"] == "absolute" and doc["stability"]["thresholds"] == [0.2, 0.95]


@pytest.mark.parametrize("bad", ["0.5,x", "", "1.5"])
def test_bad_thresholds_are_a_usage_error(capsys, runs, bad):
    assert main(["consistency", *runs, "--thresholds", bad]) == 2
    assert "expected comma-separated cosines in [-1, 1]" in capsys.readouterr().err


def test_the_sparse_solver_is_named_and_gives_the_dense_result(capsys, tmp_path, runs, monkeypatch):
    import paperlib.metrics.consistency as C

    dense, _ = _document(capsys, tmp_path, runs)
    monkeypatch.setattr(C, "DENSE_LIMIT", 8)  # these widths now take the certified sparse path
    sparse, _ = _document(capsys, tmp_path, runs)
    assert {p["solver"] for p in sparse["pairs"]} == {"sparse"} and sparse["certified"] is True
    assert validate(sparse)["pw_mcc"] == pytest.approx(dense["pw_mcc"], abs=1e-6)


def test_a_bank_compared_in_memory_is_hashed_by_its_decoder_rows(capsys, tmp_path):
    from paperlib.metrics.consistency_json import document
    from paperlib.sae.bank import SAEBank, SAEConfig

    bank = SAEBank(SAEConfig(d_model=D, n_latents=32, architecture="topk", k=4, n_seeds=3))
    W = bank.decoder_directions()
    doc = validate(document(list(W), ["seed 0", "seed 1", "seed 2"], chance_samples=1))
    assert [r["sha256_of"] for r in doc["runs"]] == ["decoder"] * 3 and doc["runs"][0]["weights"] is None
    assert doc["runs"][0]["sha256"] == hashlib.sha256(W[0].numpy().astype("<f4").tobytes()).hexdigest()
    path = tmp_path / "bank.json"
    path.write_text(json.dumps(doc))
    assert read(path)[1] == ["in memory"] * 3
    with pytest.raises(ValueError, match="two or more dictionaries and one name each"):
        document(list(W), ["seed 0"])
