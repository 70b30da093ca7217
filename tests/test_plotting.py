"""Figure and number outputs: per-profile directories, both formats, provenance."""

import json

import matplotlib.pyplot as plt
import pytest

from paperlib.plotting import figures_dir, provenance, save_figure, save_numbers


def test_save_figure_writes_pdf_and_png_with_provenance(tmp_path, monkeypatch):
    monkeypatch.setenv("PAPERLIB_FIGURES", str(tmp_path))
    fig, ax = plt.subplots()
    ax.plot([0, 1], [1, 0])
    paths = save_figure(fig, "00_test", "smoke")
    plt.close(fig)
    assert [p.name for p in paths] == ["00_test.pdf", "00_test.png"]
    assert all(p.parent == tmp_path / "smoke" and p.stat().st_size > 0 for p in paths)
    assert b"profile=smoke" in paths[0].read_bytes() and b"profile=smoke" in paths[1].read_bytes()
    assert sorted(p.name for p in (tmp_path / "smoke").iterdir()) == ["00_test.pdf", "00_test.png"]  # no temp files


def test_save_numbers_is_json_with_provenance(tmp_path, monkeypatch):
    import numpy as np

    monkeypatch.setenv("PAPERLIB_FIGURES", str(tmp_path))
    path = save_numbers({"mcc": np.float64(0.5), "curve": np.arange(3)}, "00_test", "default")
    payload = json.loads(path.read_text())
    assert payload["mcc"] == 0.5 and payload["curve"] == [0, 1, 2]
    assert payload["provenance"]["profile"] == "default" and payload["provenance"]["commit"]


def test_profiles_never_share_a_directory(tmp_path, monkeypatch):
    monkeypatch.setenv("PAPERLIB_FIGURES", str(tmp_path))
    assert len({figures_dir(p) for p in ("smoke", "default", "paper")}) == 3


def test_unknown_profile_is_a_clear_error():
    with pytest.raises(ValueError, match="unknown profile 'huge'; choose one of smoke, default, paper"):
        provenance("huge")


def test_unknown_injected_parameters_are_refused():
    from paperlib.plotting import refuse_unknown_parameters

    declared = 'profile = "smoke"\nsteps = 40  # a comment\nlr = 1e-3'
    refuse_unknown_parameters(["", declared, '# Parameters\nprofile = "default"\nsteps = 5\n', "import x"])
    refuse_unknown_parameters(["", declared, "x = 1"])  # run interactively: no injected cell
    with pytest.raises(
        ValueError, match=r"unknown notebook parameter\(s\) stepz: this notebook takes lr, profile, steps"
    ):
        refuse_unknown_parameters(["", declared, '# Parameters\nprofile = "default"\nstepz = 5\n'])


def test_papermill_run_with_a_misspelled_parameter_fails(tmp_path):
    # The real thing: papermill injects the cell, the notebook's first call refuses it.
    import nbformat
    import papermill

    nb = nbformat.v4.new_notebook(
        metadata={"kernelspec": {"name": "python3", "display_name": "Python 3", "language": "python"}}
    )
    params = nbformat.v4.new_code_cell('profile = "smoke"\nsteps = 40')
    params.metadata["tags"] = ["parameters"]
    nb.cells = [
        params,
        nbformat.v4.new_code_cell("from paperlib.plotting import check_profile\ncheck_profile(profile)"),
    ]
    source = tmp_path / "nb.ipynb"
    nbformat.write(nb, source)
    papermill.execute_notebook(str(source), str(tmp_path / "ok.ipynb"), parameters={"steps": 5}, progress_bar=False)
    with pytest.raises(papermill.PapermillExecutionError, match="stepz"):
        papermill.execute_notebook(
            str(source), str(tmp_path / "bad.ipynb"), parameters={"stepz": 5}, progress_bar=False
        )
