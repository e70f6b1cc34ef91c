"""Statistics that decide between methods, after Agarwal et al. (2021), "Deep RL at the Edge of the
Statistical Precipice" (the ``rliable`` package), written on numpy so it installs beside the pins.

A comparison has, per method, a score for every (seed, task): an array ``[runs, tasks]``. The
stratified bootstrap resamples the runs of each task separately, so a task with more seeds does not
weigh more and every resample keeps each task. Every function takes a ``seed`` for its resampling and
is deterministic given it, so ``benchmarks.report`` regenerates the same page from the same data.

- :func:`iqm`: interquartile mean (the mean of the middle 50% of all scores), robust to one outlying
  seed yet using more of the data than the median;
- :func:`interval`: a statistic and its stratified-bootstrap percentile interval;
- :func:`difference`: the interval of ``stat(A) - stat(B)`` with A and B resampled independently, and
  the verdict the docs may print: "above" or "below" only when that interval excludes 0, else "level";
- :func:`probability_of_improvement`: P(a run of A scores above a run of B), ties counted half;
- :func:`performance_profile`: the fraction of runs scoring above each threshold, with bands.
"""

from __future__ import annotations

import dataclasses
from typing import Callable

import numpy as np

#: Fewest seeds per method for any "above"/"below" claim, and for a headline table.
MIN_SEEDS_CLAIM = 3
MIN_SEEDS_HEADLINE = 5
CONFIDENCE = 0.95
REPS = 2000


def as_scores(scores) -> np.ndarray:
    """``[runs]`` or ``[runs, tasks]`` as a float array ``[runs, tasks]``; NaN (a run with no finished
    episode) is refused rather than silently dropped, because dropping it changes the seed count."""
    array = np.asarray(scores, dtype=np.float64)
    if array.ndim == 1:
        array = array[:, None]
    if array.ndim != 2 or array.shape[0] == 0:
        raise ValueError(f"scores must be [runs] or [runs, tasks] with at least one run, got shape {array.shape}")
    if not np.isfinite(array).all():
        raise ValueError("scores contain NaN or inf: every run needs a finite score")
    return array


def iqm(scores) -> float:
    """Interquartile mean over all runs and tasks: ``scipy.stats.trim_mean(x, 0.25)`` of the flattened
    scores (with 5 runs: the mean of the middle 3; with 3 or fewer: the plain mean)."""
    flat = np.sort(np.asarray(scores, dtype=np.float64).ravel())
    cut = int(0.25 * flat.size)
    return float(flat[cut:flat.size - cut].mean())


def mean(scores) -> float:
    return float(np.mean(scores))


STATISTICS: dict[str, Callable[[np.ndarray], float]] = {"IQM": iqm, "mean": mean}


def _resample(scores: np.ndarray, reps: int, rng: np.random.Generator) -> np.ndarray:
    """``[reps, runs, tasks]``: each task's runs drawn with replacement, independently per task."""
    runs, tasks = scores.shape
    index = rng.integers(0, runs, size=(reps, runs, tasks))
    return np.take_along_axis(np.broadcast_to(scores, (reps, runs, tasks)), index, axis=1)


def _stat_over(samples: np.ndarray, stat: Callable[[np.ndarray], float]) -> np.ndarray:
    return np.array([stat(sample) for sample in samples])


def _percentiles(values: np.ndarray, confidence: float) -> tuple[float, float]:
    tail = 100 * (1 - confidence) / 2
    low, high = np.percentile(values, [tail, 100 - tail])
    return float(low), float(high)


@dataclasses.dataclass(frozen=True)
class Estimate:
    """A point estimate and its interval."""

    value: float
    low: float
    high: float

    def text(self, digits: int = 2) -> str:
        return f"{self.value:.{digits}f} [{self.low:.{digits}f}, {self.high:.{digits}f}]"


def interval(scores, stat: str | Callable = "IQM", *, reps: int = REPS, confidence: float = CONFIDENCE,
             seed: int = 0) -> Estimate:
    """``stat`` of the scores and its stratified-bootstrap percentile interval. One run has no spread
    to resample: its interval is the point itself (and such a figure makes no claim)."""
    scores = as_scores(scores)
    fn = STATISTICS[stat] if isinstance(stat, str) else stat
    samples = _stat_over(_resample(scores, reps, np.random.default_rng(seed)), fn)
    low, high = _percentiles(samples, confidence)
    return Estimate(fn(scores), low, high)


@dataclasses.dataclass(frozen=True)
class Difference:
    """``stat(A) - stat(B)`` with its interval, and what the docs may say about it."""

    estimate: Estimate
    verdict: str  # "above", "below", "level", or "too few seeds"
    seeds: tuple[int, int]


def verdict(low: float, high: float, seeds_a: int, seeds_b: int) -> str:
    """The only words a comparison may use: "above"/"below" need at least ``MIN_SEEDS_CLAIM`` seeds on
    each side and an interval of the difference that excludes 0; everything else is "level"."""
    if min(seeds_a, seeds_b) < MIN_SEEDS_CLAIM:
        return "too few seeds"
    if low > 0:
        return "above"
    if high < 0:
        return "below"
    return "level"


def difference(a, b, stat: str | Callable = "IQM", *, reps: int = REPS, confidence: float = CONFIDENCE,
               seed: int = 0) -> Difference:
    """The interval of ``stat(A) - stat(B)``: both sides resampled independently (their seeds are
    different runs, not pairs), the same tasks on each side."""
    a, b = as_scores(a), as_scores(b)
    if a.shape[1] != b.shape[1]:
        raise ValueError(f"A has {a.shape[1]} tasks and B {b.shape[1]}: compare them on the same tasks")
    fn = STATISTICS[stat] if isinstance(stat, str) else stat
    rng = np.random.default_rng(seed)
    samples = _stat_over(_resample(a, reps, rng), fn) - _stat_over(_resample(b, reps, rng), fn)
    low, high = _percentiles(samples, confidence)
    return Difference(Estimate(fn(a) - fn(b), low, high), verdict(low, high, a.shape[0], b.shape[0]),
                      (a.shape[0], b.shape[0]))


def _improvement(a: np.ndarray, b: np.ndarray) -> float:
    """Mean over tasks of P(X > Y) + P(X = Y) / 2, X a run of A and Y a run of B on that task (the
    Mann-Whitney U statistic over m * n pairs)."""
    greater = (a[:, None, :] > b[None, :, :]).mean(axis=(0, 1))
    ties = (a[:, None, :] == b[None, :, :]).mean(axis=(0, 1))
    return float(np.mean(greater + 0.5 * ties))


def probability_of_improvement(a, b, *, reps: int = REPS, confidence: float = CONFIDENCE,
                               seed: int = 0) -> Estimate:
    """P(A > B) with its stratified-bootstrap interval; 0.5 means neither tends to score higher."""
    a, b = as_scores(a), as_scores(b)
    if a.shape[1] != b.shape[1]:
        raise ValueError(f"A has {a.shape[1]} tasks and B {b.shape[1]}: compare them on the same tasks")
    rng = np.random.default_rng(seed)
    sa, sb = _resample(a, reps, rng), _resample(b, reps, rng)
    samples = np.array([_improvement(x, y) for x, y in zip(sa, sb)])
    low, high = _percentiles(samples, confidence)
    return Estimate(_improvement(a, b), low, high)


def performance_profile(scores, thresholds, *, reps: int = REPS, confidence: float = CONFIDENCE,
                        seed: int = 0) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """``(fraction, low, high)`` per threshold: the fraction of all (run, task) scores above it, the
    run-score distribution that a performance profile plots across tasks of different scales (scores
    normalised first, e.g. to % of the maximum return)."""
    scores = as_scores(scores)
    thresholds = np.asarray(thresholds, dtype=np.float64)
    fraction = (scores.ravel()[None, :] > thresholds[:, None]).mean(1)
    samples = _resample(scores, reps, np.random.default_rng(seed)).reshape(reps, -1)
    boot = (samples[:, None, :] > thresholds[None, :, None]).mean(2)  # [reps, thresholds]
    tail = 100 * (1 - confidence) / 2
    low, high = np.percentile(boot, [tail, 100 - tail], axis=0)
    return fraction, low, high


def curve_bands(values, *, reps: int = 500, confidence: float = CONFIDENCE, seed: int = 0,
                stat: str = "mean") -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """``(stat, low, high)`` per curve point of ``values [points, runs]``; points where a run has no
    value yet (NaN) use the runs that have one, and are NaN where none has."""
    values = np.asarray(values, dtype=np.float64)
    out = np.full((3, values.shape[0]), np.nan)
    for i, row in enumerate(values):
        finite = row[np.isfinite(row)]
        if finite.size:
            e = interval(finite, stat, reps=reps, confidence=confidence, seed=seed)
            out[:, i] = (e.value, e.low, e.high)
    return out[0], out[1], out[2]
