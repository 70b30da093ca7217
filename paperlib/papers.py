"""The papers' reported values, read from one data file (``paper_values.toml``) so that every notebook
and test quotes the same number and a reader can see where each came from and how it was read."""

from __future__ import annotations

import functools
import tomllib
from dataclasses import dataclass
from importlib import resources
from typing import Any


@dataclass(frozen=True)
class PaperValue:
    """One reported value: ``where`` in which paper, ``approximate`` when read off a plot or from
    third-party notes, ``unverified`` naming what could not be checked against the paper's text."""

    key: str
    value: Any
    where: str
    approximate: bool
    unverified: str | None = None

    @property
    def mark(self) -> str:
        """ "≈" for an approximate value, else empty: for labels such as f"paper {mark}{value}"."""
        return "≈ " if self.approximate else ""


@functools.cache
def paper_values() -> dict[str, PaperValue]:
    """Every entry of the data file, by key ("A.llm.best_pw_mcc", "B.stitching.novel_fraction", ...)."""
    with resources.files("paperlib").joinpath("paper_values.toml").open("rb") as file:
        table = tomllib.load(file)
    return {key: PaperValue(key, **fields) for key, fields in table.items()}


def paper_record(key: str) -> PaperValue:
    """The entry ``key`` with its provenance."""
    values = paper_values()
    if key not in values:
        raise KeyError(f"no paper value {key!r} in paperlib/paper_values.toml; known keys: {', '.join(sorted(values))}")
    return values[key]


def paper_value(key: str) -> Any:
    """The reported value of ``key`` alone (a number, a list, or a table)."""
    return paper_record(key).value
