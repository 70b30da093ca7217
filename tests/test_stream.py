"""paperlib.sources.stream and train() on a stream: deterministic shuffled blocks, one block held at a time,
batches that cross blocks, exact resumption from a checkpoint's position, live activations of a real
(tiny, built in code; and the packaged) language model, and refusals with the fix."""

from dataclasses import replace

import numpy as np
import pytest
import torch

from paperlib.sae.bank import SAEBank, SAEConfig
from paperlib.sae.train import TrainConfig, train, train_many
from paperlib.sources.activations import ActivationConfig, row_mask
from paperlib.sources.corpus import documents, pack, packed, special_ids
from paperlib.sources.llm import load_model, residual
from paperlib.sources.stream import Feed, ModelStream, RowStream, TensorStream
from paperlib.store import Store
from test_train import interrupted_and_resumed


def rows(n=1000, d=8, seed=0) -> torch.Tensor:
    return torch.randn(n, d, generator=torch.Generator().manual_seed(seed))


def test_blocks_are_seeded_shuffles_of_consecutive_rows_read_cyclically():
    x = rows(250)
    stream = TensorStream(x, block_rows=100, seed=3)
    for index, source in [(0, x[:100]), (1, x[100:200]), (2, torch.cat([x[200:], x[:50]]))]:
        block = stream.block(index)
        assert torch.equal(stream.raw_block(index), source)
        assert torch.equal(block.sort(0).values, source.sort(0).values)  # the same rows ...
        assert not torch.equal(block, source)  # ... shuffled
        assert torch.equal(block, TensorStream(x, block_rows=100, seed=3).block(index))  # the same way every time
    assert not torch.equal(stream.block(0), TensorStream(x, block_rows=100, seed=4).block(0))


def test_a_memory_mapped_array_streams_like_the_tensor(tmp_path):
    x = rows(300).numpy()
    np.save(tmp_path / "x.npy", x)
    mapped = np.load(tmp_path / "x.npy", mmap_mode="r")
    a, b = TensorStream(mapped, block_rows=128), TensorStream(torch.from_numpy(x), block_rows=128)
    assert all(torch.equal(a.block(i), b.block(i)) for i in range(4))
    assert a.identity() == b.identity()


def test_a_feed_takes_consecutive_rows_across_blocks_and_holds_one_block():
    x = rows(250)
    stream = TensorStream(x, block_rows=100)
    requested = []
    raw_block = stream.raw_block
    stream.raw_block = lambda index: requested.append(index) or raw_block(index)  # type: ignore[method-assign]
    feed = Feed(stream)
    batches = [feed.take(64) for _ in range(5)]  # 320 rows: blocks 0, 1, 2 and the start of 3
    assert torch.equal(torch.cat(batches), torch.cat([stream.block(i) for i in range(4)])[:320])
    assert requested[:4] == [0, 1, 2, 3] and feed.position == (3, 20)
    resumed = Feed(stream, (1, 28))  # where the third batch starts
    assert torch.equal(resumed.take(64), batches[2])


class Counting(RowStream):
    """Block ``i`` is ``block_rows`` rows of the value i (so a batch shows which blocks it came from)."""

    def __init__(self, block_rows: int, d: int = 4) -> None:
        super().__init__(d, seed=0)
        self.block_rows, self.built = block_rows, []

    def raw_block(self, index: int) -> torch.Tensor:
        self.built.append(index)
        return torch.full((self.block_rows, self.d_model), float(index)) + torch.randn(
            self.block_rows, self.d_model, generator=torch.Generator().manual_seed(index)
        )

    def identity(self) -> dict:
        return {"kind": "counting", "block_rows": self.block_rows}


def test_training_from_a_stream_builds_blocks_as_it_goes():
    stream = Counting(block_rows=256)
    bank = SAEBank(SAEConfig("relu", 4, 8, n_seeds=2, l1_coeff=1e-3))
    history = train(bank, stream, TrainConfig(steps=20, lr=1e-3, batch_size=64, stats_rows=128), progress=False)
    # the first slice (block 0, for the scale, b_dec and evaluation), then 20 x 64 rows = 5 blocks from block 0 on
    assert stream.built == [0, 0, 1, 2, 3, 4] and history["step"].tolist() == [0, 20]
    assert np.isfinite(history.final("loss")).all()


def test_a_stream_run_interrupted_resumes_to_the_same_weights(tmp_path):
    x = rows(700, d=8)
    cfg = TrainConfig(
        steps=20,
        lr=1e-3,
        batch_size=48,  # 960 rows over blocks of 160: batches cross block boundaries
        log_every=5,
        normalize=True,
        stats_rows=200,
        checkpoint_fractions=(0.5, 1.0),
        checkpoint_dir=str(tmp_path / "run"),
    )

    def make() -> SAEBank:
        return SAEBank(SAEConfig("topk", 8, 16, k=3, n_seeds=2, seed=1))

    reference, resumed = interrupted_and_resumed(make, TensorStream(x, block_rows=160), cfg)
    for (name, p), q in zip(reference.state_dict().items(), resumed.state_dict().values()):
        torch.testing.assert_close(p, q, rtol=0, atol=0, equal_nan=True, msg=name)
    with pytest.raises(ValueError, match="holds a run of another configuration or data.*stream"):
        train(make(), TensorStream(x, block_rows=80), cfg, progress=False)  # another stream: refused


def test_a_stream_needs_a_batch_size_and_rows_of_the_banks_width():
    bank = SAEBank(SAEConfig("relu", 4, 8))
    with pytest.raises(ValueError, match="needs TrainConfig.batch_size"):
        train(bank, Counting(64), TrainConfig(steps=1), progress=False)
    with pytest.raises(ValueError, match="d_model=6, the bank expects 4"):
        train(bank, Counting(64, d=6), TrainConfig(steps=1, batch_size=8), progress=False)
    with pytest.raises(ValueError, match=r"TensorStream takes rows \[n_rows >= 1, d_model\]"):
        TensorStream(torch.zeros(0, 4))
    with pytest.raises(ValueError, match="block_rows must be a positive integer"):
        TensorStream(rows(), block_rows=0)


def lockstep_banks() -> tuple[list[SAEBank], list[TrainConfig]]:
    """Three banks of different architectures, widths and schedules that can share batches of 40 rows."""
    banks = [
        SAEBank(SAEConfig("topk", 8, 16, k=3, n_seeds=2, seed=1)),
        SAEBank(SAEConfig("relu", 8, 24, n_seeds=1, seed=2, l1_coeff=1e-3)),
        SAEBank(SAEConfig("batchtopk", 8, 16, k=2, n_seeds=2, seed=3)),
    ]
    base = TrainConfig(steps=12, lr=1e-3, batch_size=40, log_every=4, stats_rows=100)
    cfgs = [replace(base, normalize=True), replace(base, lr=3e-3, steps=8), replace(base, warmup_steps=4)]
    return banks, cfgs


def states(banks: list[SAEBank]) -> list[list[torch.Tensor]]:
    return [list(bank.state_dict().values()) for bank in banks]


def assert_same(a: list[list[torch.Tensor]], b: list[list[torch.Tensor]]) -> None:
    for x, y in zip(a, b, strict=True):
        for p, q in zip(x, y, strict=True):
            torch.testing.assert_close(p, q, rtol=0, atol=0, equal_nan=True)


def test_banks_in_lockstep_end_as_each_would_alone_and_read_each_batch_once(capsys):
    x = rows(500, d=8)
    alone, cfgs = lockstep_banks()
    histories = [train(bank, TensorStream(x, block_rows=64), cfg, progress=False) for bank, cfg in zip(alone, cfgs)]
    together, _ = lockstep_banks()
    stream = TensorStream(x, block_rows=64)
    requested = []
    raw_block = stream.raw_block
    stream.raw_block = lambda index: requested.append(index) or raw_block(index)  # type: ignore[method-assign]
    shared = train_many(together, stream, cfgs, memory_limit=2**40)
    assert_same(states(alone), states(together))
    for a, b in zip(histories, shared):
        assert a["step"].tolist() == b["step"].tolist() and np.array_equal(a["loss"], b["loss"])
    # 12 steps x 40 rows = 480 rows = blocks 0..7, each read once (block 0 also for the first slice)
    assert requested == [0, 1, 0, 1, 2, 3, 4, 5, 6, 7]
    assert "5 SAEs in 3 banks, about" in capsys.readouterr().out


def test_banks_that_do_not_fit_together_take_one_pass_each(capsys):
    x = rows(500, d=8)
    alone, cfgs = lockstep_banks()
    for bank, cfg in zip(alone, cfgs):
        train(bank, TensorStream(x, block_rows=64), cfg, progress=False)
    together, _ = lockstep_banks()
    train_many(together, TensorStream(x, block_rows=64), cfgs, memory_limit=1)
    assert_same(states(alone), states(together))
    assert "3 passes over the stream" in capsys.readouterr().out


def test_banks_in_lockstep_resume_each_from_its_own_checkpoint(tmp_path):
    x = rows(500, d=8)
    banks, cfgs = lockstep_banks()
    train_many(banks, TensorStream(x, block_rows=64), cfgs, progress=False)
    reference = states(banks)
    # checkpoints at different steps (3, 6 for the first; 2, 4 for the 8-step second; 6 for the third), then a
    # Ctrl-C at the third bank's log of step 8: each resumes from its own last checkpoint
    fractions = [(0.25, 0.5, 1.0), (0.25, 0.5, 1.0), (0.5, 1.0)]
    cfgs = [
        replace(cfg, checkpoint_fractions=f, checkpoint_dir=str(tmp_path / str(i)))
        for i, (cfg, f) in enumerate(zip(cfgs, fractions))
    ]
    logs = []

    def interrupt(bank):
        logs.append(1)
        if len(logs) == 3:  # its logs at steps 0, 4, 8
            raise KeyboardInterrupt
        return 0.0

    with pytest.raises(KeyboardInterrupt):
        train_many(lockstep_banks()[0], TensorStream(x, block_rows=64), cfgs, callbacks=[{}, {}, {"c": interrupt}])
    resumed, _ = lockstep_banks()
    callbacks = [{}, {}, {"c": lambda bank: 0.0}]
    train_many(resumed, TensorStream(x, block_rows=64), cfgs, callbacks=callbacks, progress=False)
    assert_same(reference, states(resumed))


def test_lockstep_needs_one_batch_size_and_one_config_per_bank():
    banks, cfgs = lockstep_banks()
    stream = TensorStream(rows(100, d=8))
    with pytest.raises(ValueError, match="the same batch_size, got \\[32, 40\\]"):
        train_many(banks, stream, [replace(cfgs[0], batch_size=32), *cfgs[1:]])
    with pytest.raises(ValueError, match="one TrainConfig and one callbacks mapping per bank, got 3 banks, 2 configs"):
        train_many(banks, stream, cfgs[:2])


def stream_cfg(tiny, **overrides) -> ActivationConfig:
    fields = dict(model=tiny["model"], layer=1, corpus=tiny["corpus"], context_length=16, batch_contexts=3)
    return ActivationConfig(**{**fields, **overrides})


def test_a_model_stream_gives_the_rows_the_cache_would_hold(tiny, tmp_path):
    store = Store(tmp_path)
    config = stream_cfg(tiny)
    stream = ModelStream(config, block_contexts=5, store=store)
    model, tokenizer = load_model(config.model, store)
    contexts = pack(tokenizer, documents(config.corpus), 16, 15).numpy()  # blocks 0, 1 and 2
    for index in (0, 2, 1):  # 1 after 2: tokenised from the start again
        tokens = contexts[5 * index : 5 * index + 5]
        keep = torch.from_numpy(row_mask(tokens, special_ids(tokenizer), config.first_position))
        expected = residual(model, config.layer, torch.from_numpy(tokens).long())[keep]
        torch.testing.assert_close(stream.raw_block(index), expected, rtol=1e-5, atol=1e-6)
    assert stream.identity() == ModelStream(config, block_contexts=5, store=store).identity()
    assert stream.identity() != ModelStream(replace(config, layer=0), block_contexts=5, store=store).identity()


def test_a_model_stream_starts_the_corpus_over_when_it_runs_out(tiny, tmp_path):
    store = Store(tmp_path)
    stream = ModelStream(stream_cfg(tiny), block_contexts=4, store=store)
    one_pass = np.stack(list(packed(load_model(tiny["model"], store)[1], documents(tiny["corpus"]), 16)))
    n = len(one_pass)
    across = stream._contexts_from(n - 2, 4)  # the last two contexts of the corpus, then its first two again
    assert np.array_equal(across, np.concatenate([one_pass[-2:], one_pass[:2]]))


@pytest.mark.parametrize("family", ["gpt_neox", "gpt2"])
def test_the_papers_model_families_stream_into_banks_in_lockstep(tiny, tmp_path, family):
    """The paper path in miniature: Pythia's and GPT-2's architectures (random, built in code), a live stream
    of their residual after block 1 (what HF's hidden_states[2] holds), several banks from it."""
    store = Store(tmp_path)
    config = stream_cfg(tiny, model=tiny["models"][family])
    stream = ModelStream(config, block_contexts=6, store=store)
    model, tokenizer = load_model(config.model, store)
    tokens = pack(tokenizer, documents(config.corpus), 16, 6)
    with torch.no_grad():
        hidden = model(input_ids=tokens.long(), output_hidden_states=True).hidden_states[config.layer + 1]
    keep = torch.from_numpy(row_mask(tokens.numpy(), special_ids(tokenizer), config.first_position))
    torch.testing.assert_close(stream.raw_block(0), hidden[keep], rtol=1e-5, atol=1e-5)
    banks = [SAEBank(SAEConfig("topk", 32, 64, k=4, n_seeds=2)), SAEBank(SAEConfig("relu", 32, 48, l1_coeff=1e-3))]
    cfg = TrainConfig(steps=6, lr=1e-3, batch_size=64, stats_rows=128, normalize=True)
    histories = train_many(banks, stream, [cfg, cfg], progress=False)
    assert all(np.isfinite(h.final("fvu")).all() for h in histories)


def test_training_on_the_packaged_model_live(tmp_path):
    """Smoke scale on the real asset: SmolLM2 block 19 on the packaged corpus, a few steps."""
    config = ActivationConfig(context_length=32, batch_contexts=8)
    stream = ModelStream(config, block_contexts=16, store=Store(tmp_path))
    bank = SAEBank(SAEConfig("topk", stream.d_model, 64, k=4))
    history = train(bank, stream, TrainConfig(steps=4, lr=1e-3, batch_size=128, stats_rows=256), progress=False)
    assert stream.d_model == 576 and np.isfinite(history.final("fvu")).all()


def test_a_model_stream_holds_out_its_first_contexts(tiny, tmp_path):
    """``skip_contexts``: the contexts a notebook evaluates on (the cache's) are never served, on any pass."""
    store = Store(tmp_path)
    stream = ModelStream(stream_cfg(tiny), block_contexts=4, skip_contexts=3, store=store)
    one_pass = np.stack(list(packed(load_model(tiny["model"], store)[1], documents(tiny["corpus"]), 16)))
    assert np.array_equal(stream._contexts_from(0, 4), one_pass[3:7])
    n = len(one_pass) - 3
    assert np.array_equal(stream._contexts_from(n - 1, 2), np.stack([one_pass[-1], one_pass[3]]))  # a second pass
    assert stream.identity()["skip_contexts"] == 3
    assert "skip_contexts" not in ModelStream(stream_cfg(tiny), block_contexts=4, store=store).identity()
    with pytest.raises(ValueError, match="skip_contexts must be an integer >= 0"):
        ModelStream(stream_cfg(tiny), skip_contexts=-1, store=store)
    everything = ModelStream(stream_cfg(tiny), block_contexts=4, skip_contexts=len(one_pass), store=store)
    with pytest.raises(ValueError, match=f"after the {len(one_pass)} held out"):
        everything.raw_block(0)


def test_a_stream_leaves_out_massive_rows_of_each_block():
    x = rows(300, seed=3)
    x[7] *= 50.0  # one massive row, 50x a typical norm
    plain, filtered = TensorStream(x, block_rows=100), TensorStream(x, block_rows=100, max_norm_factor=10.0)
    with pytest.warns(RuntimeWarning, match="left out 1 of 100 training rows"):
        first = filtered.block(0)
    assert len(first) == 99 and not any(torch.equal(r, x[7]) for r in first)
    assert len(filtered.block(1)) == 100 and torch.equal(filtered.block(1), plain.block(1))
    assert filtered.identity()["max_norm_factor"] == 10.0 and "max_norm_factor" not in plain.identity()
    with pytest.raises(ValueError, match="max_norm_factor must be a number > 1"):
        TensorStream(x, max_norm_factor=0.5)
