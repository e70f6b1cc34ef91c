"""Live LLM features for online RL: observation -> text or frame -> cached hidden state.

PPO with LLM features (``online_rl_llm.ppo_llm``) runs compiled segments of env steps and returns to
the host only at *refresh points*, where some env needs a new feature: every ``skip_n`` env steps
(all envs) and the step after an episode ended (those envs, whose new episode would otherwise act
on the old world's feature). This module is the host side of a refresh and the state it updates:

* :class:`LiveFeatures` turns the rows that need a refresh into what the model reads, looks them up
  in a :class:`FeatureCache` and sends only unseen ones to the model: the one loaded in this
  process (``utils.llm.make_backend``) or the hidden-state server (``utils.hidden_state_client``).
  It times every part, for ``perf/llm_time_share``. The env decides the *modality*
  (:func:`feature_modality`): a symbolic Craftax observation is rendered to the canonical text
  (:class:`TextRows`, ``utils.text_obs.render_texts``, the renderer labelling uses); a pixel
  observation is a frame and goes to a vision-language model (:class:`FrameRows`,
  ``utils.llm.frame_features``), keyed in the cache by a digest of its bytes. Everything else (the
  refresh schedule, batching, cache, normalisation, identity checks) is the same for both.
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
import hashlib
import time
from collections.abc import Callable, Hashable, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import struct

from utils.errors import UserError
from utils.feature_norm import z_normalise
from utils.llm import IMAGE_FIELDS, RESOLVED_FIELDS, LLMError, LLMSpec, check_identity
from utils.running_stats import RunningMeanStd

# ---------------------------------------------------------------------------------------------------
# Where hidden states come from: the in-process model or the server, behind one interface
# ---------------------------------------------------------------------------------------------------

IDENTITY_FIELDS = ("model", "layer", "pooling", "template_hash", "dim", *RESOLVED_FIELDS, *IMAGE_FIELDS)
"""What decides a feature vector; a resumed run must get its features from the same. The resolved
ones (``utils.llm.RESOLVED_FIELDS``: engine, resolved dtype, weights) come from the backend, or from
the server's /health; a run folder saved before they were recorded resumes with a note
(``utils.llm.check_identity``, the rule labelled datasets and offline evaluation follow too). The
image ones (``utils.llm.IMAGE_FIELDS``: modality, image processor) keep text and frame features
apart; a folder that records no modality holds text features."""

PIXEL_ENV_NAMES = ("Craftax-Classic-Pixels-v1", "Craftax-Pixels-v1")
"""Envs whose observations are the frames a vision-language model reads (RGB, floats k / 255)."""


def feature_modality(env_name: str) -> str:
    """``text`` for an env with a text rendering (``utils.text_obs``), ``image`` for a pixel env
    (its observation is the frame); other envs have neither, which is one line saying so."""
    from utils.text_obs import TEXT_ENV_NAMES

    if env_name in TEXT_ENV_NAMES:
        return "text"
    if env_name in PIXEL_ENV_NAMES:
        return "image"
    raise UserError(f"LLM features need a symbolic Craftax env that has a text rendering "
                    f"({', '.join(TEXT_ENV_NAMES)}) or a pixel env whose frames a vision-language model "
                    f"reads ({', '.join(PIXEL_ENV_NAMES)}), not {env_name}")


def encoder_modality(encoder) -> str:
    """What ``encoder`` computes features of; stand-ins without a ``modality`` compute text ones."""
    return getattr(encoder, "modality", "text")


def check_modality(env_name: str, modality: str, model: str) -> None:
    """One line, before anything runs, when ``model``'s features are of the other modality than
    ``env_name``'s observations (a text model for a pixel env, a vision-language model for a
    symbolic one)."""
    needed = feature_modality(env_name)
    if modality == needed:
        return
    if needed == "image":
        raise UserError(f"{env_name} has pixel observations: its features come from frames through a "
                        f"vision-language model, but {model} computes text features; pass a vision-language "
                        "model (try python -m utils.testing.tiny_vlm runs/tiny_vlm), or use a symbolic env")
    raise UserError(f"{env_name} has text observations, but {model} computes image features (a "
                    f"vision-language model); pass a text model, or use a pixel env ({', '.join(PIXEL_ENV_NAMES)})")


def open_encoder(spec: LLMSpec | None, server_url: str | None, env_name: str | None = None):
    """A ``utils.llm.LLMBackend``-like object (``spec``, ``hidden_size``, ``hidden_states(texts)`` or
    ``image_hidden_states(frames, env)``): the hidden-state server's client when ``server_url`` is
    given, else ``spec``'s model loaded here. With ``env_name``, a model of the other modality than
    the env's observations is refused first (for a local model from its config, before any weights load).

    Through the server, texts or frames (not observations) go over the wire: the cache is keyed by
    them, so only unseen ones are sent, and the server applies its prompt exactly as labelling does."""
    if server_url:
        from utils.hidden_state_client import HiddenStateClient

        client = HiddenStateClient(server_url)
        client.info()  # fail now, with the server's one-line reason, if it is not there
        if env_name:
            check_modality(env_name, client.modality, client.info().get("model", server_url))
        return client
    if spec is None or not spec.model:
        raise UserError("no LLM given: pass --llm-model with a model folder or hub id, "
                        "or --server-url of a running hidden-state server")
    from utils.llm import make_backend

    if env_name:
        check_modality(env_name, model_modality(spec), spec.model)
    return make_backend(spec)


def model_modality(spec: LLMSpec) -> str:
    """What ``spec``'s model computes features of, read from its config (no weights loaded, and before
    the spec's own checks, so a text model asked for ``image_mean`` hears that it is a text model)."""
    if spec.modality != "auto":
        return spec.modality
    from utils.llm import is_vision_model

    return "image" if is_vision_model(spec.model) else "text"


def encoder_identity(encoder, server_url: str | None = None) -> dict[str, Any]:
    """``IDENTITY_FIELDS`` of ``encoder`` plus where its vectors come from."""
    spec: LLMSpec = encoder.spec
    resolved = getattr(encoder, "identity", None) or {}
    return {"source": "server" if server_url else "in-process", "url": server_url, "model": spec.model,
            "layer": spec.layer, "pooling": spec.pooling, "template_hash": spec.template_hash(),
            "dim": int(encoder.hidden_size), **{k: resolved.get(k) for k in RESOLVED_FIELDS},
            "modality": encoder_modality(encoder), "image_processor": resolved.get("image_processor")}


def check_same_identity(saved: dict[str, Any], current: dict[str, Any], where: str) -> None:
    """Refuse to continue a run with features from another model, layer, pooling, prompt, backend,
    compute dtype, model revision, modality or image processor; fields the saved identity does not
    record get a note."""
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
    encoded: int = 0  # texts or frames sent to the encoder (each unseen one once)
    encode_calls: int = 0
    encode_seconds: float = 0.0

    def since(self, earlier: "CacheStats") -> "CacheStats":
        return CacheStats(*(a - b for a, b in zip(dataclasses.astuple(self), dataclasses.astuple(earlier))))

    @property
    def hit_rate(self) -> float:
        return self.hits / self.lookups if self.lookups else float("nan")


class FeatureCache:
    """Key -> hidden state, least recently used entries dropped beyond ``max_entries``.

    A key is a text, or a digest standing for a frame (:class:`FrameRows`). A lookup sends each
    unseen key's item (the text itself, or the frame) to ``encode`` once, in one call; repeated keys
    (within the call or seen before) are hits and cost nothing. Only vectors and keys are kept, so
    ``max_entries`` bounds memory at about ``max_entries * dim * 4`` bytes."""

    def __init__(self, encode: Callable[[Sequence[Any]], np.ndarray], dim: int, max_entries: int):
        if max_entries < 1:
            raise UserError(f"the feature cache must hold at least one entry, got {max_entries}")
        self._encode = encode
        self.dim = dim
        self.max_entries = max_entries
        self._entries: collections.OrderedDict[Hashable, np.ndarray] = collections.OrderedDict()
        self.stats = CacheStats()

    def __len__(self) -> int:
        return len(self._entries)

    def __contains__(self, key: Hashable) -> bool:
        return key in self._entries

    def lookup(self, keys: Sequence[Hashable], items: Sequence[Any] | None = None) -> np.ndarray:
        """float32 [len(keys), dim], in order. ``items[i]`` is what ``encode`` gets for ``keys[i]``
        when that key is unseen (default: the key itself, as for texts)."""
        items = keys if items is None else items
        unseen: dict[Hashable, int] = {}  # unseen key -> its first row
        for i, key in enumerate(keys):
            if key not in self._entries:
                unseen.setdefault(key, i)
        found = {k: self._entries[k] for k in keys if k in self._entries}
        for key in found:
            self._entries.move_to_end(key)
        seconds = 0.0
        if unseen:
            start = time.perf_counter()
            vectors = np.asarray(self._encode([items[i] for i in unseen.values()]), dtype=np.float32)
            seconds = time.perf_counter() - start
            if vectors.shape != (len(unseen), self.dim):
                raise LLMError(f"the LLM returned hidden states of shape {vectors.shape} for "
                               f"{len(unseen)} inputs; expected ({len(unseen)}, {self.dim})")
            for key, vector in zip(unseen, vectors):
                found[key] = self._entries[key] = vector
            while len(self._entries) > self.max_entries:
                self._entries.popitem(last=False)
        s = self.stats
        self.stats = CacheStats(s.lookups + len(keys), s.hits + len(keys) - len(unseen),
                                s.encoded + len(unseen), s.encode_calls + bool(unseen),
                                s.encode_seconds + seconds)
        out = np.empty((len(keys), self.dim), dtype=np.float32)
        for i, key in enumerate(keys):
            out[i] = found[key]
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


class TextRows:
    """Symbolic observation rows -> canonical texts (``utils.text_obs.render_texts``, labelling's
    renderer); a text is its own cache key and goes to the encoder's ``hidden_states``."""

    modality = "text"

    def __init__(self, env_name: str, encoder):
        self.env_name, self.encoder = env_name, encoder

    def keys_and_items(self, obs: np.ndarray) -> tuple[list[str], list[str]]:
        from utils.text_obs import render_texts

        texts = render_texts(obs, self.env_name)
        return texts, texts

    def encode(self, texts: Sequence[str]) -> np.ndarray:
        return self.encoder.hidden_states(texts)


class FrameRows:
    """Pixel observation rows -> the uint8 frames they were rendered from (``utils.frames``, exact),
    keyed by a digest of their bytes (the cache keeps 16-byte keys, not 12 kB frames); frames go to
    ``utils.llm.frame_features``, which takes the in-process backend and the server's client alike."""

    modality = "image"

    def __init__(self, env_name: str, encoder):
        self.env_name, self.encoder = env_name, encoder

    def keys_and_items(self, obs: np.ndarray) -> tuple[list[bytes], np.ndarray]:
        from utils.frames import as_uint8_frames

        frames = as_uint8_frames(obs)
        return [hashlib.blake2b(frame.tobytes(), digest_size=16).digest() for frame in frames], frames

    def encode(self, frames: Sequence[np.ndarray]) -> np.ndarray:
        from utils.llm import frame_features

        return frame_features(self.encoder, np.stack(frames), self.env_name)


def observation_rows(env_name: str, encoder) -> TextRows | FrameRows:
    """How ``env_name``'s observations reach ``encoder``: texts or frames (:func:`feature_modality`),
    refused in one line when the encoder computes the other kind."""
    check_modality(env_name, encoder_modality(encoder), encoder.spec.model)
    return FrameRows(env_name, encoder) if feature_modality(env_name) == "image" else TextRows(env_name, encoder)


class LiveFeatures:
    """``(obs [..., *obs_shape], need [...]) -> float32 [..., dim]``: the host side of a refresh.

    Rows where ``need`` is False come back as zeros (the caller keeps its held value there) and are
    never rendered or encoded. Leading axes are free: training asks for [seeds, envs] at once, one
    model call for every seed's stale envs. Texts and frames differ only in :func:`observation_rows`."""

    def __init__(self, env_name: str, encoder, cache_size: int):
        self.env_name = env_name
        self.encoder = encoder
        self.rows = observation_rows(env_name, encoder)
        self.modality = self.rows.modality
        self.dim = int(encoder.hidden_size)
        self.cache = FeatureCache(self.rows.encode, self.dim, cache_size)
        self._calls = self._rows = 0
        self._seconds = 0.0

    def __call__(self, obs: np.ndarray, need: np.ndarray) -> np.ndarray:
        start = time.perf_counter()
        need = np.asarray(need, dtype=bool)
        out = np.zeros(need.shape + (self.dim,), dtype=np.float32)
        if need.any():
            out[need] = self.cache.lookup(*self.rows.keys_and_items(np.asarray(obs)[need]))
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
