"""The content-addressed cache: keys, atomic writes, verified reads."""

import json
from dataclasses import dataclass

import pytest
import torch

from paperlib.store import Store, config_key


@dataclass(frozen=True)
class Cfg:
    width: int
    lr: float


def test_round_trip_and_compute_once(tmp_path):
    store = Store(tmp_path)
    calls = []

    def compute():
        calls.append(1)
        return {"w": torch.arange(6.0).reshape(2, 3)}, {"note": "hello"}

    first = store.cached("runs", Cfg(4, 0.1), compute)
    second = store.cached("runs", Cfg(4, 0.1), compute)
    assert len(calls) == 1
    assert torch.equal(second.tensors["w"], torch.arange(6.0).reshape(2, 3)) and second.meta == {"note": "hello"}
    assert first.path == second.path and first.path.parent == tmp_path / "runs"


def test_keys_depend_on_every_field_and_the_namespace():
    base = config_key("runs", Cfg(4, 0.1))
    assert base == config_key("runs", Cfg(4, 0.1))
    assert (
        len({base, config_key("runs", Cfg(5, 0.1)), config_key("runs", Cfg(4, 0.2)), config_key("other", Cfg(4, 0.1))})
        == 4
    )
    assert config_key("runs", {"a": 1, "b": 2}) == config_key("runs", {"b": 2, "a": 1})


@pytest.mark.parametrize("damage", ["truncate", "flip", "delete_manifest", "delete_tensors"])
def test_corrupt_entries_are_reported_and_recomputed(tmp_path, damage):
    store = Store(tmp_path)
    entry = store.save("runs", Cfg(1, 1.0), {"w": torch.ones(100)}, {})
    tensors = entry.path / "tensors.safetensors"
    if damage == "truncate":
        tensors.write_bytes(tensors.read_bytes()[:50])
    elif damage == "flip":
        data = bytearray(tensors.read_bytes())
        data[-1] ^= 0xFF
        tensors.write_bytes(bytes(data))
    elif damage == "delete_manifest":
        (entry.path / "manifest.json").unlink()
    else:
        tensors.unlink()
    with pytest.warns(UserWarning, match="is corrupt") as record:
        assert store.load("runs", Cfg(1, 1.0)) is None
    assert [w.filename for w in record if "is corrupt" in str(w.message)] == [__file__]  # names the caller
    assert not entry.path.exists()
    fresh = store.cached("runs", Cfg(1, 1.0), lambda: ({"w": torch.zeros(3)}, {}))
    assert torch.equal(fresh.tensors["w"], torch.zeros(3))


def test_a_failed_computation_leaves_nothing_behind(tmp_path):
    store = Store(tmp_path)

    def explode():
        raise RuntimeError("interrupted")

    with pytest.raises(RuntimeError):
        store.cached("runs", Cfg(2, 1.0), explode)
    assert store.load("runs", Cfg(2, 1.0)) is None
    assert not (tmp_path / "runs").exists() or not any((tmp_path / "runs").iterdir())


def test_an_interrupted_write_leaves_no_entry(tmp_path, monkeypatch):
    store = Store(tmp_path)
    import paperlib.store as store_module

    def broken_save(tensors, path):
        open(path, "wb").write(b"partial")
        raise KeyboardInterrupt

    monkeypatch.setattr(store_module, "save_file", broken_save)
    with pytest.raises(KeyboardInterrupt):
        store.save("runs", Cfg(3, 1.0), {"w": torch.ones(2)})
    assert store.load("runs", Cfg(3, 1.0)) is None
    assert list((tmp_path / "runs").iterdir()) == []


def test_meta_file_records_the_configuration(tmp_path):
    entry = Store(tmp_path).save("runs", Cfg(7, 0.5), {"w": torch.ones(1)}, {"x": 1})
    meta = json.loads((entry.path / "meta.json").read_text())
    assert meta["config"] == {"__type__": "Cfg", "width": 7, "lr": 0.5}


def test_bad_keys_and_namespaces():
    with pytest.raises(TypeError, match="cannot use Tensor in a cache key"):
        config_key("runs", {"w": torch.ones(1)})
    with pytest.raises(ValueError, match="plain name"):
        Store("/nonexistent").path("../escape", {})


def test_a_new_field_at_its_default_keeps_existing_keys():
    @dataclass(frozen=True)
    class Cfg:  # the same configuration type, grown by one field with a default
        width: int
        lr: float
        decoder: str = "free"

    assert config_key("runs", Cfg(4, 0.1)) == config_key("runs", globals()["Cfg"](4, 0.1))
    assert config_key("runs", Cfg(4, 0.1, decoder="unit")) != config_key("runs", globals()["Cfg"](4, 0.1))
