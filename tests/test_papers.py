"""The papers' values file: every entry well formed, looked up by key, refused when unknown."""

import math

import pytest

from paperlib.papers import paper_record, paper_value, paper_values


def numbers(value):
    if isinstance(value, dict):
        return [x for v in value.values() for x in numbers(v)]
    if isinstance(value, list):
        return [x for v in value for x in numbers(v)]
    return [value]


def test_every_entry_names_its_source_and_holds_finite_numbers():
    values = paper_values()
    assert len(values) >= 20
    for key, record in values.items():
        assert key.split(".")[0] in ("A", "B"), key
        assert record.where.startswith(f"Paper {key[0]}"), key
        assert isinstance(record.approximate, bool)
        for x in numbers(record.value):
            assert isinstance(x, (int, float)) and not isinstance(x, bool) and math.isfinite(x), key


def test_values_quoted_in_the_notebooks():
    assert paper_value("A.llm.best_pw_mcc")["topk"] == 0.818
    assert paper_value("B.stitching.novel_fraction") == 0.35
    judge = paper_value("A.llm.judge_score_by_cosine")
    assert len(judge["edges"]) == len(judge["score"]) + 1 and judge["pairs_in_bins"] < judge["pairs"]
    assert paper_record("A.zipfian.alpha").mark == "≈ " and paper_record("B.meta.k").mark == ""
    assert "not stated" in paper_record("A.zipfian.alpha").unverified


def test_an_unknown_key_names_the_file_and_the_known_keys():
    with pytest.raises(KeyError, match="paper_values.toml; known keys: A.ambiguity"):
        paper_value("A.organism.nonexistent")
