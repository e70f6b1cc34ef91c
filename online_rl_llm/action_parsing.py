"""From a language model's free-form reply to one env action, with a retry and a counted fallback.

Models answer in many shapes ("Action: MOVE_LEFT", "**place table**", "I'll do it: `DO`",
"action 5"), often mention several actions while reasoning, and sometimes name none. The rules,
strongest first (the first rule that finds something decides):

1. **Marker**: the action written right after the last ``action:`` / ``action =`` / ``action is``
   marker (quotes, backticks and markdown bold in between are skipped). With ``allow_numbers`` a
   number there (``Action: 5``, ``action #5``) is taken as the action index when in range.
2. **Upper-case mention**: the last action name written in capitals (``DO``, ``PLACE_TABLE``):
   the system prompt lists actions in capitals, so a capitalised name is a deliberate choice,
   while a lower-case "do" or "up" may just be English.
3. **Any mention**: the last action name in any case.

Names match case-, underscore-, hyphen- and space-insensitively (``place_table``, ``PLACE TABLE``,
``Place-Table``) and only as whole words: ``DO`` never matches inside ``DOWN`` or ``done``, and at
each position the longest name wins (``LEVEL_UP_STRENGTH`` is not read as ``UP``). An underscore
is no word character, so ``MOVE_LEFT`` reads as ``LEFT``; ``NO_OP``, ``no-op`` and ``nothing``
read as ``NOOP`` (so "do nothing" is NOOP: the last mention wins).

When nothing is found the caller asks again once (``resolve_actions``, configurable) with a short
correction, and after the last retry falls back to ``NOOP``; ``ParseCounters`` counts how each
decision was reached so a run reports how often the model actually chose its actions.
"""

from __future__ import annotations

import dataclasses
import re
from collections.abc import Callable, Sequence
from typing import NamedTuple

__all__ = ["ActionParser", "ParsedAction", "ParseCounters", "Decision", "resolve_actions",
           "count", "decision_counters", "NOOP_NAME"]

NOOP_NAME = "NOOP"
_WORD = r"A-Za-z0-9"
_SEP = r"[\s_\-]*"
# Extra spellings -> canonical name; only added when the canonical name is an action of the env.
# ("MOVE_LEFT" needs none: "_" is no word character, so it reads as LEFT.)
_ALIASES = {"NO_OP": "NOOP", "NOTHING": "NOOP"}
# "Action:", "action =", "action #", "action is", and "action 5" (a number right after the word).
_MARKER = re.compile(r"\baction(?:\s*[:=#]|\s+is\b|\s+(?=\d))", re.IGNORECASE)
# What may stand between a marker and the action: quotes, backticks, bold/italic marks, brackets.
_DECORATION = re.compile(r"[\s\"'`*_\[\(<:#=-]*")
_NUMBER = re.compile(r"(\d+)(?!\d|\.\d)")  # "5" and "5." but not "5.5"


class ParsedAction(NamedTuple):
    """An action index and which rule found it: 'marker', 'number', 'upper' or 'mention'."""

    index: int
    name: str
    rule: str


def _name_pattern(name: str) -> str:
    """``PLACE_TABLE`` -> a pattern matching PLACE_TABLE, place table, Place-Table, placetable."""
    return _SEP.join(re.escape(part) for part in name.split("_"))


class ActionParser:
    """Parse replies for one env's action names (index = position in ``action_names``)."""

    def __init__(self, action_names: Sequence[str], allow_numbers: bool = True):
        self.action_names = tuple(action_names)
        if not self.action_names:
            raise ValueError("an action parser needs at least one action name")
        self.allow_numbers = allow_numbers
        self._index = {name: i for i, name in enumerate(self.action_names)}
        spellings = {name: name for name in self.action_names}
        spellings.update({alias: target for alias, target in _ALIASES.items()
                          if target in self._index and alias not in self._index})
        # Longest first so that alternation prefers LEVEL_UP_STRENGTH over UP at the same spot.
        ordered = sorted(spellings, key=len, reverse=True)
        self._canonical = spellings
        body = "|".join(f"({_name_pattern(s)})" for s in ordered)
        self._ordered = ordered
        self._mention = re.compile(rf"(?<![{_WORD}])(?:{body})(?![{_WORD}])", re.IGNORECASE)

    def _canonical_of(self, match: re.Match) -> str:
        spelling = self._ordered[match.lastindex - 1]
        return self._canonical[spelling]

    def mentions(self, text: str) -> list[tuple[re.Match, str]]:
        """Every whole-word action mention in order, as (match, canonical name)."""
        return [(m, self._canonical_of(m)) for m in self._mention.finditer(text)]

    def _after_marker(self, text: str) -> ParsedAction | None:
        markers = list(_MARKER.finditer(text))
        for marker in reversed(markers):
            start = _DECORATION.match(text, marker.end()).end()
            mention = self._mention.match(text, start)
            if mention is not None:
                name = self._canonical_of(mention)
                return ParsedAction(self._index[name], name, "marker")
            if self.allow_numbers:
                number = _NUMBER.match(text, start)
                if number is not None and int(number.group(1)) < len(self.action_names):
                    index = int(number.group(1))
                    return ParsedAction(index, self.action_names[index], "number")
        return None

    def parse(self, text: str) -> ParsedAction | None:
        """The action ``text`` chooses by the module's rules, or None when it names none."""
        if not text:
            return None
        found = self._after_marker(text)
        if found is not None:
            return found
        mentions = self.mentions(text)
        upper = [(m, name) for m, name in mentions if m.group(0) == m.group(0).upper()]
        for rule, candidates in (("upper", upper), ("mention", mentions)):
            if candidates:
                name = candidates[-1][1]
                return ParsedAction(self._index[name], name, rule)
        return None

    def __call__(self, text: str) -> int | None:
        found = self.parse(text)
        return None if found is None else found.index

    @property
    def noop_index(self) -> int:
        return self._index.get(NOOP_NAME, 0)


# ----------------------------------------------------------------------------------------------
# Retry and fallback
# ----------------------------------------------------------------------------------------------


@dataclasses.dataclass
class ParseCounters:
    """How each decision was reached; one per episode (and summed for a run).

    ``parsed``: the first reply named an action. ``retried``: it did not, so the model was asked
    again (``parsed_on_retry`` of those then named one). ``fell_back``: no reply named an action
    and NOOP was played instead. ``decisions`` = parsed + parsed_on_retry + fell_back."""

    decisions: int = 0
    parsed: int = 0
    retried: int = 0
    parsed_on_retry: int = 0
    fell_back: int = 0

    def add(self, other: "ParseCounters") -> "ParseCounters":
        for field in dataclasses.fields(self):
            setattr(self, field.name, getattr(self, field.name) + getattr(other, field.name))
        return self

    def as_dict(self) -> dict[str, float]:
        out: dict[str, float] = dataclasses.asdict(self)
        total = max(self.decisions, 1)
        out["parse_rate"] = (self.parsed + self.parsed_on_retry) / total
        out["fallback_rate"] = self.fell_back / total
        return out


@dataclasses.dataclass
class Decision:
    """One env's decision at one step: the replies in order, and the action finally played."""

    action: int
    action_name: str
    outcome: str  # 'parsed', 'parsed_on_retry' or 'fell_back'
    outputs: list[str]
    rule: str | None  # the parser rule that found the action (None on fallback)


def resolve_actions(prompts: Sequence[str], generate: Callable[[list[str]], list[str]],
                    parser: ActionParser, retry_prompt: Callable[[str, str], str],
                    max_retries: int = 1) -> list[Decision]:
    """Ask ``generate`` for every prompt at once; re-ask (batched) only the ones whose reply named
    no action, up to ``max_retries`` times, then fall back to NOOP.

    ``retry_prompt(prompt, reply)`` builds the follow-up from the original prompt and the reply
    that named nothing. The returned decisions are in prompt order."""
    outputs: list[list[str]] = [[] for _ in prompts]
    found: list[ParsedAction | None] = [None] * len(prompts)
    pending = list(range(len(prompts)))
    current = list(prompts)
    for attempt in range(max_retries + 1):
        if not pending:
            break
        replies = generate([current[i] for i in pending])
        if len(replies) != len(pending):
            raise RuntimeError(f"generate returned {len(replies)} replies for {len(pending)} prompts")
        still = []
        for i, reply in zip(pending, replies):
            outputs[i].append(reply)
            found[i] = parser.parse(reply)
            if found[i] is None:
                still.append(i)
                current[i] = retry_prompt(prompts[i], reply)
        pending = still
    decisions = []
    for i, parsed in enumerate(found):
        if parsed is None:
            noop = parser.noop_index
            decisions.append(Decision(noop, parser.action_names[noop], "fell_back", outputs[i], None))
        else:
            outcome = "parsed" if len(outputs[i]) == 1 else "parsed_on_retry"
            decisions.append(Decision(parsed.index, parsed.name, outcome, outputs[i], parsed.rule))
    return decisions


def count(decisions: Sequence[Decision]) -> ParseCounters:
    """Counters for a batch of decisions (callers split them per env/episode)."""
    counters = ParseCounters()
    for d in decisions:
        counters.add(decision_counters(d))
    return counters


def decision_counters(decision: Decision) -> ParseCounters:
    return ParseCounters(decisions=1, parsed=int(decision.outcome == "parsed"),
                         retried=int(len(decision.outputs) > 1),
                         parsed_on_retry=int(decision.outcome == "parsed_on_retry"),
                         fell_back=int(decision.outcome == "fell_back"))
