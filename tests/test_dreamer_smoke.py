"""Dreamer V1, V2 and V3 end to end on the debug preset: every version on Classic symbolic and pixels,
two seeds, evaluation and reports, resume after a kill, the command line's errors, and every version learning
a contextual bandit (the whole loop, world model to actor, has to work for that).

Compilation dominates (tens of seconds per version and env); on symbolic envs the debug preset
compiles without XLA's backend optimisations to halve it. The pixel runs are marked ``slow``
(deselect with ``-m "not slow"``).
"""

import dataclasses
import json
import subprocess
import sys
from pathlib import Path

import jax
import numpy as np
import pytest

from utils.errors import UserError
from utils.io import read_jsonl
from world_models.dreamer import make_config, train

SYMBOLIC, PIXELS = "Craftax-Classic-Symbolic-v1", "Craftax-Classic-Pixels-v1"


def debug_config(tmp_path, version, env=SYMBOLIC, name="run", **overrides):
    fields = dict(run_dir=str(tmp_path / name), progress=False, env=env, eval_envs=0)
    return make_config(version, ["debug"], **{**fields, **overrides})


def check_run(run, rows, seeds):
    run = Path(run)
    assert [r["step"] for r in rows] == [64, 128, 192, 256]
    for row in rows:  # the prefill (16 steps per env) ends in the first chunk's last update
        for key in ("loss/model", "loss/recon", "loss/reward", "loss/cont", "loss/kl", "loss/actor",
                    "loss/critic", "loss/actor_entropy", "loss/reward_error", "loss/post_entropy"):
            assert len(row[key]) == seeds and all(np.isfinite(v) for v in row[key]), key
    assert rows[-1]["perf/grad_steps"][0] == 2 * (16 - 3), "2 gradient steps in each update from the 4th"
    assert "episode/return" in rows[-1] and "achievements/collect_wood" in rows[-1]
    assert rows[-1]["eval/openloop_reward_mae"] is not None
    summary = json.loads((run / "summary.json").read_text())
    assert summary["complete"] and summary["env_steps_per_seed"] == 256 and summary["num_seeds"] == seeds
    assert (run / "learning_curve.png").stat().st_size > 1000
    assert (run / "imagined_rewards.png").stat().st_size > 1000
    assert (run / "config.yaml").exists() and any((run / "checkpoints").iterdir())


@pytest.mark.parametrize("version", [1, 2])
def test_debug_run_on_classic_symbolic(tmp_path, version):
    train(debug_config(tmp_path, version))
    check_run(tmp_path / "run", read_jsonl(tmp_path / "run" / "metrics.jsonl"), seeds=1)


@pytest.mark.parametrize("env,preset", [("Tetris-Placement-LinesOnly-v0", "tetris_placement"),
                                        ("Tetris-Direct-Standard-v0", "tetris_direct")])
def test_debug_run_on_tetris_with_its_action_mode_preset(tmp_path, env, preset):
    """The world-model agent on Tetris (docs/tetris.md): the action mode's preset on top of debug, with
    imagination from a subset of the replayed states, evaluated in whole games."""
    cfg = make_config(3, ["debug", preset], run_dir=str(tmp_path / "run"), progress=False, env=env,
                      eval_envs=2, eval_max_steps=64, imag_starts=8, batch_length=8)
    assert cfg.actor_lr == 1e-4 and cfg.imag_horizon == (30 if preset == "tetris_direct" else 4)
    train(cfg)
    rows = read_jsonl(tmp_path / "run" / "metrics.jsonl")
    assert np.isfinite(rows[-1]["loss/actor"][0]) and np.isfinite(rows[-1]["loss/critic"][0])
    assert "episode/lines" in rows[-1] and "achievements/clear_1_line" in rows[-1]
    summary = json.loads((tmp_path / "run" / "summary.json").read_text())
    assert summary["complete"] and {"eval/lines", "eval/pieces"} <= set(summary["eval"])  # None if no game ended


@pytest.fixture(scope="module")
def v3_two_seeds(tmp_path_factory):
    """V3 on Classic symbolic with two seeds and evaluation, uninterrupted (shared by two tests)."""
    tmp_path = tmp_path_factory.mktemp("v3")
    cfg = debug_config(tmp_path, 3, name="full", num_seeds=2, eval_envs=2)
    return cfg, train(cfg)


def test_debug_run_v3_two_seeds_with_evaluation(v3_two_seeds):
    cfg, result = v3_two_seeds
    rows = read_jsonl(f"{cfg.run_dir}/metrics.jsonl")
    check_run(result["run_dir"], rows, seeds=2)
    assert len(rows[-1]["eval/finished_fraction"]) == 2 and "eval/achievements/collect_wood" in rows[-1]
    first = jax.tree.leaves(result["carry"].agent.params["wm"]["encoder"])[0]
    assert first.shape[0] == 2 and not np.array_equal(np.asarray(first[0]), np.asarray(first[1])), \
        "two seeds, two different models"
    assert str(result["run_dir"]) == cfg.run_dir


def test_killed_run_resumes_to_the_same_state_and_metrics(tmp_path, v3_two_seeds):
    full_cfg, uninterrupted = v3_two_seeds
    killed_cfg = dataclasses.replace(full_cfg, run_dir=str(tmp_path / "killed"))
    partial = train(killed_cfg, stop_after_updates=8)
    assert not partial["summary"]["complete"] and partial["summary"]["updates"] == 8
    resumed = train(killed_cfg)
    assert resumed["summary"]["complete"]
    for a, b in zip(jax.tree.leaves(uninterrupted["carry"]), jax.tree.leaves(resumed["carry"])):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
    strip = lambda rows: [{k: v for k, v in r.items() if not k.startswith("perf/") or k == "perf/grad_steps"}
                          for r in rows]
    assert strip(read_jsonl(f"{full_cfg.run_dir}/metrics.jsonl")) == strip(read_jsonl(tmp_path / "killed" / "metrics.jsonl"))


def test_finished_run_extends_to_a_larger_budget_as_if_given_it_from_the_start(tmp_path, v3_two_seeds):
    """Re-running a finished run with a larger --total-steps continues it (Dreamer has no schedule over
    the run's length); a changed learning rate is still refused."""
    full_cfg, uninterrupted = v3_two_seeds
    short_cfg = dataclasses.replace(full_cfg, run_dir=str(tmp_path / "short"), total_steps=full_cfg.total_steps // 2)
    assert train(short_cfg)["summary"]["complete"]
    extended = train(dataclasses.replace(short_cfg, total_steps=full_cfg.total_steps))
    assert extended["summary"]["complete"] and extended["summary"]["env_steps_per_seed"] == full_cfg.total_steps
    for a, b in zip(jax.tree.leaves(uninterrupted["carry"]), jax.tree.leaves(extended["carry"])):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
    assert [r["step"] for r in read_jsonl(tmp_path / "short" / "metrics.jsonl")] == [64, 128, 192, 256]
    with pytest.raises(UserError, match=r"model_lr"):
        train(dataclasses.replace(short_cfg, total_steps=2 * full_cfg.total_steps, model_lr=1.0))


def test_debug_run_with_replay_context_resumes_with_its_stored_latents(tmp_path):
    """With --replay-context the stored latents are part of the replay and so of the checkpoint: a killed
    run resumes to exactly the state of an uninterrupted one, latents included."""
    cfg = make_config(3, ["debug", "replay_context"], run_dir=str(tmp_path / "full"), progress=False, env=SYMBOLIC,
                      eval_envs=0)
    assert cfg.replay_context
    full = train(cfg)
    check_run(full["run_dir"], read_jsonl(tmp_path / "full" / "metrics.jsonl"), seeds=1)
    rows = read_jsonl(tmp_path / "full" / "metrics.jsonl")
    assert all(np.isfinite(v) for v in rows[-1]["diag/actor_entropy"] + rows[-1]["diag/adv_abs_mean"])
    replay = full["carry"].replay
    count = int(replay.count[0])
    deter = np.asarray(replay.data["deter"])[0, :, :count]
    assert deter.dtype == np.float16 and np.all(np.abs(deter) <= 1.0) and np.any(deter != 0)
    assert np.asarray(replay.data["stoch"]).dtype == np.uint8
    killed_cfg = dataclasses.replace(cfg, run_dir=str(tmp_path / "killed"))
    assert not train(killed_cfg, stop_after_updates=8)["summary"]["complete"]
    resumed = train(killed_cfg)
    assert resumed["summary"]["complete"]
    for a, b in zip(jax.tree.leaves(full["carry"]), jax.tree.leaves(resumed["carry"])):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))


def test_achievement_events_split_first_unlocks_from_repeats_on_classic():
    """The diagnostics' achievement events: a step's first unlocks are exactly the flags VecEnv's own
    step newly sets (the same per-env keys), and repeats -- deeds whose flag was already set -- occur."""
    import jax.numpy as jnp

    from utils import envs
    from world_models.dreamer import achievement_events

    env = envs.make(SYMBOLIC, 16, reset_ratio=8)

    def step(state, key):
        action_key, step_key = jax.random.split(key)
        action = jax.random.randint(action_key, (16,), 0, env.num_actions)
        _, new_state, _, _, info = env.step(step_key, state, action)
        unlock, first = achievement_events(env, step_key, state, action)
        newly = info["achievements"].astype(bool) & ~state.env_state.achievements
        return new_state, (unlock, first, newly)

    state = env.reset(jax.random.PRNGKey(0))[1]
    _, (unlock, first, newly) = jax.jit(lambda s, k: jax.lax.scan(step, s, jax.random.split(k, 200)))(
        state, jax.random.PRNGKey(1))
    unlock, first, newly = np.asarray(unlock), np.asarray(first), np.asarray(newly)
    np.testing.assert_array_equal(first, newly.any(-1))
    np.testing.assert_array_equal(unlock[first], newly.argmax(-1)[first])
    repeats = (unlock >= 0) & ~first
    assert first.sum() > 10 and repeats.sum() > 10, (first.sum(), repeats.sum())
    assert unlock.dtype == np.int8 and jnp.all(unlock >= -1)


@pytest.mark.slow
@pytest.mark.parametrize("version", [1, 2, 3])
def test_debug_run_on_classic_pixels_writes_the_openloop_gif(tmp_path, version):
    result = train(debug_config(tmp_path, version, env=PIXELS))
    run = tmp_path / "run"
    check_run(run, read_jsonl(run / "metrics.jsonl"), seeds=1)
    import imageio.v2 as imageio

    frames = imageio.mimread(run / "openloop.gif")
    assert len(frames) == 8, "4 observed + 4 predicted steps"
    assert frames[0].shape[:2] == (3 + 3 * 63, 2 * 63 + 2), "bar, real, predicted, error; two sequences"
    names = {jax.tree_util.keystr(p) for p, _ in jax.tree_util.tree_leaves_with_path(result["carry"].agent.params)}
    assert any("ConvTranspose" in n for n in names) and any("Conv_" in n for n in names)


def run_cli(*args):
    return subprocess.run([sys.executable, "-m", "world_models.dreamer", *args], capture_output=True, text=True,
                          timeout=300)


def test_cli_errors_are_one_clear_line(tmp_path):
    bad_env = run_cli("--preset", "debug", "--env", "Craftax-Nope", "--run-dir", str(tmp_path / "a"))
    assert bad_env.returncode == 2 and len(bad_env.stderr.strip().splitlines()) == 1
    assert bad_env.stderr.startswith("error: ") and "unknown env 'Craftax-Nope'; valid names:" in bad_env.stderr
    bad_ratio = run_cli("--preset", "debug", "--train-ratio", "3", "--run-dir", str(tmp_path / "b"))
    assert bad_ratio.returncode == 2 and "whole number" in bad_ratio.stderr
    bad_version = run_cli("--version", "5")
    assert bad_version.returncode == 2 and "--version must be one of 1, 2, 3" in bad_version.stderr


# ---------------------------------------------------------------------------------------------------
# Learning: the whole loop (collect, world model, imagination, actor) solves a task a model must learn
# ---------------------------------------------------------------------------------------------------


#: Chunks of 100 updates (4 gradient steps each once 32 steps per env are stored) each version may take,
#: at its paper's learning rates. V1 and V2 solve the task in ~2,000 gradient steps; V3's rates (1e-4 world
#: model, 3e-5 actor and critic) are made for long training: its reward head predicts the average reward
#: until ~8,500 gradient steps, then learns the task within ~1,000 more (docs/world_models.md, "Small
#: gradient budgets"). A run stops as soon as it has solved the task.
BANDIT_CHUNKS = {1: 5, 2: 5, 3: 32}


@pytest.mark.parametrize("version", [1, 2, 3])
def test_every_version_learns_a_contextual_bandit_through_its_world_model(version):
    from benchmarks.dreamer_bandit import bandit_run, chunk_summary

    _, carry, chunk = bandit_run(version)
    for chunks in range(1, BANDIT_CHUNKS[version] + 1):
        carry, (stats, metrics) = chunk(carry)
        summary = chunk_summary(stats, metrics)
        returns, entropy = summary["return"], summary["entropy"]
        if chunks >= 5 and returns > 4.5 and entropy < 0.9:
            break
    assert int(carry.agent.grad_steps[0]) == 4 * (100 * chunks - 15)  # from the update that stores 32 steps per env
    grad_steps = int(carry.agent.grad_steps[0])
    assert returns > 4.5, (f"return over the last 100 updates {returns:.2f} after {grad_steps} gradient steps "
                           f"(best 8, chance 2.67); reward head {summary['reward_pred_pos']:.2f} on rewarded, "
                           f"{summary['reward_pred_zero']:.2f} on unrewarded steps")
    assert entropy < 0.9  # ln 3 = 1.10 at chance


def test_bandit_benchmark_prints_a_row_per_chunk(capsys):
    from benchmarks.dreamer_bandit import main

    # V1's own actor rate through --set: the program of the bandit test above, from the compilation cache
    main(["--version", "1", "--chunks", "2", "--set", "actor_lr=8e-5"])
    rows = [line for line in capsys.readouterr().out.splitlines() if line.startswith("| ") and line[2].isdigit()]
    assert [row.split(" | ")[0] for row in rows] == ["| 340", "| 740"], "gradient steps after each chunk"
    with pytest.raises(SystemExit):
        main(["--set", "deter"])


@pytest.mark.slow
def test_early_train_ratio_trains_more_per_update_until_its_switch_and_resumes_on_schedule(tmp_path):
    """``--early-train-ratio 8 --early-steps 128`` at the debug preset (16 env steps per update, train
    ratio 4: 2 gradient steps per update): 4 per update for the first 8 updates, 2 after; a run killed
    at the switch and resumed keeps the schedule."""
    cfg = debug_config(tmp_path, 3, early_train_ratio=8.0, early_steps=128)
    rows = read_jsonl(Path(train(cfg)["run_dir"]) / "metrics.jsonl")
    # Training starts in the 4th update (prefill): 5 early updates x 4, then 8 late updates x 2.
    assert [r["perf/grad_steps"][0] for r in rows] == [4, 20, 28, 36]
    killed = debug_config(tmp_path, 3, name="killed", early_train_ratio=8.0, early_steps=128)
    train(killed, stop_after_updates=8)
    resumed = read_jsonl(Path(train(killed)["run_dir"]) / "metrics.jsonl")
    assert [r["perf/grad_steps"][0] for r in resumed] == [4, 20, 28, 36]
    with pytest.raises(UserError, match="multiple of num_envs x collect_steps = 16"):
        train(debug_config(tmp_path, 3, name="bad", early_train_ratio=8.0, early_steps=100))
