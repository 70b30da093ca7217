"""Meta-tests of the notebooks and their profiles (nbval executes the notebooks themselves)."""

import ast
import subprocess
import sys
from pathlib import Path

import nbformat
import pytest
import yaml

ROOT = Path(__file__).resolve().parents[1]
NOTEBOOKS = sorted((ROOT / "notebooks").glob("[0-9][0-9]_*.ipynb"))
PROFILES = ("smoke", "default", "paper")


def parameters_of(path: Path) -> dict[str, object]:
    nb = nbformat.read(path, as_version=4)
    tagged = [c for c in nb.cells if "parameters" in c.metadata.get("tags", [])]
    assert len(tagged) == 1, f"{path.name} must have exactly one cell tagged 'parameters', found {len(tagged)}"
    names = {}
    for node in ast.parse(tagged[0].source).body:
        assert isinstance(node, ast.Assign), f"{path.name}: the parameters cell holds only assignments"
        for target in node.targets:
            names[target.id] = ast.literal_eval(node.value)
    return names


def test_there_are_notebooks():
    assert NOTEBOOKS, "no notebooks/NN_*.ipynb found"


@pytest.mark.parametrize("path", NOTEBOOKS, ids=lambda p: p.stem)
def test_no_undefined_or_unused_names(path, tmp_path):
    """pyflakes' checks (ruff's F rules) over the notebook's code cells in order, as one module: an import
    lost in a refactoring fails here at once, not only when nbval reaches the cell that needs it (ruff
    format's line length is not applied to notebooks; F541, f-strings without fields, is allowed)."""
    nb = nbformat.read(path, as_version=4)
    code = tmp_path / f"{path.stem}.py"
    code.write_text("\n\n".join(c.source for c in nb.cells if c.cell_type == "code") + "\n")
    ruff = Path(sys.executable).with_name("ruff")
    found = subprocess.run(
        [
            str(ruff),
            "check",
            "--isolated",
            "--select",
            "F",
            "--ignore",
            "F541",
            "--output-format",
            "concise",
            str(code),
        ],
        capture_output=True,
        text=True,
    )
    assert found.returncode == 0, f"{path.name}:\n{found.stdout}{found.stderr}"


@pytest.mark.parametrize("path", NOTEBOOKS, ids=lambda p: p.stem)
def test_committed_without_outputs(path):
    nb = nbformat.read(path, as_version=4)
    for cell in nb.cells:
        if cell.cell_type == "code":
            assert not cell.outputs and cell.execution_count is None, f"{path.name}: clear outputs before committing"


@pytest.mark.parametrize("path", NOTEBOOKS, ids=lambda p: p.stem)
def test_parameters_cell_defaults_to_smoke(path):
    assert parameters_of(path).get("profile") == "smoke"


@pytest.mark.parametrize("profile", PROFILES)
@pytest.mark.parametrize("path", NOTEBOOKS, ids=lambda p: p.stem)
def test_every_profile_yaml_names_only_existing_parameters(path, profile):
    yaml_path = ROOT / "profiles" / profile / f"{path.stem}.yaml"
    assert yaml_path.exists(), (
        f"missing {yaml_path.relative_to(ROOT)} (make figures needs one per notebook and profile)"
    )
    values = yaml.safe_load(yaml_path.read_text()) or {}
    unknown = set(values) - set(parameters_of(path))
    assert not unknown, f"{yaml_path.relative_to(ROOT)} sets parameters {sorted(unknown)} that {path.name} lacks"
    assert "profile" not in values, "the profile is passed by make itself"


def test_every_profile_yaml_belongs_to_a_notebook():
    stems = {p.stem for p in NOTEBOOKS}
    orphans = [p for p in (ROOT / "profiles").glob("*/*.yaml") if p.stem not in stems]
    assert not orphans, f"profile files without a notebook: {orphans}"


# Notebooks 07-11 reuse notebook 06's activations and SAE runs from the cache (08-10 share their own): a key they
# both set must agree, or the later notebook silently extracts and trains its own copies. Per profile, which
# notebooks share: in smoke and default all LLM notebooks read the same activations; at paper scale 06, 07 and 11
# follow paper A (Pythia, the Pile) and 08-10 paper B (GPT-2, OpenWebText).
SHARING = {
    "smoke": [("06", "07", "08", "09", "10", "11")],
    "default": [("06", "07", "08", "09", "10", "11")],
    "paper": [("06", "07", "11"), ("08", "09", "10")],
}
OWN_KEYS = {"profile", "architectures", "n_boot", "n_examples", "n_top", "chance_samples"}  # per notebook by design


def settings(number: str, profile: str) -> dict[str, object]:
    path = next(p for p in NOTEBOOKS if p.stem.startswith(number))
    values = parameters_of(path)
    if profile != "smoke":
        values.update(yaml.safe_load((ROOT / "profiles" / profile / f"{path.stem}.yaml").read_text()) or {})
    return values


@pytest.mark.parametrize("profile", PROFILES)
def test_llm_notebooks_that_share_runs_agree_on_every_shared_key(profile):
    for group in SHARING[profile]:
        values = {number: settings(number, profile) for number in group}
        shared = set.union(*(set(v) for v in values.values())) - OWN_KEYS
        for key in sorted(shared):
            seen = {number: v[key] for number, v in values.items() if key in v}
            assert len({repr(v) for v in seen.values()}) == 1, (
                f"{profile} profile: notebooks {', '.join(seen)} disagree on {key!r}: {seen}; they share cached "
                "activations and SAEs, so set it the same in each (parameters cell or profiles/<profile>/*.yaml)"
            )
