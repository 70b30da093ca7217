"""paperlib.explain: top contexts, explainers and their cache, explanation similarity, statistics.

The local explainer and the sentence embeddings run the real packaged models at smoke scale; the
HTTP paths are in test_explain_http.py.
"""

from __future__ import annotations

import json
import math

import numpy as np
import pytest
import torch

from paperlib.explain import (
    PAPER_A_EDGES,
    PROMPT_VERSION,
    EmbeddingSimilarity,
    Example,
    ExplainPrompt,
    LatentExamples,
    LocalChat,
    LocalExplainer,
    TokenContexts,
    TopContexts,
    TopTokensExplainer,
    bin_scores,
    clean_explanation,
    explain_latents,
    explanation_cache,
    parse_score,
    random_pairs,
    top_contexts,
)
from paperlib.sae.bank import SAEBank, SAEConfig
from paperlib.store import Store


def sparse_codes(seeds: int = 2, rows: int = 600, latents: int = 40, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    codes = torch.relu(torch.randn(seeds, rows, latents, generator=g) - 1.2)
    codes[:, :, 5] = 0  # latent 5 never fires
    codes[:, :, 6] = 0
    codes[:, 17, 6] = 2.0  # latent 6 fires once
    return codes


def test_top_contexts_equal_the_dense_topk_for_any_chunking():
    codes = sparse_codes()
    latents = [0, 3, 6, 11]
    result = top_contexts(codes, None, latents, n_top=5, n_quantile=4, chunk_rows=600, reservoir=50)
    chosen = codes[:, :, latents].transpose(1, 2)
    values, rows = chosen.topk(5, dim=-1)
    assert torch.equal(result.values[:, [0, 1, 3]], values[:, [0, 1, 3]])
    assert torch.equal(result.rows[:, [0, 1, 3]], rows[:, [0, 1, 3]])
    assert result.rows[0, 2].tolist() == [17, -1, -1, -1, -1] and result.values[0, 2, 0] == 2.0
    assert torch.equal(result.n_fired, (chosen > 0).sum(-1))
    for chunk in (1, 7, 64):
        other = top_contexts(codes, None, latents, n_top=5, n_quantile=4, chunk_rows=chunk, reservoir=50)
        for name, tensor in result.tensors().items():
            assert torch.equal(tensor, other.tensors()[name]), (chunk, name)


def test_quantile_samples_are_firing_rows_spread_over_the_activation_range():
    rows = 4000
    codes = torch.arange(1, rows + 1, dtype=torch.float32)[:, None].repeat(1, 2)  # activation = row + 1
    codes[::2, 1] = 0  # latent 1 fires on odd rows only
    result = top_contexts(codes, None, [0, 1], n_top=3, n_quantile=5, chunk_rows=333, reservoir=400)
    q_rows, q_values = result.quantile_rows[0], result.quantile_values[0]
    assert torch.equal(q_values, q_rows.float() + 1)  # each sample is a real (row, activation) pair
    assert (q_rows[1] % 2 == 1).all()  # only rows where the latent fires
    assert (q_values.diff(dim=-1) > 0).all()  # weakest first
    # a uniform sample of 400: its quantiles sit within a few standard errors (~2.5% of rows) of the truth
    truth = (torch.arange(5) + 0.5) / 5 * rows
    assert ((q_values[0] - truth).abs() < 0.08 * rows).all()


def test_top_contexts_stream_an_sae_without_the_dense_matrix():
    bank = SAEBank(SAEConfig("topk", d_model=8, n_latents=32, k=4, n_seeds=2, seed=3))
    x = torch.randn(500, 8, generator=torch.Generator().manual_seed(1)).half()
    with torch.no_grad():
        dense = bank.encode(x.float())
    latents = torch.tensor([[0, 1, 2], [31, 30, 29]])  # one list per seed, e.g. matched partners
    streamed = top_contexts(lambda chunk: bank.encode(chunk), x, latents, n_top=4, chunk_rows=97)
    stored = top_contexts(dense, None, latents, n_top=4)
    for name, tensor in streamed.tensors().items():
        assert torch.equal(tensor, stored.tensors()[name]), name
    assert torch.equal(streamed.latents, latents)
    assert torch.equal(streamed.values[1, 0], dense[1, :, 31].topk(4).values)
    again = TopContexts.from_tensors(streamed.tensors(), streamed.n_rows)
    assert torch.equal(again.frequency(), streamed.n_fired.double() / 500)


def test_top_contexts_refuse_bad_input():
    codes = sparse_codes()
    with pytest.raises(ValueError, match="latents must lie in 0..39"):
        top_contexts(codes, None, [0, 40])
    with pytest.raises(ValueError, match="integer indices"):
        top_contexts(codes, None, [0.5])
    with pytest.raises(ValueError, match="latents has 3 rows but the codes have 2 seeds"):
        top_contexts(codes, None, torch.zeros(3, 2, dtype=torch.long))
    with pytest.raises(ValueError, match="n_top must be an integer >= 1"):
        top_contexts(codes, None, [0], n_top=0)
    with pytest.raises(ValueError, match="reservoir=2 must be >= n_quantile=5"):
        top_contexts(codes, None, [0], reservoir=2)
    bad = codes.clone()
    bad[1, 300, 7] = math.nan
    with pytest.raises(ValueError, match="codes of rows 256:512 contain NaN or Inf"):
        top_contexts(bad, None, [0], chunk_rows=256)
    with pytest.raises(ValueError, match=r"x must be the activation rows \[n_rows, d_model\]"):
        top_contexts(lambda chunk: chunk, None, [0])
    with pytest.raises(ValueError, match="must return"):
        top_contexts(lambda chunk: chunk[:1], torch.zeros(10, 4), [0])


WORDS = "the river flows past the old town while boats sail by in the summer".split()


def word_contexts() -> TokenContexts:
    tokens = torch.arange(len(WORDS))[None].repeat(2, 1)
    row_context = torch.tensor([0, 0, 1, 1])
    row_position = torch.tensor([1, 5, 0, len(WORDS) - 1])
    return TokenContexts(tokens, row_context, row_position, lambda ids: "".join(" " + WORDS[i] for i in ids))


def test_token_contexts_mark_the_activating_token():
    ctx = word_contexts()
    assert ctx.text(0, window=2) == " the «river» flows past"
    assert ctx.text(2, window=1, mark=("[", "]")) == " [the] river"
    assert ctx.text(3, window=2).endswith(" the «summer»")
    assert ctx.token(1) == " old"
    with pytest.raises(IndexError, match="row 4 is out of range for 4 rows"):
        ctx.text(4)
    with pytest.raises(ValueError, match="point outside tokens"):
        TokenContexts(torch.zeros(1, 3, dtype=torch.long), torch.tensor([1]), torch.tensor([0]), str)


def test_examples_are_readable_and_skip_missing_rows():
    codes = torch.zeros(4, 3)
    codes[0, 0], codes[1, 0], codes[3, 1] = 2.0, 1.0, 0.5
    top = top_contexts(codes, None, [0, 1, 2], n_top=3, n_quantile=2, reservoir=4)
    examples = top.examples(word_contexts(), window=1)
    assert [e.latent for e in examples] == [0, 1, 2]
    assert [(x.token, x.activation) for x in examples[0].top] == [(" river", 2.0), (" old", 1.0)]
    assert examples[1].frequency == 0.25 and [x.row for x in examples[1].quantiles] == [3]  # shown once
    assert not examples[2].active and examples[0].active
    text = examples[0].readable()
    assert "latent 0: fires on 50% of tokens" in text and "2.000   the «river» flows" in text


def latent(i: int, tokens: list[str]) -> LatentExamples:
    top = tuple(Example(f"a «{t.strip()}» b", t, 5.0 - k, k) for k, t in enumerate(tokens))
    return LatentExamples(i, top, (Example("a «x» b", "x", 0.1, 99),), 0.01)


def test_top_tokens_explainer_and_prompt():
    examples = [latent(0, [" Paris", " London", " Paris"]), latent(1, ["1999"])]
    assert TopTokensExplainer(2).explain(examples) == ["tokens: 'Paris', 'London'", "tokens: '1999'"]
    with pytest.raises(ValueError, match=r"latents \[7\] never fired"):
        TopTokensExplainer().explain([LatentExamples(7, ())])
    messages = ExplainPrompt(n_top=2, n_quantile=1, prefill="They are all").conversation(examples[0])
    assert messages[-1] == {"role": "assistant", "content": "They are all"}
    user = messages[0]["content"]
    assert "- a «Paris» b\n- a «London» b\n- a «x» b\n" in user and "Marked tokens: Paris, London." in user


@pytest.mark.parametrize(
    "reply, expected",
    [
        (" related to years and dates.\nMore text", "related to years and dates."),
        ('**"City names"**', "City names"),
        ("1. Verbs in the past tense", "Verbs in the past tense"),
        ("\n\n", ""),
        ("word " * 100, ("word " * 40).strip() + "…"),
        ("In a few words", ""),
        ("in a few words, what do the marked tokens have in common?", ""),
        ("Words", "Words"),
        ("Marked tokens: In a few words, what do the marked tokens have in common?", ""),
    ],
)
def test_clean_explanation(reply, expected):
    assert clean_explanation(reply) == expected


def test_explain_latents_caches_per_latent_and_recomputes_changed_contexts(tmp_path):
    store, explainer = Store(tmp_path), TopTokensExplainer()
    examples = [latent(0, ["a"]), latent(1, ["b"]), latent(2, ["c"])]
    assert explain_latents(explainer, examples, "run-1", store=store, batch_size=2) == [
        "tokens: 'a'",
        "tokens: 'b'",
        "tokens: 'c'",
    ]
    cache = explanation_cache(explainer, "run-1", store)
    lines = cache.path.read_text().splitlines()
    assert len(lines) == 3 and json.loads(lines[0])["prompt_version"] == PROMPT_VERSION
    # a record is used as stored (the cache is read), and only changed contexts are explained again
    cache.path.write_text(cache.path.read_text().replace("tokens: 'a'", "from the cache"))
    examples[1] = latent(1, ["b2"])
    assert explain_latents(explainer, examples, "run-1", store=store) == [
        "from the cache",
        "tokens: 'b2'",
        "tokens: 'c'",
    ]
    assert explain_latents(explainer, examples[:1], "run-2", store=store) == ["tokens: 'a'"]  # runs are separate
    cache.path.write_text(cache.path.read_text() + "{torn line\n")
    with pytest.warns(UserWarning, match="1 unreadable lines ignored") as record:
        explain_latents(explainer, examples, "run-1", store=store)
    assert [w.filename for w in record if "unreadable lines" in str(w.message)] == [__file__]  # names the caller
    with pytest.raises(ValueError, match="run_id must name the SAE run"):
        explain_latents(explainer, examples, "", store=store)
    with pytest.raises(ValueError, match="examples name some latent twice"):
        explain_latents(explainer, examples + examples[:1], "run-1", store=store)


def test_local_explainer_runs_the_packaged_model_and_batching_does_not_change_greedy_text():
    examples = [latent(0, [" Paris", " London", " Rome"]), latent(1, ["1999", "2001"] * 3)]
    one = LocalExplainer(batch_size=1, max_tokens=8).explain(examples)
    both = LocalExplainer(batch_size=2, max_tokens=8).explain(examples)  # left-padded together
    assert one == both and all(isinstance(t, str) and t for t in one)
    with pytest.raises(ValueError, match="conversation 0 must be a non-empty list"):
        LocalChat().complete_many([[{"role": "robot", "content": "hi"}]], 4)


@pytest.mark.parametrize(
    "reply, score",
    [
        ("7", 7),
        (" 8.", 8),
        ("Score: 6/10", 6),
        ("**9**", 9),
        ("On a scale of 1 to 10, I'd say 3.", 3),
        ("Rating: 10", 10),
        ("similarity: 4.5", 4.5),
        ("I rate them 2 out of 10", 2),
        ("0", math.nan),
        ("no idea", math.nan),
        ("11", math.nan),
        ("", math.nan),
    ],
)
def test_parse_score(reply, score):
    got = parse_score(reply)
    assert (math.isnan(got) and math.isnan(score)) or got == score


def test_embedding_similarity_with_the_packaged_model():
    sim = EmbeddingSimilarity()
    scores = sim(
        ["years and dates", "river names", "years and dates", ""],
        ["years and dates", "names of rivers", "cooking recipes", "anything"],
    )
    assert scores[0] == pytest.approx(1.0, abs=1e-5)
    assert scores[1] > 0.7 > scores[2] and math.isnan(scores[3])
    with pytest.raises(ValueError, match="two equally long lists, got 1 and 2"):
        sim(["a"], ["a", "b"])


def test_bin_scores_by_paper_a_edges():
    cosine = np.array([0.05, 0.08, 0.10, 0.5, 0.6, 0.9, 1.0, 0.3])
    score = np.array([9.0, 1.0, 3.0, 4.0, 8.0, np.nan, 9.0, 5.0])
    binned = bin_scores(cosine, score, n_boot=200)
    assert binned.count.tolist() == [2, 0, 1, 1, 2] and binned.n_outside == 1 and binned.n_nan == 1
    assert binned.mean[0] == 2.0 and math.isnan(binned.mean[1]) and binned.mean[4] == 8.5
    assert binned.low[0] <= 2.0 <= binned.high[0] and binned.low[0] >= 1.0 and binned.high[0] <= 3.0
    assert binned.low[2] == binned.high[2] == 5.0
    assert tuple(binned.edges) == PAPER_A_EDGES
    with pytest.raises(ValueError, match="strictly increasing"):
        bin_scores(cosine, score, edges=[0.5, 0.1])
    with pytest.raises(ValueError, match="one value per pair, got 8 and 2"):
        bin_scores(cosine, score[:2])


def test_random_pairs_never_pair_an_explanation_with_itself():
    i, j = random_pairs(5, 1000, seed=1)
    assert (i != j).all() and i.min() == 0 and j.max() == 4
    with pytest.raises(ValueError, match="n >= 2"):
        random_pairs(1, 3)


def test_stratified_pairs_share_the_sample_evenly_over_the_bins():
    from paperlib.explain.similarity import stratified_pairs

    edges = np.array([0.0, 0.3, 0.6, 1.0])
    cosine = np.concatenate([[0.1], np.full(10, 0.4), np.full(10, 0.8), [0.9]])  # pools of 1, 10 and 11 pairs
    eligible = np.ones(len(cosine), dtype=bool)
    eligible[-1] = False  # the last pair is left out: the top pool holds 10 eligible pairs
    pick = stratified_pairs(cosine, eligible, edges, 9, np.random.default_rng(0))
    assert len(set(pick.tolist())) == 9 and eligible[pick].all() and (np.diff(pick) > 0).all()
    per_bin = np.bincount(np.searchsorted(edges, cosine[pick], side="right") - 1, minlength=3)
    assert per_bin.tolist() == [1, 4, 4]  # the 1-pair bin gives its share to the others
    assert stratified_pairs(cosine, eligible, edges, None, np.random.default_rng(0)).tolist() == list(range(21))
    with pytest.raises(ValueError, match="one shape"):
        stratified_pairs(cosine, eligible[:-1], edges, 3, np.random.default_rng(0))
