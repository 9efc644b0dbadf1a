"""How many draft nodes to verify: expected tokens per step against the measured cost of verifying them.

Numpy (the batch's size choice a compiled pass). On a CPU one forward over 8 tokens costs about twice one decoding
step; on a GPU nearly the same as one. The curve is measured on the machine (the verifier's prior: ``costs.py``
probes a model), never assumed, then learned from every real step (:class:`CostModel`). :class:`Sizer` is the one
place that decides a step's size: the cut of the candidates, the padding, the explorations, the look-ahead branch
and the speed guard.
"""

from __future__ import annotations

import functools
import math
from dataclasses import dataclass
from typing import Protocol, Sequence

import numpy as np

from .compiled import f64, i64, kernel, view


@dataclass(frozen=True)
class CostCurve:
    """Measured cost of one verification forward as a function of the number of tree nodes (per row).

    Attributes:
        sizes: (m,) int, increasing node counts that were measured, starting at 1.
        ms: (m,) float, milliseconds per forward at each size.
    """

    sizes: np.ndarray
    ms: np.ndarray

    def __post_init__(self) -> None:
        if len(self.sizes) == 0 or self.sizes[0] != 1 or np.any(np.diff(self.sizes) <= 0):
            raise ValueError("CostCurve.sizes must start at 1 and increase")
        if self.ms.shape != self.sizes.shape or np.any(self.ms <= 0):
            raise ValueError("CostCurve.ms must be positive, one per size")

    @staticmethod
    def flat(max_size: int = 64) -> CostCurve:
        """Verification as cheap at ``max_size`` nodes as at one (a GPU-like curve; tests, forced benchmarks)."""
        sizes = np.unique([1, max_size])
        return CostCurve(sizes=sizes, ms=np.ones(len(sizes)))

    @property
    def plain_ms(self) -> float:
        """What a step that verifies no draft costs: one node, or a larger size where that is cheaper."""
        return float(self._envelope[0])

    @functools.cached_property
    def _envelope(self) -> np.ndarray:
        """(m,) cost of each measured size if it may be padded up to any larger measured size."""
        return np.minimum.accumulate(self.ms[::-1])[::-1]

    def padded_size(self, num_nodes: int) -> int:
        """The node count to actually run for ``num_nodes`` nodes: a larger measured size when that is cheaper.

        Matrix kernels are not monotone in the row count on CPUs (3 rows can cost more than 4), so the
        verifier pads a tree with inert nodes up to this size.
        """
        at_least = self.sizes >= num_nodes
        if not np.any(at_least):
            return int(num_nodes)
        candidates = np.flatnonzero(at_least)
        best = candidates[np.argmin(self.ms[candidates])]
        interpolated = np.interp(num_nodes, self.sizes, self.ms)
        return int(self.sizes[best]) if self.ms[best] < interpolated else int(num_nodes)

    def relative(self, num_nodes: np.ndarray) -> np.ndarray:
        """Cost of verifying ``num_nodes`` nodes (padded as :meth:`padded_size`) relative to one plain step."""
        num_nodes = np.asarray(num_nodes)
        if num_nodes.max(initial=0) < len(self._relative):
            return self._relative[num_nodes]
        return self._relative_cost(num_nodes)

    @functools.cached_property
    def _relative(self) -> np.ndarray:
        """(largest size + 1,) :meth:`relative` of 0 .. the largest measured size, computed once per curve: sizing
        asks for several a step."""
        return self._relative_cost(np.arange(int(self.sizes[-1]) + 1))

    def _relative_cost(self, num_nodes: np.ndarray) -> np.ndarray:
        interpolated = np.interp(num_nodes, self.sizes, self.ms)
        at_least = np.searchsorted(self.sizes, num_nodes, side="left")
        padded = np.append(self._envelope, np.inf)[np.minimum(at_least, len(self.sizes))]
        return np.minimum(interpolated, padded) / self._envelope[0]


def best_size(scores: np.ndarray, curve: CostCurve, fixed: int = 1) -> int:
    """How many of the best-first candidate nodes to verify to maximise expected tokens per unit of time.

    Verifying the root plus the first ``k`` candidates yields ``1 + sum(scores[:k])`` tokens in expectation
    (each node is accepted with the probability of its whole path, plus one bonus token) and costs
    ``curve.relative(k + fixed)``. ``k = 0`` is plain decoding.

    Args:
        scores: (m,) non-increasing estimated path probabilities of the candidates, best first.
        fixed: nodes verified whatever ``k`` is: the root, plus any look-ahead branch.

    Returns:
        k in ``[0, m]``.

    >>> cpu = CostCurve(sizes=np.array([1, 2, 8]), ms=np.array([40.0, 56, 80]))
    >>> best_size(np.array([0.9, 0.8, 0.1]), cpu), best_size(np.array([0.2, 0.1]), cpu)
    (2, 0)
    """
    return best_batch_size([scores], curve, fixed)


def best_batch_size(scores: Sequence[np.ndarray], curve: CostCurve, fixed: int = 1) -> int:
    """:func:`best_size` for a batch whose rows are all padded to one tree size: the k that maximises the
    expected tokens of all rows (a row with fewer candidates verifies all of them) per unit of the cost of
    ``k + fixed`` nodes per row (``curve`` measured at this batch size).

    Args:
        scores: per row, (m_b,) non-increasing estimated path probabilities of its candidates, best first.

    Returns:
        k in ``[0, max m_b]``.
    """
    lengths = np.array([len(s) for s in scores], dtype=np.int64)
    most = int(lengths.max(initial=0))
    flat = np.concatenate([np.asarray(s, dtype=np.float64) for s in scores]) if len(scores) else np.zeros(0)
    return int(_best_k(flat, lengths, np.asarray(curve.relative(np.arange(most + 1) + fixed), dtype=np.float64)))


@kernel(i64, view(f64), view(i64), view(f64))
def _best_k(flat, lengths, relative):
    """:func:`best_batch_size` of the rows' scores laid end to end (row ``b``: the next ``lengths[b]``), given the
    relative cost of every ``k`` (``relative[k]``): the first k with the most expected tokens per cost."""
    expected = np.zeros(len(relative))
    start = 0
    for row in range(len(lengths)):
        gain = 0.0  # the row's expected drafted tokens at k: its first k scores (all of them past its length)
        for k in range(len(relative)):
            if 0 < k <= lengths[row]:
                gain += flat[start + k - 1]
            expected[k] += 1.0 + gain
        start += lengths[row]
    return np.argmax(expected / relative)


def allocate(scores: Sequence[np.ndarray], cost: StepCost) -> np.ndarray:
    """How many tokens of each row's chain to verify when the rows share one step of any total size (TETRIS).

    A serving engine that verifies flattened per-request drafts (vLLM) pays for the step's total tokens, not for
    the longest row. So the step keeps the ``B`` candidate tokens of the whole batch most likely to be accepted,
    with ``B`` maximising the expected tokens of the step (one per row, plus the kept scores) per unit of its
    cost (``cost.ms(rows + B)``). A row's scores never rise along its chain, so the kept tokens of each row are a
    prefix of it, and a row whose candidates keep failing (low scores) gets none while others are long.

    Args:
        scores: per row, (m_b,) non-increasing estimated probabilities that the target accepts each prefix of
            its chain.
        cost: the step's cost in its total tokens.

    Returns:
        (rows,) int64, each in ``[0, m_b]``.

    >>> allocate([np.array([.9, .8, .2]), np.array([.3])], StepCost.line(10.0, 2.0)).tolist()
    [2, 0]
    """
    rows = len(scores)
    flat = np.concatenate([np.asarray(s, dtype=np.float64) for s in scores]) if rows else np.zeros(0)
    owner = np.repeat(np.arange(rows), [len(s) for s in scores])
    order = np.argsort(-flat, kind="stable")  # ties keep a row's own order: its kept tokens stay a prefix
    expected = rows + np.concatenate([[0.0], np.cumsum(flat[order])])
    kept = int(np.argmax(expected / cost.ms(rows + np.arange(len(flat) + 1))))
    return np.bincount(owner[order[:kept]], minlength=rows)


class CostModel:
    """The cost of verifying k nodes per row on this machine, learned from every real step; a probe is the prior.

    Each measured size keeps its last ``window`` observed times and is estimated by their ``quantile`` (another
    process only ever adds time, so the quick steps say what a step costs; a machine that stays slower moves the
    estimate within ``window`` steps). A step run between two measured sizes counts for the nearer one, scaled by
    the curve's shape. Sizes not observed yet (or whose times expired) follow the prior, shifted (in log space) like
    the observed sizes around them, so a probe taken on a loaded (or idle) machine is corrected everywhere by the
    first few dozen steps. A size with fewer than ``min_samples`` times is priced at most at its prior, so one slow
    time neither raises it nor, through the shift, its neighbours. :meth:`explore` now and then asks for a step that
    measures what the decoder would otherwise never run: a plain step (the unit every other size is judged against),
    the next size up, and any size inside the range the decoder runs that has fewer than ``min_samples`` times (one
    time taken in a noisy moment would otherwise steer every tree around that size for good). Explorations are
    spaced by what they cost: one of a size is granted once the steps since the last cost ``explore_every`` times
    its price, so exploring never takes more than ``1 / explore_every`` of the time, however steep the curve. A
    size's times expire once it has not run for ``stale_after`` plain steps' worth of decoding: it is priced from
    the prior shifted like its neighbours again, so it runs again once that price makes it worthwhile, and is
    explored if it lies inside the range the decoder runs. Otherwise a size timed during a load burst stays
    over-priced for good once the burst is over: the padding steers every tree around it, so it never runs to be
    timed again.

    Args:
        prior: the probed curve.
        quantile: of the recent times at a size, the one taken as its cost.
        window: recent times kept per size.
        explore_every: the steps between explorations where exploring costs no more than the decoder's own steps;
            proportionally more where it does.
        min_samples: times a size needs before its price may rise above the prior and exploration leaves it to
            the decoder.
        stale_after: the price, in plain steps, of the decoding after which a size's times expire when it has
            not run since.
    """

    def __init__(self, prior: CostCurve, quantile: float = 0.25, window: int = 16, explore_every: int = 16,
                 min_samples: int = 3, stale_after: float = 512.0) -> None:
        self.prior = prior
        self.quantile = quantile
        self.explore_every = explore_every
        self.min_samples = min_samples
        self.stale_after = stale_after
        self.recent = np.zeros((len(prior.sizes), window))  # ring buffers of observed ms per size
        self.observed = np.zeros(len(prior.sizes), dtype=np.int64)  # live (unexpired) times per size
        self.steps = np.zeros(len(prior.sizes), dtype=np.int64)  # every step that ran each size, for reports
        self.clock = 0.0  # the price of every step observed, in plain steps
        self.last_run = np.zeros(len(prior.sizes))  # the clock when each size last ran
        self.measured = np.zeros(len(prior.sizes))  # the quantile of each size's recent times (observed sizes)
        # The clock at the last exploration; the first is granted at once (a plain step: the guard's yardstick).
        self.explored_at = -np.inf
        self._curve = prior
        self._plain_ms = self._plain_weight = 0.0  # decayed sums over steps that drafted nothing (wall time)

    def observe(self, num_nodes: int, ms: float) -> None:
        """One forward over ``num_nodes`` nodes per row took ``ms`` milliseconds."""
        self.clock += float(self._curve.relative(num_nodes))
        if not (ms > 0 and np.isfinite(ms)):
            return
        sizes, shape = self.prior.sizes, self._curve.ms
        index = int(np.argmin(np.abs(np.log(sizes) - np.log(num_nodes))))
        at_size = ms * shape[index] / np.interp(num_nodes, sizes, shape)
        self.observed[self.clock - self.last_run > self.stale_after] = 0  # this size's own old times too
        self.last_run[index] = self.clock
        self.steps[index] += 1
        window = self.recent.shape[1]
        self.recent[index, self.observed[index] % window] = at_size
        self.observed[index] += 1
        values = self.recent[index, : min(self.observed[index], window)]
        rank = int(self.quantile * (len(values) - 1))
        self.measured[index] = np.partition(values, rank)[rank]
        seen = np.flatnonzero(self.observed > 0)
        measured = self.measured[seen]
        # A size timed too rarely is never priced above its prior: a slow time there may be another process's,
        # and an over-priced size is never run again to correct it (an under-priced one is run, and timed).
        measured = np.where(self.observed[seen] < self.min_samples, np.minimum(measured, self.prior.ms[seen]),
                            measured)
        shift = np.log(measured) - np.log(self.prior.ms[seen])
        ms_now = self.prior.ms * np.exp(np.interp(np.arange(len(sizes)), seen, shift))
        ms_now[seen] = measured
        self._curve = CostCurve(sizes=sizes, ms=ms_now)

    def curve(self) -> CostCurve:
        """The current estimate of the whole curve."""
        return self._curve

    def observe_plain_step(self, wall_ms: float) -> None:
        """A whole step that verified no draft took ``wall_ms`` besides drafting, bookkeeping included."""
        keep = 1.0 - 1.0 / self.recent.shape[1]
        self._plain_ms = keep * self._plain_ms + wall_ms
        self._plain_weight = keep * self._plain_weight + 1.0

    def plain_step_ms(self, overhead_ms: float) -> float:
        """What a plain step costs end to end, for :class:`SpeedGuard`: the recent mean of observed plain steps, so
        that drafting steps (also a mean) are judged like for like; before any, the curve's plain forward plus
        ``overhead_ms``. (The curve's quantile is the right price for sizing, where only differences between sizes
        matter, but a noisy machine's mean step is well above it: judged against it, drafting that pays looks
        as if it did not.)"""
        if self._plain_weight == 0:
            return float(self._curve.ms[0]) + overhead_ms
        return self._plain_ms / self._plain_weight

    def explore(self, num_nodes: int, needed: int | None = None) -> int:
        """The node count to run this step instead of ``num_nodes`` (the padded size; ``needed``: the nodes the step
        actually holds, default ``num_nodes``): 1 (draft nothing: measures a plain step) while one row has fewer than
        two live (unexpired) times; else the next size up while it is unmeasured, from a plain step too (a curve cached
        after a load burst may price 2 rows so high that no step ever runs them); else the smallest unmeasured size from
        ``needed`` up, below the largest size with live times — a size the padding jumps over, or a spike the prior
        holds there, would otherwise steer every tree around it and never be corrected. Once none is unmeasured, the
        same again for sizes with fewer than ``min_samples`` times (one slow time would steer the trees around a size
        just as well). Granted only once the steps run since the last exploration cost ``explore_every`` times the
        dearer of the two sizes; otherwise, or with nothing to measure, ``num_nodes`` itself."""
        wanted = self._unmeasured(num_nodes, needed)
        if wanted == num_nodes:
            return num_nodes
        price = float(self._curve.relative(max(wanted, num_nodes)))
        if self.clock - self.explored_at < self.explore_every * price:
            return num_nodes
        self.explored_at = self.clock
        return wanted

    def _unmeasured(self, num_nodes: int, needed: int | None) -> int:
        """The size :meth:`explore` would measure next while running ``num_nodes`` (``num_nodes``: none)."""
        if self.observed[0] < 2:
            return 1
        sizes = self.prior.sizes
        larger = np.flatnonzero(sizes > num_nodes)
        largest_run = sizes[np.flatnonzero(self.observed)[-1]]
        in_range = (sizes >= max(num_nodes if needed is None else needed, 2)) & (sizes < largest_run)
        for enough in (1, self.min_samples):  # sizes never timed first, then sizes timed too rarely to trust
            if self.observed[0] < enough:
                return 1
            if len(larger) and self.observed[larger[0]] < enough:
                return int(sizes[larger[0]])
            gaps = np.flatnonzero((self.observed < enough) & in_range)
            if len(gaps):
                return int(sizes[gaps[0]])
        return num_nodes


class SpeedGuard:
    """Drafting only while it pays: realised tokens per millisecond against plain decoding's, for a batch's rows
    together (the mean tokens a row gained per step).

    While drafting, the gained tokens and the steps' wall time (drafting included, which no cost curve sees) are
    averaged exponentially over about ``window`` steps. From the ``judge_after``-th drafting step of a stretch on,
    a step whose average speed is below ``1 - tolerance`` tokens per plain step stops drafting: for ``pause``
    steps the rows verify only drafts at least ``confident`` likely (mostly copies) — or, where
    asking the drafters itself costs more than ``tolerance`` of a plain step (a slow datastore, a busy core), no
    drafter is even asked — then drafts freely again to re-measure; each failed retry doubles the pause, up to
    ``max_pause``, and a retry that pays resets it.

    Args:
        window: horizon of the averages, in drafting steps.
        judge_after: drafting steps of a stretch before it can be stopped (the cost of a retry).
        pause: first plain stretch after drafting did not pay.
        max_pause: longest plain stretch.
        tolerance: how far below plain speed drafting may run and go on: the price of looking. A stretch in
            which the drafters find nothing worth verifying runs plain forwards plus the drafters' time (about
            1% of a step); judged at plain speed exactly, such a stretch pauses, the pauses double, and the copy
            that starts meanwhile (a quotation, a repeated block) is missed for up to ``max_pause`` steps.
        confident: the least path probability a paused row's drafts keep. What fails to pay is most often the
            many guesses of middling odds (recycled tokens, a one-token match) that a cheap step affords; a
            pause that dropped every draft dropped the copies too, which pay on any curve the sizer admits. A
            copy's first node, found by a short match, is rarely more than even odds, so a floor of 0.5 missed
            the copies that begin in a pause: A/B in one process (auto against auto at 0.2), long-document
            questions 1.58x -> 1.75x ``generate()``, Spec-Bench's later prompts 1.26x -> 1.27x.
    """

    def __init__(self, window: int = 16, judge_after: int = 4, pause: int = 8, max_pause: int = 64,
                 tolerance: float = 0.03, confident: float = 0.2) -> None:
        self.window, self.judge_after, self.tolerance = window, judge_after, tolerance
        self.confident = confident
        self.silent = False  # the pause asks no drafter (drafting alone cost more than ``tolerance``)
        self.draft_ms = 0.0  # decayed sum of the drafting steps' drafting time, as ``ms``
        self.first_pause, self.max_pause = pause, max_pause
        self.pause = pause
        self.tokens = self.ms = 0.0  # decayed sums over drafting steps
        self.drafting_steps = 0  # in the current drafting stretch
        self.plain_left = 0  # plain steps still to run

    @property
    def drafting(self) -> bool:
        """Whether this step drafts freely (else only drafts at least ``confident`` likely)."""
        return self.plain_left == 0

    @property
    def floor(self) -> float:
        """The least path probability this step's drafts may have: 0 while drafting freely, ``inf`` in a pause
        that asks no drafter."""
        return 0.0 if self.drafting else math.inf if self.silent else self.confident

    def record(self, tokens: float, step_ms: float, plain_step_ms: float, draft_ms: float = 0.0) -> None:
        """Count one step: ``tokens`` gained in ``step_ms``, of which ``draft_ms`` asking the drafters; a plain step
        would take ``plain_step_ms``."""
        if not self.drafting:
            self.plain_left -= 1
            return
        keep = 1.0 - 1.0 / self.window
        self.tokens = keep * self.tokens + tokens
        self.ms = keep * self.ms + step_ms
        self.draft_ms = keep * self.draft_ms + draft_ms
        self.drafting_steps += 1
        if self.drafting_steps < self.judge_after:
            return
        if self.tokens / self.ms < (1.0 - self.tolerance) / plain_step_ms:
            self.plain_left = self.pause
            self.pause = min(2 * self.pause, self.max_pause)
            self.silent = self.draft_ms > self.tolerance * self.ms  # asking alone took that share of the steps
            self.tokens = self.ms = self.draft_ms = 0.0
            self.drafting_steps = 0
        elif self.drafting_steps == self.window:
            self.pause = self.first_pause


# Lookahead's window pays off only where extra rows in a forward are nearly free (a GPU). Measured on the 2-core
# CPU (benchmarks/spec_bench.py --methods lookahead --branch-overhead 10): its 12 rows make a step 71 ms instead
# of 38, for 1.48 tokens/step from the pool: 0.69x of plain decoding. W=2, N=3: 0.74x.
MAX_BRANCH_OVERHEAD = 0.25


class CostSource(Protocol):
    """Where a batch size's cost curve starts from, and where what was learned goes (the verifier)."""

    def cost_prior(self, batch: int) -> CostCurve: ...

    def store_costs(self, batch: int, curve: CostCurve) -> None: ...


@dataclass(frozen=True)
class Plan:
    """The sizes of one step, the same for every row of the batch.

    Attributes:
        size: drafted nodes a row keeps at most (its tree is the head ``1 + size`` of its ranked candidates).
        branches: whether the rows' look-ahead branches run.
        needed: nodes per row the step holds (the largest tree plus branch).
        run: nodes per row the forward runs: ``needed``, or more where padding is cheaper, or a size explored.
        first: the prefill's step (its time is the prompt's: nothing is learned from it).
        timed: the forward's time teaches the curve (a step after the first that runs every row of the batch).
        explored: the step runs a size the cost model asked to time, instead of the one the drafts called for.
    """

    size: int
    branches: bool
    needed: int
    run: int
    first: bool
    timed: bool
    explored: bool = False

    @property
    def plain(self) -> bool:
        """The step verifies no draft and no branch: what the guard compares drafting against."""
        return self.needed == 1


class Sizer:
    """Decides every step's size from the cost of verification on this machine, for every batch the loop runs.

    With a ``fixed`` curve, sizes follow it and nothing is learned (tests, forced benchmarks such as a GPU-like
    flat curve). Otherwise each batch size starts from ``costs.cost_prior(batch)`` and is learned from every
    timed step (:class:`CostModel`, stored back through ``costs.store_costs`` when a batch ends), and each row
    drafts only while drafting pays (:class:`SpeedGuard`).

    Args:
        costs: the prior and the store of cost curves (the verifier).
        fixed: a curve to size by, never learned.
        max_branch_overhead: a look-ahead branch runs only when it makes a bare step at most this much dearer on
            the current curve (it pays later, through the pool, if at all).
    """

    def __init__(self, costs: CostSource, fixed: CostCurve | None = None,
                 max_branch_overhead: float = MAX_BRANCH_OVERHEAD) -> None:
        self.costs, self.fixed, self.max_branch_overhead = costs, fixed, max_branch_overhead
        self.models: dict[int, CostModel] = {}  # learned, per batch size

    def start(self, rows: int) -> BatchSizing:
        """The sizing of one batch of ``rows`` rows (its cost model is probed the first time: before any clock)."""
        if self.fixed is not None:
            return BatchSizing(self, rows, None)
        if rows not in self.models:
            self.models[rows] = CostModel(self.costs.cost_prior(rows))
        return BatchSizing(self, rows, self.models[rows])

    def report(self) -> dict:
        """Per batch size, as JSON: the curve now used (ms per node count), the prior, and the steps timed."""
        return {str(batch): {"sizes": model.prior.sizes.tolist(),
                             "ms": [round(float(ms), 3) for ms in model.curve().ms],
                             "probed_ms": [round(float(ms), 3) for ms in model.prior.ms],
                             "observed_steps": model.steps.tolist()}
                for batch, model in self.models.items()}


class BatchSizing:
    """One batch's sizing: its curve (learned or fixed) and its speed guard.

    One guard judges the batch, not one per row: the rows share every step's cost (their trees are padded to
    one size), so a row that pauses saves nothing while the others draft, and what it would have gained is lost.
    Measured with a guard per row (``benchmarks/multisample.py --split tune --limit 5``, 8 samples of a GSM8K
    problem drafting from each other, one process): 1094 of 4616 row-steps paused, `auto` 0.96x our loop drafting
    nothing; judged for the batch, 64 paused and 1.07x (1.33 -> 1.48 tokens per row per step).
    """

    def __init__(self, sizer: Sizer, rows: int, model: CostModel | None) -> None:
        self.sizer, self.rows, self.model = sizer, rows, model
        self.guard = None if model is None else SpeedGuard()

    @property
    def curve(self) -> CostCurve:
        return self.sizer.fixed if self.model is None else self.model.curve()

    @property
    def floor(self) -> float:
        """The least path probability this step's drafts may have: 0 unless the guard paused drafting."""
        return 0.0 if self.guard is None else self.guard.floor

    def branch_pays(self, nodes: int) -> bool:
        """Whether a look-ahead branch of ``nodes`` nodes is nearly free beside a bare step."""
        return bool(self.curve.relative(np.array([1 + nodes]))[0] <= 1 + self.sizer.max_branch_overhead)

    def plan(self, scores: Sequence[np.ndarray], branch_nodes: Sequence[int], first: bool) -> Plan:
        """The step's sizes for the alive rows' candidates.

        Args:
            scores: per alive row, (m_b,) its ranked candidates' path probabilities, best first.
            branch_nodes: per alive row, the nodes of its look-ahead branch (0: none).
            first: the prefill's step, whose trees ride on the prompt's forward: sized on the same curve (a
                prefill's extra rows cost less: the cut is cautious there), never timed nor explored.
        """
        curve, fixed = self.curve, 1 + max(branch_nodes, default=0)
        size = best_batch_size(scores, curve, fixed)
        needed = max(1 + min(size, len(s)) + b for s, b in zip(scores, branch_nodes))
        timed = self.model is not None and not first and len(scores) == self.rows
        plan = Plan(size, True, needed, curve.padded_size(needed), first, timed)
        if not timed:  # only a step that runs every row times the batch's curve, so only such a step explores
            return plan
        explored = self.model.explore(plan.run, needed)
        if explored == plan.run:
            return plan
        if explored == 1:  # time a plain step: nothing drafted
            return Plan(0, False, 1, 1, first, timed, explored=True)
        return Plan(size, True, needed, explored, first, timed, explored=True)

    def learn(self, plan: Plan, timer, gained: Sequence[int]) -> None:
        """Learn from a finished step (after the first): its forward's cost (when ``plan.timed``), and whether
        drafting paid (the mean of the rows' gains against a plain step).

        Args:
            timer: the step's :class:`~retrieval_spec.verifier.PhaseTimer` (draft, size, mask, forward, ...).
            gained: the tokens gained by every row that ran the step.
        """
        if self.model is None or plan.first:
            return
        forward_ms, step_ms = timer.total("mask", "forward"), timer.total()
        own_ms = step_ms - timer.total("draft", "size")  # the step without its drafting
        if plan.timed:
            self.model.observe(plan.run, forward_ms)
            if plan.plain:
                self.model.observe_plain_step(own_ms)
        plain_step_ms = self.model.plain_step_ms(self.model.curve().plain_ms + own_ms - forward_ms)
        if len(gained):
            self.guard.record(sum(gained) / len(gained), step_ms, plain_step_ms, timer.total("draft"))

    def finish(self) -> None:
        """The batch ended: store the learned curve (for the next process) when a step taught it anything."""
        if self.model is not None and self.model.observed.any():
            self.sizer.costs.store_costs(self.rows, self.model.curve())


class StepCost:
    """The time of one serving-engine step as a line in the tokens it verifies: ``base_ms + per_token_ms * t``.

    Learned from the engine's own steps (:meth:`observe`): the least-squares line through the last ``window``
    steps, fitted again through those at or under its ``quantile`` of residuals (another process only ever adds
    time, so the quick steps say what a step costs), with a slope of at least 0. Until ``min_steps`` steps with
    different token counts were seen, the step is priced flat: every draft looks free, as on a GPU far from its
    compute bound.

    Args:
        window: recent steps kept.
        min_steps: steps needed before the line is fitted.
        quantile: the share of the steps, quickest for their token counts first, that the line is fitted to.
    """

    def __init__(self, window: int = 64, min_steps: int = 8, quantile: float = 0.5) -> None:
        self.window, self.min_steps, self.quantile = window, min_steps, quantile
        self.tokens = np.zeros(window)
        self.times = np.zeros(window)
        self.observed = 0
        self.base_ms, self.per_token_ms = 1.0, 0.0

    @classmethod
    def line(cls, base_ms: float, per_token_ms: float) -> StepCost:
        """A fixed line (tests, and what a fitted model holds)."""
        cost = cls()
        cost.base_ms, cost.per_token_ms = float(base_ms), float(per_token_ms)
        return cost

    def ms(self, tokens: np.ndarray | int) -> np.ndarray:
        """Estimated milliseconds of a step verifying ``tokens`` tokens in all."""
        return self.base_ms + self.per_token_ms * np.asarray(tokens, dtype=np.float64)

    def observe(self, tokens: int, ms: float) -> None:
        """A step verified ``tokens`` tokens (drafts and one per request) in ``ms`` milliseconds."""
        if not (ms > 0 and np.isfinite(ms)) or tokens < 1:
            return
        slot = self.observed % self.window
        self.tokens[slot], self.times[slot] = tokens, ms
        self.observed += 1
        seen = min(self.observed, self.window)
        tokens_seen, times = self.tokens[:seen], self.times[:seen]
        if seen < self.min_steps or np.ptp(tokens_seen) < 1:
            return
        slope, intercept = _fit_line(tokens_seen, times)
        residuals = times - (slope * tokens_seen + intercept)
        quick = residuals <= np.quantile(residuals, self.quantile)
        if np.ptp(tokens_seen[quick]) >= 1:
            slope, intercept = _fit_line(tokens_seen[quick], times[quick])
        self.per_token_ms = max(float(slope), 0.0)
        x, y = tokens_seen[quick], times[quick]
        self.base_ms = max(float(np.mean(y - self.per_token_ms * x)) if slope < 0 else float(intercept),
                           0.05 * float(np.min(times)))


def _fit_line(x: np.ndarray, y: np.ndarray) -> tuple[float, float]:
    """The least-squares slope and intercept of ``y`` on ``x`` ((n,) each, ``x`` not all equal), in closed form
    (``np.polyfit``'s answer up to rounding, without its solver: the proposer fits two lines a step)."""
    mean_x, mean_y = float(x.mean()), float(y.mean())
    dx = x - mean_x
    slope = float(dx @ (y - mean_y)) / float(dx @ dx)
    return slope, mean_y - slope * mean_x
