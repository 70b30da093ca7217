"""Thread counts chosen by measurement, for the fused kernels and for ``train()``'s whole step.

An OpenMP region ends in a barrier that waits for its slowest thread, and torch's OpenMP threads spin
while they wait. When another process holds one of two cores, one of our two threads waits a whole
scheduler slice for its turn, and short steps collapse: notebook 05's matched-organism ReLU/dnorm step
(d 16, n 32, 1,024 rows, 5 seeds; Intel Xeon, 2 cores) ran 555 steps/s quiet at two threads and 455 at
one, but 129 vs 456 beside a busy loop and 8 vs 456 beside a copy of itself. So each kernel, and each
training step, times its calls at torch's thread count and at fewer, and runs at the faster
(``ThreadChooser``).

Only where no number depends on the count. The fused kernels sum in a fixed order (tested). A
whole step goes through torch's reductions and GEMMs, which may split work by thread count, so
``MeasuredStep`` first runs the step from copies of the same state at every candidate count and
compares the results bit for bit; a step that differs keeps torch's thread count, unchosen.
"""

from __future__ import annotations

import contextlib
import copy
import time
from collections.abc import Callable, Hashable, Iterator, Sequence

import torch
from torch import Tensor
from torch.optim import Optimizer


class ThreadChooser:
    """The thread count of one kernel's (or step's) calls: each candidate (torch's thread count, halved
    down to one) is timed, an exponential average of its seconds per call is kept, and the current
    count is left only for one at least ``margin`` faster (timings of sub-millisecond calls are noisy).
    Now and then another candidate is tried once, so a change of load is noticed: after at least
    ``explore_every`` calls, and only once the calls since the last try took ``1 / explore_cost`` times
    what a call at that candidate costs, so trying a collapsing count (a two-thread step beside
    another process can take 30x longer) costs at most ``explore_cost`` of the time."""

    def __init__(
        self, explore_every: int = 64, smoothing: float = 0.25, margin: float = 0.1, explore_cost: float = 0.05
    ) -> None:
        self.explore_every, self.smoothing, self.margin, self.explore_cost = (
            explore_every,
            smoothing,
            margin,
            explore_cost,
        )
        self.seconds: dict[int, float] = {}
        self.current: int | None = None
        self.calls = 0
        self.since_try = (0, 0.0)  # calls and seconds since another candidate was last tried
        self.tries = 0

    @staticmethod
    def candidates() -> list[int]:
        most, counts = torch.get_num_threads(), []
        while most >= 1:
            counts.append(most)
            most //= 2
        return counts

    def pick(self) -> int:
        candidates = self.candidates()
        self.calls += 1
        untried = [t for t in candidates if t not in self.seconds]
        if untried:
            return untried[0]
        if self.current not in candidates:
            self.current = candidates[0]
        best = min(candidates, key=self.seconds.__getitem__)
        if self.seconds[best] < (1 - self.margin) * self.seconds[self.current]:
            self.current = best
        others = [t for t in candidates if t != self.current]
        if others:
            rival = others[self.tries % len(others)]
            calls, seconds = self.since_try
            if calls >= self.explore_every and seconds * self.explore_cost >= self.seconds[rival]:
                self.tries += 1
                return rival
        return self.current

    def record(self, threads: int, seconds: float) -> None:
        old = self.seconds.get(threads)
        self.seconds[threads] = seconds if old is None else old + self.smoothing * (seconds - old)
        calls, total = self.since_try
        self.since_try = (calls + 1, total + seconds) if threads == self.current else (0, 0.0)

    def run(self, call: Callable[[int], object]) -> None:
        """``call(threads)`` at the chosen thread count, timed."""
        threads = self.pick()
        start = time.perf_counter()
        call(threads)
        self.record(threads, time.perf_counter() - start)


_kernel_choosers: dict[str, ThreadChooser] = {}


def kernel_chooser(kernel: str) -> ThreadChooser:
    """The process-wide chooser of one fused kernel at one shape (its timings outlive a training run)."""
    return _kernel_choosers.setdefault(kernel, ThreadChooser())


@contextlib.contextmanager
def torch_threads(count: int) -> Iterator[None]:
    """torch's (hence MKL's, oneDNN's and our kernels') thread count inside the block."""
    before = torch.get_num_threads()
    torch.set_num_threads(count)
    try:
        yield
    finally:
        torch.set_num_threads(before)


def same_bits(a: Sequence[Tensor], b: Sequence[Tensor]) -> bool:
    """Whether two lists of tensors are equal bit for bit."""
    return len(a) == len(b) and all(
        x.shape == y.shape and x.dtype == y.dtype and torch.equal(_bytes(x), _bytes(y)) for x, y in zip(a, b)
    )


def _bytes(t: Tensor) -> Tensor:
    return t.detach().cpu().reshape(-1).contiguous().view(torch.uint8)


class MeasuredStep:
    """``train()``'s steps at a measured thread count, for each kind of step (``key``: e.g. its batch
    size and whether it runs in closed form), once a probe has shown that the kind's result does not
    depend on the count: the probe runs the step on deep copies of the module and its optimizer at
    every candidate count and compares every tensor of their states bit for bit. Not ``enabled``
    (training off the CPU), every step runs as called."""

    def __init__(self, enabled: bool = True) -> None:
        self.enabled = enabled
        self.choosers: dict[Hashable, ThreadChooser | None] = {}

    def run(
        self, key: Hashable, step: Callable[..., None], module: torch.nn.Module, optimizer: Optimizer, *args: object
    ) -> None:
        """``step(module, optimizer, *args)``, at the chosen thread count where the kind has one."""
        if self.enabled and key not in self.choosers:
            self.choosers[key] = self._probe(step, module, optimizer, args)
        chooser = self.choosers.get(key)
        if chooser is None:
            step(module, optimizer, *args)
            return

        def at(threads: int) -> None:
            with torch_threads(threads):
                step(module, optimizer, *args)

        chooser.run(at)

    @staticmethod
    def _probe(
        step: Callable[..., None], module: torch.nn.Module, optimizer: Optimizer, args: tuple
    ) -> ThreadChooser | None:
        candidates = ThreadChooser.candidates()
        if len(candidates) < 2:
            return None

        chooser = ThreadChooser()

        def outcome(threads: int) -> list[Tensor]:
            module_copy, optimizer_copy = copy.deepcopy((module, optimizer))
            with torch_threads(threads):
                start = time.perf_counter()
                step(module_copy, optimizer_copy, *args)
                seconds = time.perf_counter() - start
            if threads != candidates[0]:  # the first run may carry one-time costs (compilation, first allocations)
                chooser.record(threads, seconds)
            adam = [t for state in optimizer_copy.state.values() for t in state.values() if isinstance(t, Tensor)]
            return [*module_copy.state_dict().values(), *adam]

        reference = outcome(candidates[0])
        if all(same_bits(reference, outcome(threads)) for threads in candidates[1:]):
            return chooser  # the probe's runs at the other counts count as their first tries
        return None
