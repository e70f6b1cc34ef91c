"""The tools: headless play and recording, rendering agents/datasets/text, dataset stats, plots."""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from tools import keymaps
from tools.frames import classic_map_picture, obs_picture, text_image, write_video
from tools.play import STEP_KEYS, PlayConfig, play
from tools.session import GameSession
from utils.errors import UserError
from utils.trajectories import TrajectoryDataset, TrajectoryWriter, save_npz_atomic, write_manifest

CLASSIC = "Craftax-Classic-Symbolic-v1"
TETRIS = "Tetris-Direct-Standard-v0"


def read_png(path: Path) -> np.ndarray:
    return np.asarray(Image.open(path).convert("RGB"))


def read_steps(directory: Path) -> list[dict]:
    return [json.loads(line) for line in (directory / "steps.jsonl").read_text().splitlines()]


@pytest.fixture
def headless(monkeypatch):
    monkeypatch.setenv("SDL_VIDEODRIVER", "dummy")


# ----------------------------------------------------------------------------------------------
# Key maps
# ----------------------------------------------------------------------------------------------


@pytest.mark.parametrize("env_name", [CLASSIC, "Craftax-Symbolic-v1", TETRIS])
def test_every_action_has_exactly_one_key(env_name):
    keymap = keymaps.keymap_for(env_name)
    assert sorted(keymap.keys.values()) == sorted(keymap.action_names)
    assert keymaps.REASON_KEY not in keymap.keys and keymaps.QUIT_KEY not in keymap.keys


def test_placement_keys_move_a_target_and_place_it():
    keys = keymaps.KeyInterpreter(keymaps.keymap_for("Tetris-Placement-Standard-v0"))
    assert [keys.action_for(k) for k in ("right", "right", "up", "z", "z")] == [None] * 5
    assert keys.target == (3, 6), "two rotations back wrap round to 3; columns 4 -> 6"
    assert keys.action_for("space") == 3 * 10 + 6
    for _ in range(12):
        keys.action_for("right")
    assert keys.action_for("space") == 3 * 10 + 9, "the column stops at the right wall"
    assert keys.action_for("c") == 40 and keys.action_for("x") is None


# ----------------------------------------------------------------------------------------------
# Play
# ----------------------------------------------------------------------------------------------


def test_scripted_classic_session_records_steps_frames_and_text(tmp_path, headless):
    record = tmp_path / "session"
    result = play(PlayConfig(env=CLASSIC, seed=3, record=str(record),
                             script="w,space,say:the tree is up,space,x,t,escape,space"))
    assert result["steps"] == 4, "x means nothing here and escape quits before the last space"
    steps = read_steps(record)
    assert [tuple(s) for s in steps] == [STEP_KEYS] * 4
    assert [s["action_name"] for s in steps] == ["UP", "DO", "DO", "PLACE_TABLE"]
    assert [s["action"] for s in steps] == [3, 5, 5, 8]
    assert [s["reasoning"] for s in steps] == [None, None, "the tree is up", None]
    assert [s["step"] for s in steps] == [0, 1, 2, 3]

    fresh = GameSession(CLASSIC, seed=3)
    assert steps[0]["text_before"] == fresh.text() and steps[0]["text_before"].startswith("Craftax-Classic")
    for before, after in zip(steps, steps[1:]):
        assert after["text_before"] == before["text_after"]
    for s in steps:
        outcome = fresh.step(s["action"])
        assert (s["reward"], s["done"], s["achievements"], s["text_after"]) == (
            outcome.reward, outcome.done, outcome.unlocked, outcome.text_after)

    frames = sorted((record / "frames").iterdir())
    assert [f.name for f in frames] == [f"{i:06d}.png" for i in range(5)]
    np.testing.assert_array_equal(read_png(frames[0]), GameSession(CLASSIC, seed=3).frame())
    np.testing.assert_array_equal(read_png(frames[-1]), fresh.frame())
    session = json.loads((record / "session.json").read_text())
    assert session["env"] == CLASSIC and session["seed"] == 3 and session["started"]
    assert session["keymap"]["keys"]["space"] == "DO" and session["steps"] == 4

    with pytest.raises(UserError, match="already holds a recording"):
        play(PlayConfig(env=CLASSIC, record=str(record), script="w"))


def test_scripted_tetris_session_records_without_text_and_stops_at_max_steps(tmp_path, headless):
    record = tmp_path / "tetris"
    result = play(PlayConfig(env=TETRIS, record=str(record), script="left,space,c,q", max_steps=3))
    steps = read_steps(record)
    assert result["steps"] == 3 and len(steps) == 3
    assert [s["action_name"] for s in steps] == ["LEFT", "HARD_DROP", "HOLD"]
    assert all(s["text_before"] is None and s["text_after"] is None for s in steps)
    assert steps[1]["reward"] != 0.0, "a hard drop locks a piece, which the standard reward pays for"
    assert len(list((record / "frames").iterdir())) == 4
    assert read_png(record / "frames" / "000000.png").shape == (160, 120, 3)


def test_reason_flag_asks_before_each_action(tmp_path, headless):
    answers = iter(["go up", ""])
    play(PlayConfig(env=CLASSIC, record=str(tmp_path / "r"), script="w,s", reason=True),
         ask_reason=lambda prompt: next(answers))
    assert [s["reasoning"] for s in read_steps(tmp_path / "r")] == ["go up", None]


def test_unknown_script_key_is_a_user_error(headless):
    with pytest.raises(UserError, match="unknown key name 'jump'"):
        play(PlayConfig(env=CLASSIC, script="w,jump"))


def test_placement_target_outline_is_where_the_piece_lands():
    from tools.play import with_placement_target
    from utils.envs.tetris_render import CELL_PX

    env_name = "Tetris-Placement-Standard-v0"
    session = GameSession(env_name, seed=0)
    keys = keymaps.KeyInterpreter(keymaps.keymap_for(env_name))
    for key in ("up", "right", "right", "right"):
        keys.action_for(key)
    shown = with_placement_target(session.frame(), int(session.state.piece), keys.target)
    corners = shown[:20 * CELL_PX:CELL_PX, :10 * CELL_PX:CELL_PX]  # each cell's top-left pixel
    outlined = {(r, c) for r, c in zip(*np.nonzero((corners == 255).all(-1)))}
    session.step(keys.action_for("space"))
    locked = {(r, c) for r, c in zip(*np.nonzero(np.asarray(session.obs)[:200].reshape(20, 10) > 0.5))}
    assert len(outlined) == len(locked) == 4
    drop = min(r for r, _ in locked) - min(r for r, _ in outlined)
    assert {(r + drop, c) for r, c in outlined} == locked


# ----------------------------------------------------------------------------------------------
# Pictures of observations
# ----------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def classic_walk():
    """Observations and frames of 40 random moves on Classic (a cow comes into view)."""
    session = GameSession(CLASSIC, seed=0)
    rng = np.random.default_rng(0)
    obs, frames = [], []
    for _ in range(40):
        obs.append(np.asarray(session.obs))
        frames.append(session.frame())
        session.step(int(rng.integers(1, 5)))
    return np.stack(obs), frames


def test_classic_symbolic_picture_matches_the_game_renderer(classic_walk):
    obs, frames = classic_walk
    grid = obs[:, :63 * 21].reshape(len(obs), 7, 9, 21)
    assert grid[..., 17:].any(), "some step shows a mob, so mob drawing is compared too"
    for o, frame in zip(obs, frames):
        np.testing.assert_array_equal(classic_map_picture(o), frame[:112])


def test_tetris_picture_shows_the_board_and_the_falling_piece():
    obs = np.zeros(423, np.float32)
    obs[19 * 10 + 0] = 1.0  # a locked cell bottom-left
    obs[200 + 0 * 10 + 4] = 1.0  # a falling cell at the top
    picture = obs_picture(obs, TETRIS)
    assert picture.shape == (160, 80, 3)
    centre = lambda r, c: tuple(picture[r * 8 + 4, c * 8 + 4])
    assert centre(19, 0) == (150, 150, 160) and centre(0, 4) == (240, 150, 40) and centre(5, 5) == (16, 16, 16)


# ----------------------------------------------------------------------------------------------
# Datasets: a small one with known episodes, and its labelled copy
# ----------------------------------------------------------------------------------------------

STREAMS, LENGTH, SHARD_STEPS = 2, 12, 6
DONES = {0: (4, 9), 1: (6,)}  # stream -> steps where an episode ends


@pytest.fixture(scope="module")
def dataset(classic_walk, tmp_path_factory) -> dict:
    """Two streams of real Classic observations; episodes [0-4], [5-9] complete, [10-11] partial
    in stream 0, [0-6] complete and [7-11] partial in stream 1; the middle ones cross a shard edge."""
    obs_walk, _ = classic_walk
    rng = np.random.default_rng(1)
    obs = np.stack([obs_walk[s * LENGTH:(s + 1) * LENGTH] for s in range(STREAMS)])
    action = rng.integers(0, 17, (STREAMS, LENGTH))
    reward = rng.normal(size=(STREAMS, LENGTH)).astype(np.float32)
    done = np.zeros((STREAMS, LENGTH), bool)
    for stream, steps in DONES.items():
        done[stream, list(steps)] = True
    directory = tmp_path_factory.mktemp("data") / "classic"
    with TrajectoryWriter(directory, env_name=CLASSIC, obs_shape=obs.shape[2:], obs_dtype=obs.dtype,
                          num_streams=STREAMS, num_actions=17) as writer:
        for update, start in enumerate(range(0, LENGTH, SHARD_STEPS)):
            t_major = lambda x: np.swapaxes(x[:, start:start + SHARD_STEPS], 0, 1)
            writer.write_rollout(update=update, obs=t_major(obs), action=t_major(action), reward=t_major(reward),
                                 done=t_major(done), log_prob=t_major(reward) * 0, value=t_major(reward) * 0,
                                 terminal_obs=t_major(obs), last_value=np.zeros(STREAMS, np.float32))
    return {"path": directory, "obs": obs, "action": action, "reward": reward, "done": done}


def labelled_copy(source: Path, target: Path, dim: int = 5) -> np.ndarray:
    """A labelled dataset as labelling writes one: hidden_state (float16) and text_obs per row."""
    import shutil

    shutil.copytree(source, target)
    data = TrajectoryDataset(target)
    rng = np.random.default_rng(2)
    states = []
    for i in range(data.num_shards):
        raw = data.load_shard_raw(i)
        rows = data.shards[i]["rows"]
        hidden = (rng.normal(size=(rows, dim)) * np.arange(1, dim + 1) + 3).astype(np.float16)
        states.append(hidden)
        save_npz_atomic(data.shard_path(i), {**raw, "hidden_state": hidden,
                                             "text_obs": np.asarray([f"row {r}" for r in range(rows)])})
    manifest = dict(data.manifest, labels={"model": "fake", "layer": -1, "pooling": "mean",
                                           "hidden_size": dim, "dtype": "float16"})
    write_manifest(target, manifest)
    return np.concatenate(states)


def test_dataset_stats_match_a_direct_computation(dataset, tmp_path):
    from tools.stats import dataset_stats
    from tools.stats import main as stats_main

    returns, lengths = [], []
    for stream in range(STREAMS):
        start = 0
        for end in DONES[stream]:
            returns.append(float(dataset["reward"][stream, start:end + 1].astype(np.float64).sum()))
            lengths.append(end + 1 - start)
            start = end + 1
    stats = dataset_stats(dataset["path"])
    assert stats["episodes"] == {"complete": 3, "partial": 2}
    assert stats["transitions"] == STREAMS * LENGTH and stats["shards"] == 2
    for key, values in (("return", returns), ("length", lengths)):
        expected = {"count": 3, "mean": np.mean(values), "std": np.std(values), "min": min(values), "max": max(values)}
        assert stats[key] == pytest.approx(expected, rel=1e-6)
    counts = np.bincount(dataset["action"].ravel(), minlength=17)
    assert {k: v["count"] for k, v in stats["actions"].items()} == dict(zip(keymaps.action_names(CLASSIC), counts))
    assert stats["actions"]["DO"]["percent"] == pytest.approx(100 * counts[5] / counts.sum())
    assert stats["achievements"] is None

    states = labelled_copy(dataset["path"], tmp_path / "labelled").astype(np.float64)
    out = tmp_path / "stats.json"
    labelled = stats_main([str(tmp_path / "labelled"), "--json", str(out)])
    hidden = labelled["hidden_state"]
    assert labelled["kind"] == "labelled dataset" and hidden["dim"] == 5 and hidden["rows"] == STREAMS * LENGTH
    assert hidden["mean_over_dims"]["mean"] == pytest.approx(states.mean(0).mean())
    assert hidden["std_over_dims"]["max"] == pytest.approx(states.std(0).max())
    assert hidden["row_norm"]["mean"] == pytest.approx(np.linalg.norm(states, axis=1).mean())
    assert labelled["labels"]["model"] == "fake"
    assert json.loads(out.read_text())["return"] == pytest.approx(stats["return"])


def test_recording_stats_count_episodes_and_achievements(tmp_path):
    from tools.stats import recording_stats

    rows = [  # two finished episodes, then one unfinished
        ("DO", 1.0, False, ["collect_wood"]), ("UP", 0.0, True, []),
        ("DO", 2.0, False, ["collect_wood", "place_table"]), ("DO", 0.5, True, []),
        ("UP", 0.0, False, ["collect_sapling"]),
    ]
    (tmp_path / "steps.jsonl").write_text("".join(json.dumps(dict(
        step=i, action=0, action_name=a, reasoning=None, text_before=None, text_after=None, reward=r, done=d,
        achievements=ach)) + "\n" for i, (a, r, d, ach) in enumerate(rows)))
    stats = recording_stats(tmp_path)
    assert stats["episodes"] == {"complete": 2, "partial": 1}
    assert stats["return"]["mean"] == pytest.approx(1.75) and stats["length"]["max"] == 2
    assert stats["achievements"]["collect_wood"] == {"episodes": 2, "percent": pytest.approx(200 / 3)}
    assert stats["actions"]["DO"]["count"] == 3


# ----------------------------------------------------------------------------------------------
# Render
# ----------------------------------------------------------------------------------------------


def test_render_dataset_follows_one_stream_across_shards(dataset, tmp_path):
    import imageio.v2 as imageio

    from tools.render import RenderConfig, dataset_frames, run

    frames = dataset_frames(dataset["path"], stream=1, episode=1)
    assert len(frames) == LENGTH - 7, "stream 1's second episode runs from t 7 to the end"
    picture = classic_map_picture(dataset["obs"][1, 7])
    scale = frames[0].shape[1] // picture.shape[1]
    np.testing.assert_array_equal(frames[0][:112 * scale:scale, ::scale], picture)

    result = run(RenderConfig(out=str(tmp_path / "stream0.gif"), dataset=str(dataset["path"]), max_steps=8))
    assert result["frames"] == 8 and len(imageio.mimread(tmp_path / "stream0.gif")) == 8
    with pytest.raises(UserError, match="past its end"):
        dataset_frames(dataset["path"], stream=1, episode=2)


def test_render_text_observation_to_png(tmp_path):
    from tools.render import main as render_main

    text = GameSession(CLASSIC, seed=0).text()
    (tmp_path / "obs.txt").write_text(text)
    render_main(["--text", str(tmp_path / "obs.txt"), "--out", str(tmp_path / "obs.png")])
    image = read_png(tmp_path / "obs.png")
    np.testing.assert_array_equal(image, text_image(text))
    lines = len(text_image("a\nb\nc")) - len(text_image("a\nb"))
    assert image.shape[0] >= lines * len(text.splitlines()), "one image row of text per line at least"


def test_render_online_checkpoint_to_gif(tmp_path):
    import imageio.v2 as imageio
    import jax

    from online_rl.ppo import PPOConfig, train
    from tools.agents import identify, ppo_family_pieces, restore_policy_params
    from tools.render import RenderConfig, run
    from utils.config import apply_presets, load_presets

    cfg = apply_presets(PPOConfig(), ["debug"], load_presets("online_rl", "ppo"), "debug")
    cfg = dataclasses.replace(cfg, run_dir=str(tmp_path / "run"), progress=False, total_steps=128, eval_every=0,
                              num_seeds=2)
    trained = train(cfg)["carry"].params
    assert identify(tmp_path / "run") == ("online_rl", "ppo")
    _, _, params, step = restore_policy_params(tmp_path / "run", PPOConfig, ppo_family_pieces("online_rl.ppo"), 1)
    assert step == 1
    for restored, saved in zip(jax.tree.leaves(params), jax.tree.leaves(trained)):
        np.testing.assert_array_equal(np.asarray(restored), np.asarray(saved[1]))

    result = run(RenderConfig(out=str(tmp_path / "ppo.gif"), run=str(tmp_path / "run"), max_steps=12,
                              seed_index=1, progress=False))
    episode = result["episodes"][0]
    assert episode["length"] == 12 and not episode["finished"], "no Classic episode ends in 12 steps"
    frames = imageio.mimread(tmp_path / "ppo.gif")
    assert len(frames) == result["frames"] == 13, "the first state and one frame per step"
    with pytest.raises(UserError, match="no agent loader for online_rl/nope"):
        run(RenderConfig(out=str(tmp_path / "x.gif"), run=str(tmp_path / "run"), algo="online_rl/nope"))
    with pytest.raises(UserError, match="trained 2 seed"):
        run(RenderConfig(out=str(tmp_path / "x.gif"), run=str(tmp_path / "run"), seed_index=2))


def entry_point_run_names() -> tuple[set[str], set[str]]:
    """``area/algo`` folder names that training entry points file runs under, computed with the
    entry points' own naming (``algo_name``, ``ALGO``): (those of the entry points listed here, those
    of every module of an algorithm area that has ``ALGO`` and ``main``, found by walking the areas)."""
    import importlib
    import pkgutil

    import offline_rl
    import online_rl
    import online_rl_llm
    import world_models
    from offline_rl import awr, bc, iql
    from offline_rl.trainer import AREA as OFFLINE
    from online_rl import ppo, ppo_rnd, ppo_rnn
    from online_rl.bonuses import BONUSES
    from online_rl_llm import ppo_llm
    from world_models import dreamer

    listed = {f"{ppo.AREA}/{ppo.algo_name(dataclasses.replace(ppo.PPOConfig(), bonus=b))}" for b in BONUSES}
    listed |= {f"{ppo_rnd.AREA}/{ppo.algo_name(ppo_rnd.PPORNDConfig())}", f"{ppo_rnn.AREA}/{ppo_rnn.ALGO}"}
    listed |= {f"{dreamer.AREA}/{dreamer.algo_name(dreamer.DreamerConfig(version=v))}" for v in dreamer.VERSIONS}
    listed |= {f"{OFFLINE}/{awr.ALGO}", f"{OFFLINE}/{bc.ALGO}", f"{OFFLINE}/{iql.ALGO}", f"{ppo_llm.AREA}/{ppo_llm.ALGO}"}
    found = set(listed)
    for package in (online_rl, online_rl_llm, world_models, offline_rl):
        for info in pkgutil.iter_modules(package.__path__):
            module = importlib.import_module(f"{package.__name__}.{info.name}")
            if hasattr(module, "ALGO") and hasattr(module, "main"):
                found.add(f"{package.__name__}/{module.ALGO}")
    return listed, found


def test_render_loaders_are_registered_for_the_run_names_entry_points_write():
    """A loader once existed for ``ppo_icm_e3b``, which no ``--bonus`` writes, and none for ``ppo_llm``:
    every registered name is one some entry point files runs under, and each listed entry point's
    runs have a loader. (``online_rl_llm/llm_play`` runs are an LLM playing, not a trained policy.)"""
    from tools.agents import registered

    listed, found = entry_point_run_names()
    assert set(registered()) <= found, f"loaders for names no entry point writes: {set(registered()) - found}"
    assert listed <= set(registered()), f"runs no loader can render: {listed - set(registered())}"


@pytest.mark.slow  # a minute: one ppo_llm update with the tiny LLM, then an episode through the loader
def test_render_ppo_llm_run_with_live_features(tmp_path, tiny_llm_path, monkeypatch):
    import imageio.v2 as imageio
    import jax

    import utils.llm
    from online_rl_llm.ppo_llm import PPOLLMConfig, make_train, train
    from tools.agents import identify, restore_seed_fields
    from tools.render import RenderConfig, run
    from utils import envs
    from utils.config import apply_presets, load_presets

    cfg = apply_presets(PPOLLMConfig(), ["debug"], load_presets("online_rl_llm", "ppo_llm"), "debug")
    cfg = dataclasses.replace(cfg, run_dir=str(tmp_path / "run"), progress=False, total_steps=128,
                              llm_model=tiny_llm_path, llm_device="cpu")
    trained = train(cfg)["carry"]
    assert identify(tmp_path / "run") == ("online_rl_llm", "ppo_llm")

    texts_sent, make_backend = [], utils.llm.make_backend

    def counting_backend(spec):  # the LLM the loader opens, counting what it is asked
        backend = make_backend(spec)
        hidden_states = backend.hidden_states
        backend.hidden_states = lambda texts: texts_sent.append(list(texts)) or hidden_states(texts)
        return backend

    monkeypatch.setattr(utils.llm, "make_backend", counting_backend)
    result = run(RenderConfig(out=str(tmp_path / "llm.gif"), run=str(tmp_path / "run"), max_steps=9,
                              progress=False))
    assert result["episodes"][0]["length"] == 9
    assert len(imageio.mimread(tmp_path / "llm.gif")) == result["frames"] == 10
    assert [len(t) for t in texts_sent] == [1, 1, 1], "one text at steps 0, 4 and 8 (skip_n 4), as in evaluation"

    algorithm = make_train(cfg, envs.make(cfg.env, cfg.num_envs, reset_ratio=cfg.reset_ratio), 1, 32)
    (params, norm), _ = restore_seed_fields(tmp_path / "run", cfg, algorithm.init, [("params",), ("features", "norm")])
    for restored, saved in zip(jax.tree.leaves((params, norm)), jax.tree.leaves((trained.params, trained.features.norm))):
        np.testing.assert_array_equal(np.asarray(restored), np.asarray(saved[0]))

    features = tmp_path / "run" / "features.json"
    features.write_text(json.dumps({**json.loads(features.read_text()), "layer": 0}))
    with pytest.raises(UserError, match="other LLM features"):  # a vector the policy never saw: refused
        run(RenderConfig(out=str(tmp_path / "x.gif"), run=str(tmp_path / "run"), max_steps=2, progress=False))


def test_render_offline_checkpoint(dataset, tmp_path):
    from offline_rl.bc import main as bc_main
    from tools.agents import identify
    from tools.render import RenderConfig, run

    bc_main(["--dataset", str(dataset["path"]), "--preset", "debug", "--batch-size", "8", "--run-dir",
             str(tmp_path / "bc"), "--eval-episodes", "0", "--no-progress"])
    assert identify(tmp_path / "bc") == ("offline_rl", "bc")
    result = run(RenderConfig(out=str(tmp_path / "bc.gif"), run=str(tmp_path / "bc"), max_steps=5, episodes=2,
                              progress=False))
    assert result["frames"] == 2 * 6 and [e["length"] for e in result["episodes"]] == [5, 5]


@pytest.mark.filterwarnings("ignore:os.fork:RuntimeWarning")  # the reader starts ffmpeg (fork + exec)
def test_mp4_has_every_frame_and_bad_suffix_is_refused(tmp_path):
    import imageio.v2 as imageio

    frames = [np.full((30, 41, 3), 20 * i, np.uint8) for i in range(7)]
    write_video(tmp_path / "v.mp4", frames, fps=5)
    with imageio.get_reader(tmp_path / "v.mp4") as reader:
        assert reader.count_frames() == 7
    with pytest.raises(UserError, match=".gif or .mp4"):
        write_video(tmp_path / "v.avi", frames)


def test_render_refuses_two_sources_with_one_line(tmp_path, capsys, dataset):
    from tools.render import main as render_main

    with pytest.raises(SystemExit) as exit_info:
        render_main(["--run", "x", "--dataset", str(dataset["path"]), "--out", str(tmp_path / "a.gif")])
    assert exit_info.value.code == 2
    assert capsys.readouterr().err.strip() == "error: pass exactly one of --run RUN, --dataset DIR or --text FILE"


# ----------------------------------------------------------------------------------------------
# Plot
# ----------------------------------------------------------------------------------------------


def fake_run(directory: Path, steps, returns, wall=None) -> Path:
    directory.mkdir(parents=True)
    rows = []
    for i, (step, value) in enumerate(zip(steps, returns)):
        row = {"step": step, "episode/return": value}
        if wall is not None:
            row["perf/wall_seconds"] = wall[i]
        rows.append(json.dumps(row))
    (directory / "metrics.jsonl").write_text("\n".join(rows) + "\n")
    return directory


def test_plot_pools_seeds_of_runs_and_computes_mean_and_spread(tmp_path):
    from tools.plot import band, load_curves
    from tools.plot import main as plot_main

    a = fake_run(tmp_path / "a", [100, 200, 300], [[1, 3], [2, 4], [None, 5]], wall=[10, 20, 5])
    b = fake_run(tmp_path / "b", [100, 200, 300], [[5], [6], [7]], wall=[1, 2, 3])
    (pooled,) = load_curves([str(a), str(b)], "episode/return", labels=["ppo", "ppo"])
    assert pooled.label == "ppo" and pooled.values.shape == (3, 3)
    mean, low, high = band(pooled.values, "minmax")
    np.testing.assert_allclose(mean, [3, 4, 6])
    np.testing.assert_allclose(low, [1, 2, 5])
    np.testing.assert_allclose(high, [5, 6, 7])
    mean, low, high = band(pooled.values, "std")
    np.testing.assert_allclose(high - mean, [np.std([1, 3, 5]), np.std([2, 4, 6]), np.std([5, 7])])

    (timed,) = load_curves([str(a)], "episode/return", x="time")
    np.testing.assert_allclose(timed.x, [10, 20, 25])  # the clock restarted at a resume

    c = fake_run(tmp_path / "c", [150, 250], [[2], [4]])
    (mixed,) = load_curves([str(b), str(c)], "episode/return", labels=["x", "x"])
    np.testing.assert_allclose(mixed.x, [100, 150, 200, 250, 300])
    np.testing.assert_allclose(mixed.values[:, 1], [np.nan, 2, 3, 4, np.nan])

    out = plot_main([str(a), str(b), str(c), "--labels", "ppo", "ppo", "rnd", "--out", str(tmp_path / "p.png")])
    assert read_png(out).shape[0] > 200
    with pytest.raises(SystemExit) as exit_info:
        plot_main([str(a), "--metric", "eval/nothing", "--out", str(tmp_path / "q.png")])
    assert exit_info.value.code == 2 and not (tmp_path / "q.png").exists()


def test_env_step_ticks_are_short_enough_not_to_run_into_each_other():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from utils.plotting import label_env_steps, short_steps

    assert [short_steps(v) for v in (0, 500, 12_500, 200_000, 1_500_000, 2e9)] == \
        ["0", "500", "12.5k", "200k", "1.5M", "2B"]
    fig, ax = plt.subplots()
    ax.plot([0, 200_000], [0, 1])
    label_env_steps(ax)
    fig.canvas.draw()
    labels = [t.get_text() for t in ax.get_xticklabels() if t.get_text()]
    plt.close(fig)
    assert "200k" in labels and max(map(len, labels)) <= 4 and ax.get_xlabel() == "env steps (per seed)"


def test_gif_frames_keep_their_delay(tmp_path):
    """Pillow takes milliseconds: a 10 fps GIF must show each frame for 100 ms, not for ~0."""
    from PIL import Image

    from utils.media import write_gif

    frames = [np.full((8, 8, 3), 40 * i, dtype=np.uint8) for i in range(4)]
    path = write_gif(tmp_path / "a.gif", frames, fps=10)
    with Image.open(path) as gif:
        assert gif.n_frames == 4
        assert gif.info["duration"] == 100
    assert not list(tmp_path.glob(".*.tmp"))
