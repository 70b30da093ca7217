"""LLM activations: truncated forward, packing, the sharded cache (resume, corruption), bad inputs.

Most tests use a tiny random Llama and a byte-level BPE tokenizer trained here on packaged Wikipedia
text; one smoke test runs the real packaged SmolLM2 on the packaged corpus.
"""

import itertools
import json
import os
from pathlib import Path

import numpy as np
import pytest
import torch

from paperlib.sources import activations as A
from paperlib.sources.corpus import documents, pack, separator_id, special_ids
from paperlib.sources.llm import decoder_blocks, load_model, residual
from paperlib.store import Store


def cfg(tiny, **overrides):
    fields = dict(
        model=tiny["model"],
        corpus=tiny["corpus"],
        layer=1,
        context_length=16,
        n_tokens=16 * 40,
        batch_contexts=3,
        shard_tokens=16 * 8,
    )
    fields.update(overrides)
    return A.ActivationConfig(**fields)


def interrupt_extraction(config, store, forwards: int = 8) -> None:
    """Extraction of ``config`` stopped by a real Ctrl-C at the ``forwards``-th model call (with the
    tiny model's shards of 8 contexts, 3 forwards each: in the middle of shard 2)."""
    model, _ = load_model(config.model, store)
    calls = []

    def interrupt(*args):
        calls.append(1)
        if len(calls) == forwards:
            raise KeyboardInterrupt

    handle = decoder_blocks(model)[0].register_forward_hook(interrupt)
    try:
        with pytest.raises(KeyboardInterrupt):
            A.load_activations(config, store=store, progress=False)
    finally:
        handle.remove()


def reference_rows(config, store):
    """Activations computed directly from a full forward with output_hidden_states."""
    model, tokenizer = load_model(config.model, store)
    tokens = A.contexts(config, store=store).long()
    with torch.no_grad():
        hidden = model(input_ids=tokens, output_hidden_states=True).hidden_states[config.layer + 1]
    keep = torch.from_numpy(A.row_mask(tokens.numpy(), special_ids(tokenizer), config.first_position))
    return hidden[keep]


def test_truncated_forward_matches_full_forward_and_skips_later_blocks(tiny, tmp_path):
    model, _ = load_model(tiny["model"], Store(tmp_path))
    ids = torch.randint(0, model.config.vocab_size, (2, 12))
    with torch.no_grad():
        out = model(input_ids=ids, output_hidden_states=True)
    calls = []
    handle = decoder_blocks(model)[1].register_forward_hook(lambda *a: calls.append(1))
    try:
        assert torch.allclose(residual(model, 0, ids), out.hidden_states[1], atol=1e-6)
        assert not calls  # block 1 never ran for a read after block 0
    finally:
        handle.remove()
    assert torch.allclose(residual(model, 1, ids), out.hidden_states[2], atol=1e-6)
    last = residual(model, tiny["layers"] - 1, ids)  # raw residual; HF's last hidden state has the final norm
    assert torch.allclose(model.model.norm(last), out.hidden_states[tiny["layers"]], atol=1e-5)


def test_packing_puts_a_separator_first_and_between_documents(tiny, tmp_path):
    _, tokenizer = load_model(tiny["model"], Store(tmp_path))
    sep = separator_id(tokenizer)
    docs = ["alpha beta gamma", "the <|endoftext|> is text here", "delta"]
    packed = pack(tokenizer, docs * 20, context_length=8, n_contexts=30)
    assert packed.shape == (30, 8) and packed.dtype == torch.int32 and (packed[:, 0] == sep).all()
    stream = packed[:, 1:].reshape(-1).tolist()
    encoded = [tokenizer(d, add_special_tokens=False, split_special_tokens=True)["input_ids"] for d in docs]
    assert stream[: sum(len(e) + 1 for e in encoded)] == encoded[0] + [sep] + encoded[1] + [sep] + encoded[2] + [sep]
    # the literal text "<|endoftext|>" inside a document is text, not a document boundary
    assert sep not in encoded[1] and len(encoded[1]) > 6


def test_packaged_wikipedia_is_shuffled_deterministically():
    first = list(itertools.islice(documents("wikipedia"), 50))
    assert first == list(itertools.islice(documents("wikipedia"), 50))
    assert not all(doc < later for doc, later in zip(first, first[1:]))  # not in the file's order
    assert len(set(first)) == 50


def test_extraction_matches_a_full_forward_and_round_trips(tiny, tmp_path):
    store = Store(tmp_path)
    config = cfg(tiny)
    acts = A.load_activations(config, store=store, progress=False)
    n_contexts = config.n_tokens // config.context_length
    assert acts.tokens.shape == (n_contexts, 16) and acts.x.dtype == torch.float16
    assert acts.x.shape == (len(acts.row_context), 32) and acts.d_model == 32
    assert (acts.row_position >= config.first_position).all()
    assert not torch.isin(acts.tokens[acts.row_context, acts.row_position], torch.tensor(acts.special_ids)).any()
    expected = reference_rows(config, store)
    assert torch.allclose(acts.fp32(), expected, rtol=1e-3, atol=1e-3)  # float16 storage
    assert abs(acts.fp32(scaled=True).pow(2).sum(1).mean().item() - 1.0) < 1e-3
    assert acts.path.parent == store.root / "activations"
    manifest = json.loads((acts.path / "manifest.json").read_text())
    assert len(manifest["done"]) == len(manifest["plan"]["shards"]) == 5
    assert not (acts.path / "progress.json").exists()
    stamp = (acts.path / "manifest.json").stat().st_mtime_ns
    again = A.load_activations(config, store=store, progress=False)
    assert torch.equal(again.x, acts.x) and (acts.path / "manifest.json").stat().st_mtime_ns == stamp
    row = int((acts.row_position == 5).nonzero()[0])
    ids = acts.tokens[acts.row_context[row]].tolist()
    text = acts.context_text(row, window=2, mark="[]")
    decode = acts.tokenizer.decode
    token = decode(ids[5:6])
    lead = token[: len(token) - len(token.lstrip())]
    assert text == decode(ids[3:5]) + lead + "[" + token.lstrip() + "]" + decode(ids[6:8])
    assert acts.token_text(row) == token
    with pytest.raises(IndexError, match="out of range"):
        acts.context_text(len(acts))


def test_bfloat16_storage_and_first_position(tiny, tmp_path):
    store = Store(tmp_path)
    config = cfg(tiny, dtype="bfloat16", first_position=1, layer=0)
    acts = A.load_activations(config, store=store, progress=False)
    assert acts.x.dtype == torch.bfloat16 and (acts.row_position == 1).any()
    assert torch.allclose(acts.fp32(), reference_rows(config, store), rtol=1e-2, atol=1e-2)


def test_token_counts_match_the_contexts(tiny, tmp_path):
    store = Store(tmp_path)
    config = cfg(tiny)
    counts = A.token_counts(config, store=store)
    tokens = A.contexts(config, store=store).long()
    special = special_ids(load_model(config.model, store)[1])
    assert counts.dtype == torch.int64 and counts[special].sum() == 0
    assert counts.sum() == (~torch.isin(tokens, torch.tensor(special))).sum()
    assert counts[tokens[0, 3]] >= (tokens == tokens[0, 3]).sum() > 0


def test_interrupted_extraction_resumes_from_the_last_complete_shard(tiny, tmp_path):
    config = cfg(tiny)
    reference = A.load_activations(config, store=Store(tmp_path / "ref"), progress=False)
    store = Store(tmp_path / "run")
    interrupt_extraction(config, store)
    path = store.root / "activations" / reference.path.name
    journal = json.loads((path / "progress.json").read_text())
    assert sorted(journal["done"]) == ["0", "1"] and not (path / "manifest.json").exists()
    resumed = A.load_activations(config, store=store, progress=False)
    assert resumed.meta["extraction"]["shards_this_run"] == [2, 3, 4]
    assert torch.equal(resumed.x, reference.x) and resumed.scale == pytest.approx(reference.scale, rel=1e-12)


@pytest.mark.parametrize("damage", ["flip_shard", "truncate_x", "flip_tokens", "delete_manifest"])
def test_corrupt_cache_is_reported_and_reextracted(tiny, tmp_path, damage):
    store = Store(tmp_path)
    config = cfg(tiny)
    good = A.load_activations(config, store=store, progress=False)
    reference = good.x.clone()
    plan = json.loads((good.path / "manifest.json").read_text())["plan"]
    x_file = good.path / "x.bin"
    if damage == "flip_shard":
        r0 = plan["shards"][3][2]
        with x_file.open("r+b") as fh:
            fh.seek(r0 * 32 * 2 + 7)
            byte = fh.read(1)
            fh.seek(-1, 1)
            fh.write(bytes([byte[0] ^ 0xFF]))
        expect, redone = "shard 3 .* does not match its hash", [3]
    elif damage == "truncate_x":
        x_file.write_bytes(x_file.read_bytes()[:1000])
        expect, redone = "x.bin has 1000 bytes", [0, 1, 2, 3, 4]
    elif damage == "flip_tokens":
        tokens = np.load(good.path / "tokens.npy")
        tokens[2, 3] += 1
        np.save(good.path / "tokens.npy", tokens)
        expect, redone = "tokens.npy does not match its hash", [0, 1, 2, 3, 4]
    else:
        (good.path / "manifest.json").unlink()
        expect, redone = None, [0, 1, 2, 3, 4]
    del good
    if expect:
        with pytest.warns(UserWarning, match=expect) as record:
            fixed = A.load_activations(config, store=store, progress=False)
        assert {w.filename for w in record if "activation cache" in str(w.message)} == {__file__}  # the caller
    else:
        fixed = A.load_activations(config, store=store, progress=False)
    assert fixed.meta["extraction"]["shards_this_run"] == redone
    assert torch.equal(fixed.x, reference)
    assert A.load_activations(config, store=store, progress=False).meta["extraction"]["shards_this_run"] == redone


def test_next_token_loss_and_splicing(tiny, tmp_path):
    store = Store(tmp_path)
    config = cfg(tiny)
    tokens = A.contexts(config, store=store).long()[:5]
    model, tokenizer = load_model(config.model, store)
    with torch.no_grad():
        logits = model(input_ids=tokens).logits[:, :-1]
    target = tokens[:, 1:]
    valid = ~torch.isin(target, torch.tensor(special_ids(tokenizer)))
    manual = torch.nn.functional.cross_entropy(logits[valid], target[valid]).item()
    assert A.next_token_loss(config, tokens, store=store) == pytest.approx(manual, rel=1e-5)
    seen = []
    identity = A.next_token_loss(config, tokens, replace=lambda r: seen.append(r.shape) or r, store=store)
    assert identity == pytest.approx(manual, rel=1e-5)
    rows = A.row_mask(tokens.numpy(), special_ids(tokenizer), config.first_position).sum()
    assert sum(s[0] for s in seen) == rows and all(s[1] == 32 for s in seen)
    noisy = A.next_token_loss(config, tokens, replace=lambda r: r + 3 * torch.randn_like(r), store=store)
    assert noisy != pytest.approx(manual, rel=1e-3)
    with pytest.raises(ValueError, match="replace must return a tensor of shape"):
        A.next_token_loss(config, tokens, replace=lambda r: r[:, :5], store=store)
    with pytest.raises(ValueError, match="NaN or Inf"):
        A.next_token_loss(config, tokens, replace=lambda r: r * float("nan"), store=store)
    with pytest.raises(ValueError, match="integer tensor"):
        A.next_token_loss(config, tokens.float(), store=store)
    with pytest.raises(ValueError, match="ids in 0..399"):
        A.next_token_loss(config, tokens + 1000, store=store)


@pytest.mark.parametrize(
    "overrides,match",
    [
        ({"layer": -1}, "layer must be a non-negative integer"),
        ({"dtype": "float32"}, "dtype must be one of"),
        ({"context_length": 1}, "context_length must be >= 2"),
        ({"n_tokens": 10}, "less than one context"),
        ({"shard_tokens": 8}, "shard_tokens=8 is less than one context"),
        ({"first_position": 16}, "first_position=16 leaves no position"),
        ({"corpus": "/no/such/corpus"}, "not an existing .txt/.jsonl file or directory"),
        ({"corpus": "hf:"}, "names no dataset"),
    ],
)
def test_bad_configs_are_rejected_with_the_field_named(tiny, overrides, match):
    with pytest.raises(ValueError, match=match):
        cfg(tiny, **overrides)


def assert_nothing_cached(store, config):
    assert not (store.root / "activations").exists() or not any((store.root / "activations").iterdir()), config


def test_layer_out_of_range_writes_nothing(tiny, tmp_path):
    store = Store(tmp_path)
    with pytest.raises(ValueError, match=r"layer 3 is out of range .* 3 blocks: use 0..2"):
        A.load_activations(cfg(tiny, layer=tiny["layers"]), store=store, progress=False)
    assert_nothing_cached(store, "layer")


def test_empty_and_too_small_corpora(tiny, tmp_path):
    store = Store(tmp_path / "store")
    empty = tmp_path / "empty"
    empty.mkdir()
    (empty / "blank.txt").write_text("   \n")
    with pytest.raises(ValueError, match="contains no text"):
        A.load_activations(cfg(tiny, corpus=str(empty)), store=store, progress=False)
    small = tmp_path / "small.txt"
    small.write_text("A short document about cats.")
    with pytest.raises(ValueError, match=r"has only \d+ tokens .* lower n_tokens"):
        A.load_activations(cfg(tiny, corpus=str(small)), store=store, progress=False)
    assert_nothing_cached(store, "corpus")
    assert not (store.root / "contexts").exists() or not any((store.root / "contexts").iterdir())
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"text": "fine"}\n{"title": "no text field"}\n')
    with pytest.raises(ValueError, match=r"bad.jsonl:2 is not a JSON object with a 'text' field"):
        A.load_activations(cfg(tiny, corpus=str(bad)), store=store, progress=False)


def test_hub_names_refuse_clearly_offline(tiny, tmp_path, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    store = Store(tmp_path)
    with pytest.raises(ValueError, match="paper profile|hub access"):
        A.load_activations(cfg(tiny, model="paperlib-tests/no-such-model"), store=store, progress=False)
    with pytest.raises(ValueError, match="hub access"):
        A.load_activations(cfg(tiny, corpus="hf:monology/pile-uncopyrighted"), store=store, progress=False)
    with pytest.raises(ValueError, match="not an existing directory"):
        load_model("./no/such/dir", store)
    # no offline flag, but no hub either (a closed local port): a quick probe refuses at once
    monkeypatch.delenv("HF_HUB_OFFLINE")
    monkeypatch.delenv("TRANSFORMERS_OFFLINE", raising=False)
    monkeypatch.setenv("HF_ENDPOINT", "http://127.0.0.1:9")
    with pytest.raises(ValueError, match="127.0.0.1 is unreachable.*need hub access"):
        load_model("paperlib-tests/no-such-model", store)
    with pytest.raises(ValueError, match="127.0.0.1 is unreachable.*needs hub access"):
        A.load_activations(cfg(tiny, corpus="hf:some/dataset"), store=store, progress=False)
    assert_nothing_cached(store, "hub")


def test_smoke_real_packaged_model_and_corpus(monkeypatch):
    """SmolLM2-135M-Instruct (packaged GGUF) at the default layer on a few Wikipedia contexts."""
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    store = Store()  # the session's cache (conftest): the GGUF conversion is shared with other tests
    config = A.ActivationConfig(context_length=32, n_tokens=32 * 4, batch_contexts=2, shard_tokens=64)
    acts = A.load_activations(config, store=store, progress=False)
    model, tokenizer = load_model("smollm2", store)
    assert type(model).__name__ == "LlamaForCausalLM" and len(decoder_blocks(model)) == 30
    assert acts.x.shape[1] == 576 and 100 < acts.x.shape[0] <= 4 * 30 and torch.isfinite(acts.fp32()).all()
    assert acts.meta["separator"]["token"] == "<|endoftext|>" and "Wikipedia" in acts.meta["corpus"]
    assert torch.allclose(acts.fp32(), reference_rows(config, store), rtol=2e-3, atol=2e-3 * acts.fp32().abs().max())
    text = acts.context_text(0)
    assert "«" in text and "»" in text and len(text.split()) > 5
    assert 0 < acts.scale < 1  # residual norms of SmolLM2 at block 19 are in the hundreds
    models = Path(os.environ.get("PAPERLIB_MODELS") or store.root / "models")
    assert any(models.glob("smollm2-*/paperlib-conversion.json"))
