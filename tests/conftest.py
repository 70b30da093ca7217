"""Fixtures shared by test modules."""

import itertools
import json

import pytest
import torch

from paperlib.sources.corpus import documents

N_LAYERS = 3


@pytest.fixture(scope="session")
def tiny(tmp_path_factory):
    """A 3-block random Llama with its own tokenizer (a local model directory), and a .jsonl + .txt corpus of
    Wikipedia text."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

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
    config = LlamaConfig(
        vocab_size=len(tokenizer),
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=N_LAYERS,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=128,
    )
    torch.manual_seed(0)
    model_dir = root / "model"
    LlamaForCausalLM(config).save_pretrained(model_dir)
    tokenizer.save_pretrained(model_dir)
    corpus = root / "corpus"
    corpus.mkdir()
    (corpus / "a.jsonl").write_text("\n".join(json.dumps({"text": t}) for t in texts[:80]))
    (corpus / "b.txt").write_text("\n".join(texts[80:]))
    return {"model": str(model_dir), "corpus": str(corpus), "layers": N_LAYERS}
