"""What every training entry point shares: episode statistics and the one host loop between chunks.

Every algorithm (PPO family, Dreamer, PPO-LLM, offline AWR/BC) hands :meth:`HostLoop.run` a function
that trains one chunk of updates; the loop owns everything between chunks: per-seed metrics, the
progress bar, the evaluation cadence, checkpoints, early stop, and at the end ``summary.json`` and the
learning curve. Resume is handled here once: the run folder, the checkpoint, the metrics file and a
trajectory dataset are all rolled back to the same update.
"""

from __future__ import annotations

import json
import math
import tempfile
import time
from pathlib import Path
from typing import Any, Callable, NamedTuple, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from flax import struct

from utils import evaluation
from utils.checkpoint import Checkpointer
from utils.config import to_dict
from utils.errors import UserError
from utils.io import atomic_write_json, read_jsonl
from utils.logger import MetricsLogger
from utils.plotting import plot_learning_curve
from utils.run_dir import open_run_dir, resolve_run_dir


@struct.dataclass
class EpisodeStats:
    """Sums over the episodes that finished in a window; divide on the host for means."""

    count: jax.Array
    return_sum: jax.Array
    length_sum: jax.Array
    achievement_sum: jax.Array  # [A]
    metric_sums: dict

    @classmethod
    def from_step(cls, done: jax.Array, info: dict) -> "EpisodeStats":
        mask = done.astype(jnp.float32)
        return cls(
            count=mask.sum(),
            return_sum=(info["episode_return"] * mask).sum(),
            length_sum=(info["episode_length"] * mask).sum(),
            achievement_sum=(info["achievements"] * mask[:, None]).sum(0),
            metric_sums={k: (v * mask).sum() for k, v in info["episode_metrics"].items()},
        )

    def sum(self, axis: int = 0) -> "EpisodeStats":
        return jax.tree.map(lambda x: x.sum(axis), self)


def episode_metrics(stats: EpisodeStats, achievement_names: Sequence[str]) -> dict[str, np.ndarray]:
    """Per-seed means from summed stats ([seeds, ...]); NaN where no episode finished."""
    count = np.asarray(stats.count, dtype=np.float64)
    with np.errstate(invalid="ignore", divide="ignore"):
        per_episode = lambda total: np.where(count > 0, np.asarray(total) / count, np.nan)
        metrics = {
            "episode/count": count,
            "episode/return": per_episode(stats.return_sum),
            "episode/length": per_episode(stats.length_sum),
        }
        for i, name in enumerate(achievement_names):
            metrics[f"achievements/{name}"] = 100.0 * per_episode(np.asarray(stats.achievement_sum)[..., i])
        for name, total in stats.metric_sums.items():
            metrics[metric_key(name)] = per_episode(total)
    return metrics


def per_seed_mean(values) -> np.ndarray:
    """``[seeds, updates]`` -> ``[seeds]`` (mean over the chunk); ``[seeds]`` stays as it is."""
    values = np.asarray(values)
    return values.mean(1) if values.ndim > 1 else values


def metric_key(name: str) -> str:
    """Logged name of an env-specific episode metric: plain names (Tetris ``lines``) go under
    ``episode/``; names that carry their own group (full Craftax's ``floors/...``) keep it."""
    return name if "/" in name else f"episode/{name}"


def init_per_seed(init: Callable[[jax.Array], Any], keys: jax.Array) -> Any:
    """``jax.vmap(init)(keys)``, computed one seed at a time and stacked.

    Not vmapped on purpose: orthogonal initialisers run LAPACK QR, and a QR batched over seeds splits
    its batch over XLA's CPU thread pool while waiting for it; two such QRs running at once on a
    2-thread pool wait on each other forever (seen with gdb: both pool threads blocked inside
    ``lapack_sgeqrf``, the program never finishing). One seed at a time, each QR is unbatched.
    """
    init = jax.jit(init)
    return jax.tree.map(lambda *leaves: jnp.stack(leaves), *[init(key) for key in keys])


def weighted_final(rows: list[dict], fraction: float = 0.1) -> dict[str, Any]:
    """Episode-weighted mean of the last ``fraction`` of logged rows, per seed and over seeds."""
    rows = [r for r in rows if r.get("episode/count") is not None]
    if not rows:
        return {}
    tail = rows[-max(1, int(len(rows) * fraction)) :]
    counts = np.array([r["episode/count"] for r in tail], dtype=np.float64)  # [rows, seeds]
    keys = [k for k in tail[-1] if k.startswith(("episode/", "achievements/", "floors/")) and k != "episode/count"]
    result: dict[str, Any] = {"episodes": counts.sum(0).tolist()}
    for key in keys:
        values = np.array([[np.nan if v is None else v for v in r.get(key) or []] for r in tail], dtype=np.float64)
        if values.shape != counts.shape:
            continue
        weights = np.where(np.isnan(values), 0.0, counts)
        with np.errstate(invalid="ignore", divide="ignore"):
            per_seed = np.nansum(np.nan_to_num(values) * weights, 0) / weights.sum(0)
        result[key] = {"mean": float(np.nanmean(per_seed)) if np.isfinite(per_seed).any() else None,
                       "per_seed": [None if not np.isfinite(v) else float(v) for v in per_seed]}
    return result


class ChunkOutput(NamedTuple):
    """What one chunk of training hands back to :meth:`HostLoop.run` (host arrays, per seed).

    ``stats``: episode sums ``[seeds, updates]`` (None for algorithms without episodes: offline RL).
    ``losses``: ``[seeds, updates]`` (averaged over the chunk) or ``[seeds]``. ``metrics``: anything
    else for the row as logged (``perf/...`` figures only the algorithm can measure); it wins over the
    loop's own figures of the same name. ``saved``: what the chunk kept for ``after_chunk`` (the last
    rollout, for trajectory datasets).
    """

    carry: Any
    stats: EpisodeStats | None
    losses: dict
    metrics: dict = {}
    saved: Any = None


class HostLoop:
    """Run-folder, logging, progress, evaluation, checkpoint and resume logic around chunks of updates.

    ``steps_per_update``: env steps one update takes per seed (the ``step`` of a metrics row counts
    them); offline RL takes none and passes 1 with ``env_steps=False``, so rows count updates.
    ``checkpointer``: builds the checkpoint store from the run's ``checkpoints/`` folder (default: the
    Orbax :class:`Checkpointer`; anything with ``latest_step``, ``restore``, ``save`` and ``close``).
    ``curve_key``/``curve_title``: what ``learning_curve.png`` shows.
    ``primary``: whether this process writes the run folder (default: JAX process 0). In a multi-process
    run (``utils.distributed``) every process runs the loop and saves checkpoints together (Orbax
    coordinates them); the others log to a scratch folder and show no progress.
    """

    def __init__(self, cfg: Any, area: str, algo: str, *, steps_per_update: int, total_updates: int,
                 achievement_names: Sequence[str], env_steps: bool = True,
                 checkpointer: Callable[[Path], Any] = Checkpointer, curve_key: str = "episode/return",
                 curve_title: str | None = None, primary: bool | None = None):
        self.cfg, self.area, self.algo = cfg, area, algo
        self.curve_key, self.curve_title = curve_key, curve_title or f"{algo} on {cfg.env}"
        self.steps_per_update = steps_per_update
        self.env_steps = env_steps
        self.total_updates = total_updates
        self.achievement_names = tuple(achievement_names)
        self.primary = jax.process_index() == 0 if primary is None else primary
        self.run_dir = resolve_run_dir(cfg, area, algo)
        if self.primary:
            open_run_dir(cfg, self.run_dir)
        self.checkpointer = checkpointer(self.run_dir / "checkpoints")
        latest = self.checkpointer.latest_step()
        self.start_update = int(latest) if latest is not None else 0
        self.resuming = latest is not None
        self.logger = MetricsLogger(
            self.run_dir if self.primary else Path(tempfile.mkdtemp(prefix="craftax-process-")),
            config=to_dict(cfg),
            resume_step=self.start_update * steps_per_update if self.resuming else None,
            tensorboard=cfg.tensorboard and self.primary,
            wandb_mode=cfg.wandb if self.primary else "disabled",
            wandb_project=cfg.wandb_project,
        )
        self._last_checkpoint = self.start_update
        self._started = time.perf_counter()
        self._progress = self._open_progress()
        self.last_eval: dict = {}

    # -- the loop -----------------------------------------------------------------------------------
    def run(self, carry: Any, train_chunk: Callable[[Any, int], ChunkOutput], *, updates_per_chunk: int,
            evaluate: Callable[[Any, jax.Array], dict] | None = None, eval_every: int = 0,
            after_chunk: Callable[[int, ChunkOutput], None] | None = None,
            summary_fields: Callable[[], dict] | None = None,
            stop_after_updates: int | None = None) -> dict:
        """Train from ``carry`` (already restored) to ``total_updates``; returns summary, carry and folder.

        ``train_chunk(carry, length)`` runs ``length`` updates (``updates_per_chunk`` except for a last
        partial chunk, which compiled algorithms avoid by rounding ``total_updates`` up).
        ``evaluate(carry, key) -> eval metrics`` runs every ``eval_every`` updates and after the last
        (its key depends only on the seed and the update, so a resumed run evaluates identically).
        ``after_chunk(update, output)`` sees each chunk before it is logged (saving trajectories).
        ``summary_fields()`` adds to (or overrides) ``summary.json``'s fields; it runs after the metrics
        file is closed. ``stop_after_updates`` ends the loop early as if the process had been killed
        there (for tests; at the first chunk boundary at or past it).
        """
        eval_key = jax.random.PRNGKey(self.cfg.seed + 10_000)
        update = self.start_update
        while update < self.total_updates:
            if stop_after_updates is not None and update >= stop_after_updates:
                break
            length = min(updates_per_chunk - update % updates_per_chunk, self.total_updates - update)
            start = time.perf_counter()
            output = train_chunk(carry, length)
            carry = output.carry
            update += length
            final = update >= self.total_updates
            if after_chunk is not None:
                after_chunk(update, output)
            evals = {}
            if evaluate is not None and (final or (eval_every and update % eval_every == 0)):
                evals = evaluate(carry, jax.random.fold_in(eval_key, update))
            self.after_chunk(update, output.stats, output.losses, {**evals, **output.metrics},
                             seconds=time.perf_counter() - start, chunk_updates=length)
            self.maybe_checkpoint(update, carry, final=final)
        summary = self.finish(update, carry, final=update >= self.total_updates, extra=summary_fields)
        return {"summary": summary, "carry": carry, "run_dir": self.run_dir}

    # -- resume -----------------------------------------------------------------------------------
    def restore(self, carry: Any) -> Any:
        if not self.resuming:
            return carry
        carry, _ = self.checkpointer.restore(self.start_update, carry)
        self.say(f"resuming {self.run_dir} from update {self.start_update}")
        return carry

    def open_trajectory_writer(self, env, directory: str | None, num_streams: int):
        if not directory:
            return None
        from utils.trajectories import TrajectoryWriter

        path = Path(directory)
        if not self.resuming and (path / "manifest.json").exists():
            raise UserError(
                f"trajectory folder {path} already holds a dataset; pass a new --save-trajectories folder "
                "(or resume the run that wrote it)"
            )
        return TrajectoryWriter(
            path,
            env_name=env.name,
            obs_shape=env.obs_shape,
            obs_dtype=np.dtype(env.obs_dtype),
            num_streams=num_streams,
            num_actions=env.num_actions,
            resume_after_update=self.start_update - 1 if self.resuming else None,
            metadata={"config": to_dict(self.cfg), "run_dir": str(self.run_dir)},
        )

    # -- between chunks ---------------------------------------------------------------------------
    def after_chunk(self, update: int, stats: EpisodeStats | None, losses: dict, extra: dict, seconds: float,
                    chunk_updates: int) -> dict:
        """Log one row for the chunk of ``chunk_updates`` updates that just finished at ``update``."""
        metrics = {}
        if stats is not None:
            stats = jax.tree.map(lambda x: np.asarray(x).sum(1), stats)  # [seeds, chunk] -> [seeds]
            metrics.update(episode_metrics(stats, self.achievement_names))
        metrics.update({k: per_seed_mean(v) for k, v in losses.items()})
        steps = self.cfg.num_seeds * chunk_updates * self.steps_per_update
        metrics["perf/sps"] = steps / max(seconds, 1e-9)
        metrics["perf/update"] = update
        metrics["perf/wall_seconds"] = time.perf_counter() - self._started
        metrics.update(extra)
        row = self.logger.log(update * self.steps_per_update, metrics)
        self._advance_progress(update, row)
        return row

    def eval_metrics(self, result: dict) -> dict[str, np.ndarray]:
        """Per-seed ``eval/...`` means over the evaluation episodes that finished; kept for the summary."""
        metrics = evaluation.eval_metrics(result, self.achievement_names)
        self.last_eval = {k: [None if not np.isfinite(v) else float(v) for v in vals] for k, vals in metrics.items()}
        return metrics

    def maybe_checkpoint(self, update: int, carry: Any, final: bool = False) -> None:
        every = max(1, self.cfg.checkpoint_every)
        if final or update // every > self._last_checkpoint // every:
            self.checkpointer.save(update, carry, {"config": to_dict(self.cfg), "update": update})
            self._last_checkpoint = update

    # -- the end ----------------------------------------------------------------------------------
    def finish(self, update: int, carry: Any, final: bool, extra: Callable[[], dict] | None = None) -> dict:
        self.checkpointer.close()
        self.logger.close()
        if self._progress is not None:
            self._progress.close()
        rows = read_jsonl(self.logger.path) if self.logger.path.exists() else []
        previous = self.run_dir / "summary.json"
        if not self.last_eval and previous.exists():  # re-running a finished run evaluates nothing new
            self.last_eval = json.loads(previous.read_text()).get("eval", {})
        sps = [r["perf/sps"] for r in rows if r.get("perf/sps")]
        summary = {
            "area": self.area,
            "algo": self.algo,
            "env": self.cfg.env,
            "complete": bool(final),
            "updates": update,
            **({"env_steps_per_seed": update * self.steps_per_update} if self.env_steps else {}),
            "num_seeds": self.cfg.num_seeds,
            "median_sps": float(np.median(sps)) if sps else None,
            "final": weighted_final(rows),
            "eval": self.last_eval,
            **(extra() if extra is not None else {}),
        }
        if not self.primary:
            return summary
        atomic_write_json(self.run_dir / "summary.json", summary)
        if rows:
            plot_learning_curve(self.logger.path, self.run_dir / "learning_curve.png", key=self.curve_key,
                                title=self.curve_title)
        return summary

    # -- progress -----------------------------------------------------------------------------------
    def _open_progress(self):
        if not self.cfg.progress or not self.primary:
            return None
        from tqdm.auto import tqdm

        return tqdm(
            total=self.total_updates * self.steps_per_update,
            initial=self.start_update * self.steps_per_update,
            unit="step" if self.env_steps else "update",
            unit_scale=True,
            dynamic_ncols=True,
            desc=f"{self.algo} {self.cfg.env}",
        )

    def _advance_progress(self, update: int, row: dict) -> None:
        if self._progress is None:
            return
        self._progress.update(update * self.steps_per_update - self._progress.n)
        returns = row.get("episode/return")
        finite = [v for v in (returns or []) if v is not None]
        if finite:
            self._progress.set_postfix(ret=f"{np.mean(finite):.2f}", refresh=False)

    def say(self, message: str) -> None:
        """Print a line without breaking the progress bar."""
        if self._progress is not None:
            self._progress.write(message)
        else:
            print(message)


def updates_for(total_steps: int, steps_per_update: int) -> int:
    """Enough updates to take at least ``total_steps`` env steps per seed (at least one)."""
    return max(1, math.ceil(total_steps / steps_per_update))


def largest_chunk(total_updates: int, limit: int, multiple_of: int | None = None) -> int:
    """Updates per compiled chunk: the largest up to ``limit`` that divides ``multiple_of`` (default:
    the run), so the run takes exactly its updates with one compiled program."""
    target = total_updates if multiple_of is None else multiple_of
    return max(d for d in range(1, min(limit, total_updates) + 1) if target % d == 0)


def seed_keys(seed: int, num_seeds: int) -> jax.Array:
    """One PRNG key per seed, ``seed, seed + 1, ...``: the same seed trains the same way alone or in a group."""
    return jnp.stack([jax.random.PRNGKey(seed + i) for i in range(num_seeds)])
