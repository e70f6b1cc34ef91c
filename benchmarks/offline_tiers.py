"""Datasets of graded quality for offline RL, by one command (D4RL naming), from one PPO run.

    python -m benchmarks.offline_tiers --preset debug --out data/tiers_debug          # seconds: end to end
    python -m benchmarks.offline_tiers --env Craftax-Classic-Symbolic-v1 --out /data/tiers/classic \\
        --ppo-preset cpu --ppo-steps 20000000 --steps 1000000
    python -m benchmarks.offline_tiers --from-run runs/online_rl/ppo/Craftax-Symbolic-v1/cpu-s0 --out DIR

Steps (each one is skipped when a re-run finds it done):

1. **PPO**: trains ``online_rl.ppo``, or takes ``--from-run`` (any finished run: no saved rollouts needed).
2. **Medium**: from the run's ``metrics.jsonl``, the first update whose (smoothed) training return
   reaches ``--medium-fraction`` of the final return. A run keeps only its newest checkpoints, so the
   medium policy is re-trained from the same config and seed and stopped at that update
   (``stop_after_updates``; the same number of updates, so the same learning-rate schedule). The re-run
   saves its rollouts (every ``--replay-every``-th): they are the medium-replay data.
3. **Returns**: the random, medium and expert (final) policies each play ``--eval-episodes`` episodes.
4. **Tiers**, each a dataset folder in the usual format (docs/design.md) under ``--out``:
   ``random``, ``medium``, ``expert`` (``--steps`` transitions each, ``--num-envs`` envs, rollouts of
   ``--rollout-length``), ``medium-expert`` (the medium and expert rollouts concatenated, a gap in
   ``t`` between them so no return chains across) and ``medium-replay`` (the re-run's rollouts before the
   medium update, hard-linked). Every manifest's metadata holds a ``tier`` block
   (``utils.tiers``): the policies and their returns, the data policy's return, and the random and
   expert returns, from which offline evaluation computes normalised scores.

With ``--pixels`` the tiers hold the frames of the same states (Craftax-Classic-Pixels-v1 for Classic) while
the symbolic policies act: pixel datasets of known quality without a pixel PPO run. For example:

    python -m benchmarks.offline_tiers --preset cpu --preset pixels_cpu \
        --from-run runs/offline_tiers/classic/ppo/run --out runs/offline_tiers/classic_pixels

A tier is written to ``<name>.partial`` and renamed when complete, so an interrupted build redoes
only the unfinished tier. Lives in ``benchmarks`` because it drives both ``online_rl`` (PPO) and
``offline_rl`` (the dataset helpers), which may not import each other.
"""

from __future__ import annotations

import dataclasses
import json
import math
import shlex
import shutil
from pathlib import Path
from typing import Any, Callable

import numpy as np

from utils.errors import UserError, exit_on_user_error
from utils.tiers import TIER_KEY, TIERS, tier_block

AREA, NAME = "offline_rl", "offline_tiers"
# With --pixels the tiers hold the frames of this env: the same game and states as the symbolic one.
PIXEL_TWINS = {"Craftax-Classic-Symbolic-v1": "Craftax-Classic-Pixels-v1", "Craftax-Symbolic-v1": "Craftax-Pixels-v1"}


@dataclasses.dataclass
class TiersConfig:
    """Build random / medium / expert / medium-replay / medium-expert datasets from one PPO run."""

    out: str = ""
    """Folder that receives one dataset folder per tier (and the PPO run, unless --from-run)."""
    env: str = "Craftax-Classic-Symbolic-v1"
    """Environment (ignored with --from-run, which names its own)."""
    preset: tuple[str, ...] = ()
    """Presets from configs/offline_rl/offline_tiers.yaml, applied left to right before other flags."""
    from_run: str | None = None
    """Use this finished online_rl.ppo run folder instead of training one."""
    ppo_preset: tuple[str, ...] = ()
    """Presets of the PPO run to train (configs/online_rl/ppo.yaml), e.g. cpu."""
    ppo_steps: int = 1_000_000
    """Env steps of the PPO run to train."""
    ppo_args: str = ""
    """More flags for the PPO run, as one string, e.g. "--num-envs 1024 --layer-width 512"."""
    replay_every: int = 1
    """The medium re-run saves every this-many-th rollout: medium-replay holds them. 1 keeps every rollout, so
    episodes run whole across them and give the tier its data return; above 1 no episode is complete."""
    tiers: tuple[str, ...] = TIERS
    """Which tiers to write."""
    steps: int = 1_000_000
    """Transitions per collected tier (random, medium, expert; medium-expert gets both halves)."""
    medium_fraction: float = 0.5
    """The medium policy is the first whose training return reaches this fraction of the final return."""
    num_envs: int = 64
    """Envs stepped together while collecting a tier (the dataset's streams)."""
    rollout_length: int = 64
    """Steps per saved rollout (one shard) while collecting."""
    eval_episodes: int = 64
    """Episodes each policy plays to measure its return (random, medium, expert)."""
    eval_max_steps: int = 10_000
    """Return measurement stops after this many env steps (unfinished episodes are not counted)."""
    seed: int = 0
    """Seed of the PPO run (when trained here), collection and evaluation."""
    seed_index: int = 0
    """Which trained seed of a multi-seed --from-run acts as the medium and expert policy."""
    reset_ratio: int = 16
    """Optimistic resets while collecting (see utils.envs)."""
    progress: bool = True
    """Show progress (PPO's bar and one line per step here)."""
    pixels: bool = False
    """Save the pixel frames of the visited states (Craftax-Classic-Pixels-v1 for Classic) instead of the
    symbolic observations: the policies still act on the symbolic observation of the same state, so a pixel
    tier is as good as its symbolic twin. medium-replay (the PPO run's own symbolic rollouts) is skipped."""
    record: str | None = None
    """Also write the tiers as a docs/data table here (e.g. docs/data/offline_tiers_craftax.json), read from
    their manifests, for ``benchmarks.report``."""


# ----------------------------------------------------------------------------------------------
# The PPO run and its medium update
# ----------------------------------------------------------------------------------------------


def ppo_config(cfg: TiersConfig):
    """The PPO run's config: its ``config.yaml`` with --from-run, else the one this command trains."""
    import yaml

    from online_rl.ppo import PPOConfig
    from utils.config import parse_config

    if cfg.from_run:
        run = Path(cfg.from_run)
        summary = run / "summary.json"
        algo = json.loads(summary.read_text()).get("algo") if summary.is_file() else None
        if algo is None or not str(algo).startswith("ppo") or algo == "ppo_rnn":
            raise UserError(f"--from-run {run}: expected a finished online_rl.ppo run folder (summary.json with "
                            f"algo ppo or ppo_<bonus>), found algo {algo!r}")
        saved = yaml.safe_load((run / "config.yaml").read_text()) or {}
        default = PPOConfig()
        values = {k: tuple(v) if isinstance(getattr(default, k, None), tuple) and isinstance(v, list) else v
                  for k, v in saved.items()}
        return dataclasses.replace(default, **{**values, "run_dir": str(run), "progress": cfg.progress})
    out = Path(cfg.out)
    argv = [*(a for p in cfg.ppo_preset for a in ("--preset", p)), "--env", cfg.env,
            "--total-steps", str(cfg.ppo_steps), "--seed", str(cfg.seed), "--num-seeds", "1",
            "--run-dir", str(out / "ppo" / "run"), "--progress" if cfg.progress else "--no-progress",
            *shlex.split(cfg.ppo_args)]
    return parse_config(PPOConfig, "online_rl", "ppo", argv)


def training_curve(run_dir: Path, seed_index: int) -> tuple[np.ndarray, np.ndarray]:
    """``(updates, training return)`` of one seed, from the rows of ``metrics.jsonl`` with finished episodes."""
    from utils.io import read_jsonl

    updates, returns = [], []
    for row in read_jsonl(run_dir / "metrics.jsonl"):
        value = row.get("episode/return")
        value = value[seed_index] if isinstance(value, list) else value
        if value is not None and row.get("perf/update") is not None and math.isfinite(value):
            updates.append(int(row["perf/update"]))
            returns.append(float(value))
    if not updates:
        raise UserError(f"{run_dir}/metrics.jsonl has no finished training episodes; train the PPO run longer")
    return np.array(updates), np.array(returns)


def pick_medium_update(updates: np.ndarray, returns: np.ndarray, fraction: float) -> tuple[int, float, float]:
    """``(update, smoothed return there, final return)``: the first update whose training return,
    a trailing median over a twentieth of the run, reaches ``fraction`` of the final return (the mean
    of the last tenth). A median, not a mean, so one lucky chunk is not taken for a medium policy."""
    window = max(1, len(returns) // 20)
    smooth = np.array([np.median(returns[max(0, i - window + 1):i + 1]) for i in range(len(returns))])
    final = float(returns[-max(1, len(returns) // 10):].mean())
    if final <= 0:
        raise UserError(f"the PPO run's final training return is {final:.3g}: it learned nothing to grade; "
                        "train it longer (--ppo-steps) or pick another run")
    reached = np.flatnonzero(smooth >= fraction * final)
    index = int(reached[0]) if reached.size else len(returns) - 1
    return int(updates[index]), float(smooth[index]), final


def medium_checkpoint(ppo_cfg, update: int, out: Path, replay_every: int) -> tuple[str, int, str]:
    """``(run folder, step, rollouts)``: the policy after ``update`` updates of ``ppo_cfg``'s run, and the
    folder of the rollouts that led there (every ``replay_every``-th), the medium-replay data.

    A run keeps only its newest checkpoints, so the run is re-trained from its config and seed up to
    ``update``, saving its rollouts, always with the same settings, so that a later call resumes or finds
    it finished. Its chunks then divide the save interval, but a run's chunks always divide its update
    count, so the learning-rate schedule (over all of the run's updates) is the original's."""
    from online_rl.ppo import train

    folder = out / "ppo" / "medium"
    rollouts = folder / "rollouts"
    if not rollouts.exists() or _checkpoint_step(folder / "run") is None:
        # Nothing to resume: a re-run by an older version, which saved no rollouts, or one stopped before
        # its first checkpoint, whose rollouts no run can continue.
        shutil.rmtree(folder / "run", ignore_errors=True)
        shutil.rmtree(rollouts, ignore_errors=True)
    medium_cfg = dataclasses.replace(ppo_cfg, run_dir=str(folder / "run"), checkpoint_every=update,
                                     save_trajectories=str(rollouts), save_every=replay_every)
    train(medium_cfg, stop_after_updates=update)
    if _latest_step(folder / "run") != update:
        raise UserError(f"{folder / 'run'}: expected a checkpoint at update {update}; delete the folder and re-run")
    return medium_cfg.run_dir, update, str(rollouts)


def _checkpoint_step(run_dir: Path) -> int | None:
    """The newest checkpoint's step of a run folder, None when it has none (or no folder)."""
    from utils.checkpoint import Checkpointer

    if not (run_dir / "checkpoints").is_dir():
        return None
    checkpointer = Checkpointer(run_dir / "checkpoints")
    try:
        return checkpointer.latest_step()
    finally:
        checkpointer.close()


def _latest_step(run_dir: Path) -> int:
    step = _checkpoint_step(run_dir)
    if step is None:
        raise UserError(f"{run_dir}: no checkpoint; train the PPO run first")
    return int(step)


# ----------------------------------------------------------------------------------------------
# Policies: PPO parameters from a checkpoint, or uniform
# ----------------------------------------------------------------------------------------------


def ppo_policy(ppo_cfg, run_dir: str, step: int, seed_index: int, env) -> tuple[Callable, Any]:
    """``(apply(params, obs) -> (logits, value), params)`` of one seed of a PPO checkpoint; only the
    parameters are restored (``Checkpointer.restore_fields``), never env states."""
    import jax

    from online_rl.bonuses import make_bonus
    from online_rl.common import num_updates_for
    from online_rl.ppo import make_network, make_train, split_value
    from utils import training
    from utils.checkpoint import Checkpointer

    if not 0 <= seed_index < ppo_cfg.num_seeds:
        raise UserError(f"--seed-index {seed_index}: the PPO run trained {ppo_cfg.num_seeds} seed(s)")
    bonus = make_bonus(ppo_cfg, env)
    network = make_network(ppo_cfg, env, bonus.value_outputs if bonus else 1)
    algorithm = make_train(ppo_cfg, env, num_updates_for(ppo_cfg), False)
    like = jax.eval_shape(jax.vmap(algorithm.init), training.seed_keys(ppo_cfg.seed, ppo_cfg.num_seeds)).params
    checkpointer = Checkpointer(Path(run_dir) / "checkpoints")
    try:
        restored, _ = checkpointer.restore_fields(step, {"params": like})
    finally:
        checkpointer.close()
    params = jax.tree.map(lambda x: x[seed_index], restored["params"])

    def apply(params, obs):
        logits, value = network.apply(params, obs)
        return logits, split_value(value, bonus is not None)[0]

    return apply, params


def uniform_policy(num_actions: int) -> tuple[Callable, Any]:
    import jax.numpy as jnp

    return (lambda params, obs: (jnp.zeros((obs.shape[0], num_actions)), jnp.zeros(obs.shape[0]))), ()


def measure_return(cfg: TiersConfig, env_name: str, apply: Callable, params: Any) -> dict:
    """Mean return of ``cfg.eval_episodes`` episodes (one per fresh env, sampled actions)."""
    import jax

    from utils.evaluation import Policy, make_evaluate

    policy = Policy(lambda p, obs, state, key: (jax.random.categorical(key, apply(p, obs)[0]), state),
                    lambda n: (), lambda state, done: state)
    evaluate = jax.jit(make_evaluate(env_name, cfg.eval_episodes, policy, max_steps=cfg.eval_max_steps,
                                     reset_ratio=min(cfg.reset_ratio, cfg.eval_episodes)))
    result = jax.device_get(evaluate(params, jax.random.PRNGKey(cfg.seed + 20_000)))
    finished = np.asarray(result["finished"], bool)
    returns = np.asarray(result["return"], np.float64)[finished]
    return {"return": float(returns.mean()) if returns.size else None,
            "return_std": float(returns.std()) if returns.size else None, "episodes": int(finished.sum())}


# ----------------------------------------------------------------------------------------------
# Collecting tiers
# ----------------------------------------------------------------------------------------------


def make_collector(env, apply: Callable, length: int, view: Callable | None = None):
    """``collect(params, obs, state, key) -> (obs, state, key, rollout, last_value)``: one compiled
    rollout of ``length`` steps in the format ``TrajectoryWriter.write_rollout`` takes. With ``view``
    (batched env states -> observations) the policy acts on ``view(state)`` while ``env``'s own
    observations are saved: a symbolic policy collecting pixel data."""
    import jax
    import jax.numpy as jnp

    def policy(params, obs, state):
        return apply(params, obs if view is None else view(state.env_state))

    def step(params, carry, _):
        obs, state, key = carry
        key, action_key, step_key = jax.random.split(key, 3)
        logits, value = policy(params, obs, state)
        action = jax.random.categorical(action_key, logits)
        log_prob = jnp.take_along_axis(jax.nn.log_softmax(logits), action[:, None], axis=1)[:, 0]
        next_obs, state, reward, done, info = env.step(step_key, state, action)
        row = dict(obs=obs, action=action, reward=reward, done=done, log_prob=log_prob, value=value,
                   terminal_obs=info["terminal_obs"])
        return (next_obs, state, key), row

    def collect(params, obs, state, key):
        (obs, state, key), rollout = jax.lax.scan(lambda c, x: step(params, c, x), (obs, state, key), None,
                                                  length=length)
        return obs, state, key, rollout, policy(params, obs, state)[1]

    return jax.jit(collect)


def collect(cfg: TiersConfig, env, apply: Callable, params: Any, writers: list[tuple[Any, int]],
            key_offset: int, label: str, view: Callable | None = None) -> int:
    """Roll the policy out for ``--steps`` transitions; each rollout goes to every ``(writer, first
    update)``. Returns the number of rollouts."""
    import jax

    rollouts = max(1, math.ceil(cfg.steps / (cfg.num_envs * cfg.rollout_length)))
    run = make_collector(env, apply, cfg.rollout_length, view)
    key = jax.random.PRNGKey(cfg.seed + 30_000 + key_offset)
    key, reset_key = jax.random.split(key)
    obs, state = env.reset(reset_key)
    for i in range(rollouts):
        obs, state, key, rollout, last_value = run(params, obs, state, key)
        arrays = {k: np.asarray(v) for k, v in jax.device_get(rollout).items()}
        for writer, first in writers:
            writer.write_rollout(update=first + i, last_value=np.asarray(last_value), **arrays)
        if cfg.progress:
            print(f"\r{label}: rollout {i + 1}/{rollouts}", end="", flush=True)
    if cfg.progress:
        print()
    return rollouts


def data_env_for(cfg: TiersConfig, env) -> tuple[Any, Callable | None]:
    """``(env whose observations the tiers hold, view)``: ``env`` itself, or with ``--pixels`` its pixel twin
    and the view that gives the (symbolic) policies their own observation of each state."""
    if not cfg.pixels:
        return env, None
    import jax

    from utils import envs

    twin = PIXEL_TWINS.get(env.name)
    if twin is None:
        raise UserError(f"--pixels: {env.name} has no pixel twin; the PPO run must be on one of "
                        f"{', '.join(PIXEL_TWINS)}")
    return envs.make(twin, env.num_envs, reset_ratio=env.reset_ratio), jax.vmap(env.base_env.get_obs)


def _writer(folder: Path, env, num_streams: int, metadata: dict):
    from utils.trajectories import TrajectoryWriter

    shutil.rmtree(folder, ignore_errors=True)  # a partial folder of an interrupted build
    return TrajectoryWriter(folder, env_name=env.name, obs_shape=env.obs_shape, obs_dtype=np.dtype(env.obs_dtype),
                            num_streams=num_streams, num_actions=env.num_actions, metadata=metadata)


def _finish(partial: Path) -> Path:
    final = partial.with_name(partial.name.removesuffix(".partial"))
    partial.rename(final)
    return final


# ----------------------------------------------------------------------------------------------
# The command
# ----------------------------------------------------------------------------------------------


def build(cfg: TiersConfig) -> dict[str, Any]:
    """Everything the module docstring lists; returns what ``tiers.json`` records."""
    from offline_rl.data import episode_table
    from offline_rl.subset import subset_dataset
    from utils import envs
    from utils.config import to_dict
    from utils.io import atomic_write_json
    from utils.trajectories import TrajectoryDataset, read_manifest, write_manifest

    if not cfg.out:
        raise UserError("no output folder: pass --out DIR")
    unknown = [t for t in cfg.tiers if t not in TIERS]
    if unknown or not cfg.tiers:
        raise UserError(f"--tiers: unknown {', '.join(unknown) or '(none given)'}; choose from {', '.join(TIERS)}")
    if not 0.0 < cfg.medium_fraction <= 1.0:
        raise UserError(f"--medium-fraction must be in (0, 1], got {cfg.medium_fraction}")
    out = Path(cfg.out)
    out.mkdir(parents=True, exist_ok=True)
    if cfg.replay_every < 1:
        raise UserError(f"--replay-every must be at least 1, got {cfg.replay_every}")
    ppo_cfg = ppo_config(cfg)
    if not cfg.from_run:
        say(cfg, f"PPO: {ppo_cfg.total_steps} env steps -> {ppo_cfg.run_dir}")
        from online_rl.ppo import train

        train(ppo_cfg)  # resumes, or finds the run finished
    run_dir = Path(ppo_cfg.run_dir)
    updates, returns = training_curve(run_dir, cfg.seed_index)
    medium_update, medium_train_return, final_train_return = pick_medium_update(updates, returns, cfg.medium_fraction)
    say(cfg, f"medium: update {medium_update} of {updates[-1]} (training return {medium_train_return:.3g}, "
             f"final {final_train_return:.3g})")
    medium_dir, medium_step, replay_source = medium_checkpoint(ppo_cfg, medium_update, out, cfg.replay_every)
    expert_step = _latest_step(run_dir)

    env = envs.make(ppo_cfg.env, cfg.num_envs, reset_ratio=min(cfg.reset_ratio, cfg.num_envs))
    data_env, view = data_env_for(cfg, env)
    policies = {
        "random": uniform_policy(env.num_actions),
        "medium": ppo_policy(ppo_cfg, medium_dir, medium_step, cfg.seed_index, env),
        "expert": ppo_policy(ppo_cfg, str(run_dir), expert_step, cfg.seed_index, env),
    }
    where = {"random": {}, "medium": {"run_dir": medium_dir, "update": medium_step},
             "expert": {"run_dir": str(run_dir), "update": expert_step}}
    measured = {}
    for name, (apply, params) in policies.items():  # the same episodes (key) for each: common random numbers
        measured[name] = {**where[name], **measure_return(cfg, ppo_cfg.env, apply, params)}
        say(cfg, f"{name} policy: return {measured[name]['return']} over {measured[name]['episodes']} episodes")
    random_return, expert_return = measured["random"]["return"], measured["expert"]["return"]
    if random_return is None or expert_return is None:
        raise UserError("no evaluation episode of the random or expert policy finished; raise --eval-max-steps")

    source = {"ppo_run": str(run_dir), "medium_update": medium_update, "final_update": int(expert_step),
              "medium_fraction": cfg.medium_fraction, "training_return": {"medium": medium_train_return,
                                                                          "final": final_train_return}}
    common = dict(random_return=random_return, expert_return=expert_return, source=source)
    builder = {"builder": to_dict(cfg)}

    def policy_entry(name: str, rows: int) -> dict:
        return {"name": name, **measured[name], "rows": rows}

    written: dict[str, Any] = {}
    rows = max(1, math.ceil(cfg.steps / (cfg.num_envs * cfg.rollout_length))) * cfg.num_envs * cfg.rollout_length
    mixed = "medium-expert" in cfg.tiers and not (out / "medium-expert").exists()
    mixed_writer = None
    if mixed:
        medium_return = measured["medium"]["return"]
        both = (medium_return + expert_return) / 2 if medium_return is not None else None  # equal rows of each
        block = tier_block("medium-expert", data_return=both,
                           policies=[policy_entry("medium", rows), policy_entry("expert", rows)], **common)
        mixed_writer = _writer(out / "medium-expert.partial", data_env, cfg.num_envs, {TIER_KEY: block, **builder})
    rollouts = max(1, math.ceil(cfg.steps / (cfg.num_envs * cfg.rollout_length)))
    for offset, name in enumerate(("random", "medium", "expert")):
        own = name in cfg.tiers and not (out / name).exists()
        into_mixed = mixed and name in ("medium", "expert")
        if not own and not into_mixed:
            continue
        writers = []
        if own:
            block = tier_block(name, data_return=measured[name]["return"], policies=[policy_entry(name, rows)],
                               **common)
            writers.append((_writer(out / f"{name}.partial", data_env, cfg.num_envs, {TIER_KEY: block, **builder}), 0))
        if into_mixed:  # expert after medium, one update apart: a gap in t, so no return chains across
            writers.append((mixed_writer, 0 if name == "medium" else rollouts + 1))
        apply, params = policies[name]
        collect(cfg, data_env, apply, params, writers, offset, name, view)
        if own:
            writers[0][0].close()
            written[name] = str(_finish(out / f"{name}.partial"))
    if mixed_writer is not None:
        mixed_writer.close()
        written["medium-expert"] = str(_finish(out / "medium-expert.partial"))

    if cfg.pixels and "medium-replay" in cfg.tiers:
        say(cfg, "medium-replay: skipped with --pixels (it holds the PPO run's own symbolic rollouts)")
    elif "medium-replay" in cfg.tiers and not (out / "medium-replay").exists():
        source_data = TrajectoryDataset(replay_source)
        count = sum(1 for s in source_data.shards if int(s["update"]) < medium_update)
        if count == 0:
            raise UserError(f"{replay_source} holds no rollout before update {medium_update}")
        partial = out / "medium-replay.partial"
        shutil.rmtree(partial, ignore_errors=True)
        replay = subset_dataset(replay_source, partial, 0, count)
        table = episode_table(replay)
        complete = table.returns[table.complete]
        data_return = float(complete.mean()) if complete.size else None
        manifest = read_manifest(partial)
        policy = {"name": "ppo-training", "update": f"0..{medium_update - 1}", "rows": replay.num_transitions,
                  "return": data_return, "episodes": int(complete.size)}
        manifest["metadata"] = {**manifest.get("metadata", {}), **builder,
                                TIER_KEY: tier_block("medium-replay", data_return=data_return, policies=[policy],
                                                     **common)}
        write_manifest(partial, manifest)
        written["medium-replay"] = str(_finish(partial))

    summary = {"env": data_env.name, "ppo_run": str(run_dir), "returns": measured, "medium_update": medium_update,
               "tiers": {name: str(out / name) for name in cfg.tiers if (out / name).exists()},
               "written_now": sorted(written)}
    atomic_write_json(out / "tiers.json", summary)
    return summary


def write_record(cfg: TiersConfig, summary: dict[str, Any], argv: list[str]) -> Path:
    """The tiers as a ``benchmarks.report`` table, each row from the tier's own manifest (the returns its
    scores are made of), so the page never holds a typed figure."""
    from benchmarks import records
    from utils.tiers import describe, tier_of
    from utils.trajectories import read_manifest

    rows = []
    for name in TIERS:
        if name not in summary["tiers"]:
            continue
        data = describe(tier_of(read_manifest(summary["tiers"][name])))
        data["policies"] = "; ".join(p["name"] + (f" (update {p['update']})" if p["update"] not in (None, "") else "")
                                     for p in data["policies"])
        rows.append({"tier": name, **data})
    path = Path(cfg.record)
    columns = [{"key": "tier", "label": "tier"}, {"key": "rows", "label": "transitions", "digits": 0},
               {"key": "policies", "label": "collected by"},
               {"key": "data_return", "label": "data return", "digits": 2},
               {"key": "random_return", "label": "random return", "digits": 2},
               {"key": "expert_return", "label": "expert return", "digits": 2}]
    return records.write_table(path, name=path.stem, title=f"Tiers of graded quality on {summary['env']}",
                               command="python -m benchmarks.offline_tiers " + shlex.join(argv), columns=columns,
                               rows=rows, description=f"From the PPO run `{summary['ppo_run']}`; medium is the policy "
                               f"at update {summary['medium_update']}. Returns: the mean over {cfg.eval_episodes} "
                               "episodes of each policy (sampled actions); for medium-replay, of its complete "
                               "episodes; for medium-expert, the mean of the two halves.")


def say(cfg: TiersConfig, message: str) -> None:
    if cfg.progress:
        print(message, flush=True)


@exit_on_user_error
def main(argv: list[str] | None = None) -> dict[str, Any]:
    from utils.config import parse_config
    from utils.jax_setup import enable_compilation_cache

    enable_compilation_cache()
    cfg = parse_config(TiersConfig, AREA, NAME, argv)
    summary = build(cfg)
    if cfg.record:
        import sys

        print(f"wrote {write_record(cfg, summary, list(argv) if argv is not None else sys.argv[1:])}")
    for name, folder in summary["tiers"].items():
        print(f"{name}: {folder}")
    returns = summary["returns"]
    print(f"returns: random {returns['random']['return']}, medium {returns['medium']['return']}, "
          f"expert {returns['expert']['return']}; tiers.json: {Path(cfg.out) / 'tiers.json'}")
    return summary


if __name__ == "__main__":
    main()
