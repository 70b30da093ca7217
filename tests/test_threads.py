"""Thread counts chosen by measurement (paperlib/sae/threads.py): the chooser follows the faster count, and
a whole training step is switched only after a probe shows that the count changes none of its bits."""

import pytest
import torch

from paperlib.sae.bank import SAEBank, SAEConfig
from paperlib.sae.threads import MeasuredStep, ThreadChooser, same_bits, torch_threads
from paperlib.sae.train import TrainConfig, train


def test_thread_chooser_runs_the_faster_count_and_notices_a_change(monkeypatch):
    monkeypatch.setattr(torch, "get_num_threads", lambda: 4)
    chooser = ThreadChooser(explore_every=10, smoothing=1.0)
    assert chooser.candidates() == [4, 2, 1]
    seconds = {4: 1.0, 2: 1.05, 1: 3.0}  # quiet machine: more threads, a little faster (within the margin)
    picked = []
    for _ in range(40):
        threads = chooser.pick()
        picked.append(threads)
        chooser.record(threads, seconds[threads])
    assert picked[:3] == [4, 2, 1] and picked.count(4) >= 34  # every candidate once, then mostly the fastest
    seconds = {4: 9.0, 2: 1.5, 1: 3.0}  # another process takes cores: 4 threads collapse
    for _ in range(40):
        threads = chooser.pick()
        picked.append(threads)
        chooser.record(threads, seconds[threads])
    assert picked[-20:].count(2) >= 18


def test_thread_chooser_keeps_its_count_against_a_rival_within_the_margin(monkeypatch):
    monkeypatch.setattr(torch, "get_num_threads", lambda: 2)
    chooser = ThreadChooser(explore_every=50, smoothing=1.0, margin=0.1)
    for threads, seconds in ((2, 1.0), (1, 0.95)):  # one thread 5 % faster: noise, not a reason to switch
        assert chooser.pick() == threads
        chooser.record(threads, seconds)
    assert [chooser.pick() for _ in range(3)] == [2, 2, 2]
    chooser.record(1, 0.8)  # 20 % faster: switch
    assert chooser.pick() == 1


def test_trying_a_collapsing_count_costs_at_most_its_share_of_the_time(monkeypatch):
    monkeypatch.setattr(torch, "get_num_threads", lambda: 2)
    chooser = ThreadChooser(explore_every=8, smoothing=1.0, explore_cost=0.05)
    seconds = {2: 30.0, 1: 1.0}  # beside another process two threads collapse, 30x slower than one
    spent = {2: 0.0, 1: 0.0}
    for _ in range(20_000):
        threads = chooser.pick()
        spent[threads] += seconds[threads]
        chooser.record(threads, seconds[threads])
    assert chooser.current == 1 and chooser.tries >= 10  # it keeps checking, ...
    assert spent[2] / (spent[1] + spent[2]) <= 0.05 + 30 / sum(spent.values())  # ... within its budget


def test_thread_chooser_times_real_calls():
    chooser, seen = ThreadChooser(), []
    chooser.run(seen.append)
    assert seen == [torch.get_num_threads()] and chooser.seconds[seen[0]] >= 0


def test_same_bits_compares_bits_not_values():
    a = torch.tensor([0.0, float("nan"), 1.0])
    assert same_bits([a], [a.clone()])  # NaN with the same bits counts as equal
    assert not same_bits([a], [torch.tensor([-0.0, float("nan"), 1.0])])  # -0.0 == 0.0 as values, not as bits
    assert not same_bits([a], [a.double()]) and not same_bits([a], [a[:2]]) and not same_bits([a], [])


class Counter(torch.nn.Module):
    """A 'model' whose step writes a number into its state: the thread count it ran at, or a constant."""

    def __init__(self) -> None:
        super().__init__()
        self.register_buffer("value", torch.zeros(()))


def step_recording_threads(module, optimizer, seen):
    seen.append(torch.get_num_threads())
    module.value.fill_(torch.get_num_threads())


def step_recording_constant(module, optimizer, seen):
    seen.append(torch.get_num_threads())
    module.value.add_(1)


@pytest.fixture
def two_threads():
    with torch_threads(2):
        yield


def test_a_step_whose_result_depends_on_the_count_keeps_torchs_count(two_threads, monkeypatch):
    module, seen = Counter(), []
    optimizer = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=0.1)
    monkeypatch.setattr(ThreadChooser, "pick", lambda self: 1)  # a chooser, if one were made, would pick 1
    measured = MeasuredStep()
    for _ in range(5):
        measured.run("kind", step_recording_threads, module, optimizer, seen)
    assert measured.choosers["kind"] is None  # the probe saw 2 != 1
    assert seen[-5:] == [2] * 5 and module.value.item() == 2


def test_a_step_whose_result_does_not_depend_on_the_count_is_chosen_and_the_probe_leaves_no_trace(
    two_threads, monkeypatch
):
    module, seen = Counter(), []
    optimizer = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=0.1)
    monkeypatch.setattr(ThreadChooser, "pick", lambda self: 1)
    measured = MeasuredStep()
    for _ in range(5):
        measured.run("kind", step_recording_constant, module, optimizer, seen)
    assert isinstance(measured.choosers["kind"], ThreadChooser)
    assert seen == [2, 1] + [1] * 5  # the probe at 2 and 1 thread (on copies), then every step at the pick
    assert module.value.item() == 5  # the probe's steps ran on copies
    assert torch.get_num_threads() == 2  # restored after every step


def test_the_probes_timings_are_the_choosers_first_tries(two_threads, monkeypatch):
    """The probe already ran the step at every count: the chooser starts from those timings (all but the
    first run's, which may carry one-time costs), so no real step goes to a count only to time it."""
    module, seen = Counter(), []
    optimizer = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=0.1)
    measured = MeasuredStep()
    measured.run("kind", step_recording_constant, module, optimizer, seen)
    chooser = measured.choosers["kind"]
    assert isinstance(chooser, ThreadChooser) and set(chooser.seconds) == {1, 2}
    assert seen == [2, 1, 2]  # the probe at 2 and 1, then the first real step at 2 (untried outside the probe)
    measured.run("kind", step_recording_constant, module, optimizer, seen)
    assert len(seen) == 4 and chooser.tries == 0  # then the faster count, without an exploratory try


def test_off_the_cpu_every_step_runs_as_called(two_threads):
    module, seen = Counter(), []
    optimizer = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=0.1)
    measured = MeasuredStep(enabled=False)
    measured.run("kind", step_recording_constant, module, optimizer, seen)
    assert seen == [2] and measured.choosers == {}


ARCHITECTURES = [
    ("relu", {}),
    ("relu_dnorm", {}),
    ("topk", {"k": 3, "aux_coeff": 1 / 32, "dead_tokens": 256}),  # AuxK's autograd step once latents die
    ("batchtopk", {"k": 3}),
    ("matryoshka", {"k": 3}),
    ("gated", {}),
    ("jumprelu", {"target_l0": 3.0}),
    ("panneal", {}),
]


@pytest.mark.parametrize("architecture, fields", ARCHITECTURES, ids=[a for a, _ in ARCHITECTURES])
def test_training_at_measured_thread_counts_equals_training_at_torchs(two_threads, monkeypatch, architecture, fields):
    """The promise that lets train() choose: whatever the picks (here: a different count every step), a run
    gives the bits of one at torch's thread count, in every architecture, dense or fused path alike."""
    x = torch.randn(700, 16, generator=torch.Generator().manual_seed(3)).abs()
    cfg = SAEConfig(architecture, 16, 32, l1_coeff=1e-2, n_seeds=2, seed=4, **fields)
    schedule = TrainConfig(steps=24, lr=3e-3, batch_size=256, log_every=24)
    monkeypatch.setattr(ThreadChooser, "pick", lambda self: 2)
    steady = SAEBank(cfg)
    train(steady, x, schedule, progress=False)
    picks = []
    monkeypatch.setattr(ThreadChooser, "pick", lambda self: picks.append(1 + len(picks) % 2) or picks[-1])
    switching = SAEBank(cfg)
    train(switching, x, schedule, progress=False)
    assert same_bits(list(steady.state_dict().values()), list(switching.state_dict().values()))
