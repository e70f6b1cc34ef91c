"""Datasets of graded quality (D4RL naming) and the one definition of the scores measured on them.

A tier dataset is an ordinary trajectory dataset whose manifest ``metadata`` holds a ``tier`` block
(written by ``python -m benchmarks.offline_tiers``): the tier's name, the policies that collected it
with their measured returns, the return of its data policy, and the random and expert returns of
the family of tiers it belongs to. Every consumer (offline evaluation, batch evaluation, the
comparison tables) computes scores from that block through the two functions here, so "fraction of
the data policy" and "normalised score" mean the same thing everywhere:

* ``normalized_score = 100 * (R - R_random) / (R_expert - R_random)``: 0 is the random policy,
  100 the expert (the final PPO policy), as in D4RL;
* ``fraction_of_data = R / R_data``: 1 matches the policy (or mixture) that collected the data.

It lives in ``utils`` because the block is part of the dataset format that the writer (benchmarks)
and the readers (offline RL, and later online fine-tuning) must agree on (docs/design.md).
"""

from __future__ import annotations

import math
from typing import Any, Mapping

TIERS = ("random", "medium", "expert", "medium-replay", "medium-expert")
"""D4RL's names: a uniform policy; a policy at about half the final return; the final policy; every
rollout PPO saw up to the medium policy; medium and expert data concatenated."""

TIER_KEY = "tier"
"""Key of the block inside a manifest's ``metadata``."""

TIER_VERSION = 1


def tier_block(name: str, *, data_return: float | None, random_return: float, expert_return: float,
               policies: list[dict[str, Any]], source: Mapping[str, Any] | None = None) -> dict[str, Any]:
    """The ``tier`` block of a dataset's manifest metadata; ``policies`` lists the collecting policies
    (``name``, ``return``, ``episodes``, ``update``, ``rows``) and ``data_return`` is their row-weighted
    mean return (or, for replay data, the mean return of its complete episodes)."""
    if name not in TIERS:
        raise ValueError(f"unknown tier {name!r}; one of {', '.join(TIERS)}")
    return {"version": TIER_VERSION, "name": name, "data_return": _float(data_return),
            "random_return": _float(random_return), "expert_return": _float(expert_return),
            "policies": list(policies), "source": dict(source or {})}


def describe(block: Mapping[str, Any]) -> dict[str, Any]:
    """What a tier's data is, for tables: its transitions, the collecting policies (name, update, return,
    episodes) and the data, random and expert returns its scores are made of."""
    return {"rows": sum(int(p.get("rows") or 0) for p in block["policies"]),
            "policies": [{k: p.get(k) for k in ("name", "update", "return", "episodes")} for p in block["policies"]],
            **{k: block.get(k) for k in ("data_return", "random_return", "expert_return")}}


def tier_of(manifest: Mapping[str, Any]) -> dict[str, Any] | None:
    """The ``tier`` block of a dataset manifest, or None for a dataset that is not a tier."""
    block = (manifest.get("metadata") or {}).get(TIER_KEY)
    return dict(block) if isinstance(block, Mapping) else None


def normalized_score(ret: float | None, random_return: float | None, expert_return: float | None
                     ) -> float | None:
    """``100 * (ret - random) / (expert - random)``; None when a return is missing or the expert is no
    better than random (the scale would be meaningless)."""
    if any(_float(x) is None for x in (ret, random_return, expert_return)):
        return None
    span = float(expert_return) - float(random_return)
    if span <= 0:
        return None
    return 100.0 * (float(ret) - float(random_return)) / span


def fraction_of_data(ret: float | None, data_return: float | None) -> float | None:
    """``ret / data_return``; None when either is missing or the data policy's return is not positive
    (a ratio to zero or a negative return says nothing)."""
    if _float(ret) is None or _float(data_return) is None or float(data_return) <= 0:
        return None
    return float(ret) / float(data_return)


def scores(ret: float | None, tier: Mapping[str, Any] | None, data_return: float | None = None
           ) -> dict[str, float | None]:
    """Both scores of a return on a dataset: the tier block's returns when there is one; otherwise
    only the fraction, against ``data_return`` (e.g. the dataset's complete-episode mean)."""
    if tier:
        data_return = tier.get("data_return", data_return)
    return {"fraction_of_data": fraction_of_data(ret, data_return),
            "normalized_score": (normalized_score(ret, tier.get("random_return"), tier.get("expert_return"))
                                 if tier else None)}


def _float(value: Any) -> float | None:
    if value is None:
        return None
    value = float(value)
    return value if math.isfinite(value) else None
