"""Fixtures shared by test modules."""

import itertools
import json

import pytest
import torch

from paperlib.sources.corpus import documents

N_LAYERS = 3


@pytest.fixture(scope="session")
def tiny(tmp_path_factory):
    """A 3-block random Llama with its own tokenizer (a local model directory; also a GPT-NeoX and a GPT-2 of the
    same shape under ``models``), and a .jsonl + .txt corpus of Wikipedia text."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import (
        GPT2Config,
        GPT2LMHeadModel,
        GPTNeoXConfig,
        GPTNeoXForCausalLM,
        LlamaConfig,
        LlamaForCausalLM,
        PreTrainedTokenizerFast,
    )

    root = tmp_path_factory.mktemp("tiny")
    texts = list(itertools.islice(documents("wikipedia"), 120))
    bpe = Tokenizer(models.BPE())
    bpe.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    bpe.decoder = decoders.ByteLevel()
    bpe.train_from_iterator(
        texts,
        trainers.BpeTrainer(
            vocab_size=400, special_tokens=["<|endoftext|>"], initial_alphabet=pre_tokenizers.ByteLevel.alphabet()
        ),
    )
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=bpe, bos_token="<|endoftext|>", eos_token="<|endoftext|>")
    shape = dict(
        vocab_size=len(tokenizer),
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=N_LAYERS,
        num_attention_heads=4,
        max_position_embeddings=128,
    )
    config = LlamaConfig(num_key_value_heads=2, **shape)
    # the papers' model families too, same tokenizer and shape: Pythia's GPT-NeoX (paper A), GPT-2 (paper B)
    neox = GPTNeoXConfig(**shape)
    gpt2 = GPT2Config(vocab_size=len(tokenizer), n_embd=32, n_layer=N_LAYERS, n_head=4, n_positions=128)
    models_dirs = {}
    for family, model in [("llama", LlamaForCausalLM), ("gpt_neox", GPTNeoXForCausalLM), ("gpt2", GPT2LMHeadModel)]:
        torch.manual_seed(0)
        models_dirs[family] = root / ("model" if family == "llama" else family)
        model({"llama": config, "gpt_neox": neox, "gpt2": gpt2}[family]).save_pretrained(models_dirs[family])
        tokenizer.save_pretrained(models_dirs[family])
    corpus = root / "corpus"
    corpus.mkdir()
    (corpus / "a.jsonl").write_text("\n".join(json.dumps({"text": t}) for t in texts[:80]))
    (corpus / "b.txt").write_text("\n".join(texts[80:]))
    return {
        "model": str(models_dirs["llama"]),
        "models": {family: str(path) for family, path in models_dirs.items()},
        "corpus": str(corpus),
        "layers": N_LAYERS,
    }
