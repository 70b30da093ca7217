"""Meta-tests of the notebooks and their profiles (nbval executes the notebooks themselves)."""

import ast
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
    assert yaml_path.exists(), f"missing {yaml_path.relative_to(ROOT)} (make figures needs one per notebook and profile)"
    values = yaml.safe_load(yaml_path.read_text()) or {}
    unknown = set(values) - set(parameters_of(path))
    assert not unknown, f"{yaml_path.relative_to(ROOT)} sets parameters {sorted(unknown)} that {path.name} lacks"
    assert "profile" not in values, "the profile is passed by make itself"


def test_every_profile_yaml_belongs_to_a_notebook():
    stems = {p.stem for p in NOTEBOOKS}
    orphans = [p for p in (ROOT / "profiles").glob("*/*.yaml") if p.stem not in stems]
    assert not orphans, f"profile files without a notebook: {orphans}"
