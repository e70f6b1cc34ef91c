"""Live LLM features for online RL: observation -> canonical text -> cached hidden state.

PPO with LLM features (``online_rl_llm.ppo_llm``) runs compiled segments of env steps and returns to
the host only at *refresh points*, where some env needs a new feature: every ``skip_n`` env steps
(all envs) and the step after an episode ended (those envs, whose new episode would otherwise act
on the old world's feature). This module is the host side of a refresh and the state it updates:

* :class:`LiveFeatures` renders the rows that need a refresh with the canonical renderer
  (``utils.text_obs.render_texts``, the one labelling uses), looks the texts up in a
  :class:`FeatureCache` and sends only unseen texts to the LLM: the model loaded in this process
  (``utils.llm.make_backend``) or the hidden-state server (``utils.hidden_state_client``). It
  times every part, for ``perf/llm_time_share``.
* :class:`HeldFeatures` carries each env's feature between refreshes, which envs are stale, and
  the running normalisation statistics; it is part of the checkpointed training state.

Why segments and not a host callback inside one compiled program: JAX never writes programs that
contain host callbacks to its persistent compilation cache, so every run (and every test) would
compile the whole PPO program again, minutes on a CPU. Segments without callbacks are cached.

Normalisation: offline RL z-normalises hidden states with the labelled dataset's mean and std; here
there is no dataset up front, so the same rule (``utils.feature_norm.z_normalise``, std floor
included) uses running statistics (``utils.running_stats.RunningMeanStd``) updated at every env step
with every env's held feature. That weights each state by how long it was acted on, as the offline
statistics weight each dataset row, and the statistics travel in the checkpoint.
"""

from __future__ import annotations

import collections
import dataclasses
import time
from collections.abc import Callable, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import struct

from utils.errors import UserError
from utils.feature_norm import z_normalise
from utils.llm import RESOLVED_FIELDS, LLMError, LLMSpec, check_identity
from utils.running_stats import RunningMeanStd

# ---------------------------------------------------------------------------------------------------
# Where hidden states come from: the in-process model or the server, behind one interface
# ---------------------------------------------------------------------------------------------------

IDENTITY_FIELDS = ("model", "layer", "pooling", "template_hash", "dim", *RESOLVED_FIELDS)
"""What decides a feature vector; a resumed run must get its features from the same. The resolved
ones (``utils.llm.RESOLVED_FIELDS``: engine, resolved dtype, weights) come from the backend, or from
the server's /health; a run folder saved before they were recorded resumes with a note
(``utils.llm.check_identity``, the rule labelled datasets and offline evaluation follow too)."""


def open_encoder(spec: LLMSpec | None, server_url: str | None):
    """A ``utils.llm.LLMBackend``-like object (``spec``, ``hidden_size``, ``hidden_states(texts)``):
    the hidden-state server's client when ``server_url`` is given, else ``spec``'s model loaded here.

    Through the server, texts (not observations) go over the wire: the cache is keyed by text, so
    only unseen texts are sent, and the server applies its prompt template exactly as labelling does."""
    if server_url:
        from utils.hidden_state_client import HiddenStateClient

        client = HiddenStateClient(server_url)
        client.info()  # fail now, with the server's one-line reason, if it is not there
        return client
    if spec is None or not spec.model:
        raise UserError("no LLM given: pass --llm-model with a model folder or hub id, "
                        "or --server-url of a running hidden-state server")
    from utils.llm import make_backend

    return make_backend(spec)


def encoder_identity(encoder, server_url: str | None = None) -> dict[str, Any]:
    """``IDENTITY_FIELDS`` of ``encoder`` plus where its vectors come from."""
    spec: LLMSpec = encoder.spec
    resolved = getattr(encoder, "identity", None) or {}
    return {"source": "server" if server_url else "in-process", "url": server_url, "model": spec.model,
            "layer": spec.layer, "pooling": spec.pooling, "template_hash": spec.template_hash(),
            "dim": int(encoder.hidden_size), **{k: resolved.get(k) for k in RESOLVED_FIELDS}}


def check_same_identity(saved: dict[str, Any], current: dict[str, Any], where: str) -> None:
    """Refuse to continue a run with features from another model, layer, pooling, prompt, backend,
    compute dtype or model revision; fields the saved identity does not record get a note."""
    check_identity(saved, current, IDENTITY_FIELDS, subject=where,
                   fix="resume it with the same model, prompt, backend and dtype, or start a new run folder")


# ---------------------------------------------------------------------------------------------------
# The cache
# ---------------------------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class CacheStats:
    """Cumulative counters; ``later.since(earlier)`` gives those of a window."""

    lookups: int = 0
    hits: int = 0
    encoded: int = 0  # texts sent to the encoder (each unseen text once)
    encode_calls: int = 0
    encode_seconds: float = 0.0

    def since(self, earlier: "CacheStats") -> "CacheStats":
        return CacheStats(*(a - b for a, b in zip(dataclasses.astuple(self), dataclasses.astuple(earlier))))

    @property
    def hit_rate(self) -> float:
        return self.hits / self.lookups if self.lookups else float("nan")


class FeatureCache:
    """Text -> hidden state, least recently used entries dropped beyond ``max_entries``.

    A lookup sends each unseen text to ``encode`` once, in one call; repeated texts (within the
    call or seen before) are hits and cost nothing. ``max_entries`` bounds memory at about
    ``max_entries * dim * 4`` bytes."""

    def __init__(self, encode: Callable[[Sequence[str]], np.ndarray], dim: int, max_entries: int):
        if max_entries < 1:
            raise UserError(f"the feature cache must hold at least one entry, got {max_entries}")
        self._encode = encode
        self.dim = dim
        self.max_entries = max_entries
        self._entries: collections.OrderedDict[str, np.ndarray] = collections.OrderedDict()
        self.stats = CacheStats()

    def __len__(self) -> int:
        return len(self._entries)

    def __contains__(self, text: str) -> bool:
        return text in self._entries

    def lookup(self, texts: Sequence[str]) -> np.ndarray:
        """float32 [len(texts), dim], in order."""
        unseen = list(dict.fromkeys(t for t in texts if t not in self._entries))
        found = {t: self._entries[t] for t in texts if t in self._entries}
        for text in found:
            self._entries.move_to_end(text)
        seconds = 0.0
        if unseen:
            start = time.perf_counter()
            vectors = np.asarray(self._encode(unseen), dtype=np.float32)
            seconds = time.perf_counter() - start
            if vectors.shape != (len(unseen), self.dim):
                raise LLMError(f"the LLM returned hidden states of shape {vectors.shape} for "
                               f"{len(unseen)} texts; expected ({len(unseen)}, {self.dim})")
            for text, vector in zip(unseen, vectors):
                found[text] = self._entries[text] = vector
            while len(self._entries) > self.max_entries:
                self._entries.popitem(last=False)
        s = self.stats
        self.stats = CacheStats(s.lookups + len(texts), s.hits + len(texts) - len(unseen),
                                s.encoded + len(unseen), s.encode_calls + bool(unseen),
                                s.encode_seconds + seconds)
        out = np.empty((len(texts), self.dim), dtype=np.float32)
        for i, text in enumerate(texts):
            out[i] = found[text]
        return out


# ---------------------------------------------------------------------------------------------------
# The host side of a refresh
# ---------------------------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class RefreshCounters:
    """Cumulative host-side counters of :class:`LiveFeatures`."""

    calls: int = 0
    rows: int = 0  # env rows refreshed
    seconds: float = 0.0  # all host time in refreshes: rendering, cache and LLM
    cache: CacheStats = CacheStats()

    def since(self, earlier: "RefreshCounters") -> "RefreshCounters":
        return RefreshCounters(self.calls - earlier.calls, self.rows - earlier.rows,
                               self.seconds - earlier.seconds, self.cache.since(earlier.cache))

    def metrics(self, wall_seconds: float) -> dict[str, float]:
        """The ``perf/`` metrics of a window that took ``wall_seconds``."""
        wall = max(wall_seconds, 1e-9)
        return {
            "perf/llm_time_share": self.cache.encode_seconds / wall,
            "perf/feature_time_share": self.seconds / wall,
            "perf/feature_cache_hit_rate": self.cache.hit_rate,
            "perf/feature_rows": float(self.rows),
            "perf/llm_texts": float(self.cache.encoded),
        }


def require_text_env(env_name: str) -> None:
    from utils.text_obs import TEXT_ENV_NAMES

    if env_name not in TEXT_ENV_NAMES:
        raise UserError(f"LLM features need a symbolic Craftax env that has a text rendering "
                        f"({', '.join(TEXT_ENV_NAMES)}), not {env_name}")


class LiveFeatures:
    """``(obs [..., obs_dim], need [...]) -> float32 [..., dim]``: the host side of a refresh.

    Rows where ``need`` is False come back as zeros (the caller keeps its held value there) and are
    never rendered. Leading axes are free: training asks for [seeds, envs] at once, one LLM call
    for every seed's stale envs."""

    def __init__(self, env_name: str, encoder, cache_size: int):
        require_text_env(env_name)
        self.env_name = env_name
        self.encoder = encoder
        self.dim = int(encoder.hidden_size)
        self.cache = FeatureCache(encoder.hidden_states, self.dim, cache_size)
        self._calls = self._rows = 0
        self._seconds = 0.0

    def __call__(self, obs: np.ndarray, need: np.ndarray) -> np.ndarray:
        from utils.text_obs import render_texts

        start = time.perf_counter()
        need = np.asarray(need, dtype=bool)
        out = np.zeros(need.shape + (self.dim,), dtype=np.float32)
        if need.any():
            out[need] = self.cache.lookup(render_texts(np.asarray(obs)[need], self.env_name))
        self._calls += 1
        self._rows += int(need.sum())
        self._seconds += time.perf_counter() - start
        return out

    def counters(self) -> RefreshCounters:
        return RefreshCounters(self._calls, self._rows, self._seconds, self.cache.stats)


# ---------------------------------------------------------------------------------------------------
# The state the compiled segments carry
# ---------------------------------------------------------------------------------------------------


@struct.dataclass
class HeldFeatures:
    """Each env's current feature, held between refreshes; part of the checkpointed carry."""

    raw: jax.Array  # [N, D] float32 hidden state from the last refresh
    stale: jax.Array  # [N] bool: refresh before the next action
    norm: RunningMeanStd  # running mean and variance of the raw features, [D]

    @classmethod
    def create(cls, num_envs: int, dim: int) -> "HeldFeatures":
        """Nothing held yet: every env is stale, so the first step fetches all of them.

        The statistics start from count 0 (no prior), so after any number of steps they are
        exactly the mean and variance of the features seen; every step observes before it
        normalises, so the count is never 0 when they are used."""
        no_prior = RunningMeanStd(jnp.zeros(dim), jnp.ones(dim), jnp.float32(0.0))
        return cls(jnp.zeros((num_envs, dim), jnp.float32), jnp.ones(num_envs, bool), no_prior)

    def normalised(self) -> jax.Array:
        """The policy's input: the raw feature z-normalised by the current statistics."""
        return normalise(self.norm, self.raw)

    def observe(self) -> "HeldFeatures":
        """Fold this step's features (one per env) into the running statistics."""
        return self.replace(norm=self.norm.update(self.raw))

    def refreshed(self, new: jax.Array, need: jax.Array) -> "HeldFeatures":
        """Rows where ``need`` take the host's ``new`` features; nothing is stale afterwards."""
        return self.replace(raw=jnp.where(need[..., None], new, self.raw), stale=jnp.zeros_like(self.stale))

    def mark_stale(self, done: jax.Array, step: jax.Array, skip_n: int) -> "HeldFeatures":
        """After env step ``step`` (0-based) of the run: envs that just started an episode, or
        all envs when the next step is a multiple of ``skip_n``, need a refresh."""
        boundary = (step + 1) % skip_n == 0
        return self.replace(stale=done | boundary)


def normalise(norm: RunningMeanStd, raw: jax.Array) -> jax.Array:
    return z_normalise(raw, norm.mean, jnp.sqrt(norm.var))
