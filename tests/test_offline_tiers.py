"""Datasets of graded quality (benchmarks.offline_tiers), the scores on them (utils.tiers), and batch
evaluation (offline_rl.evaluate_many): the maths by hand, the table from real evaluations in
Craftax-Classic, and (slow) the whole tier build from a tiny PPO run."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from benchmarks.offline_tiers import pick_medium_update
from offline_rl.bc import BC, BCConfig
from offline_rl.evaluate_many import main as evaluate_many_main
from offline_rl.iql import IQL, IQLConfig
from offline_rl.trainer import train
from tests import test_offline_rl
from tests.test_offline_rl import classic_dataset, config
from utils.errors import UserError
from utils.tiers import TIER_KEY, TIERS, fraction_of_data, normalized_score, scores, tier_block, tier_of
from utils.trajectories import TrajectoryDataset, read_manifest, write_manifest

classic_rollout = test_offline_rl.classic_rollout  # the fixture: real Craftax-Classic play


def test_normalised_score_is_zero_at_random_and_one_hundred_at_expert():
    assert normalized_score(1.0, 1.0, 11.0) == 0.0
    assert normalized_score(11.0, 1.0, 11.0) == 100.0
    assert normalized_score(6.0, 1.0, 11.0) == 50.0
    assert normalized_score(0.0, 1.0, 11.0) == -10.0, "worse than random is negative, not clipped"
    assert normalized_score(None, 1.0, 11.0) is None and normalized_score(5.0, 3.0, 3.0) is None
    assert normalized_score(float("nan"), 1.0, 11.0) is None
    assert fraction_of_data(3.0, 4.0) == 0.75 and fraction_of_data(3.0, 0.0) is None
    block = tier_block("medium", data_return=4.0, random_return=1.0, expert_return=11.0, policies=[])
    assert scores(6.0, block) == {"fraction_of_data": 1.5, "normalized_score": 50.0}
    assert scores(6.0, None, data_return=3.0) == {"fraction_of_data": 2.0, "normalized_score": None}
    assert tier_of({"metadata": {TIER_KEY: block}})["name"] == "medium" and tier_of({"metadata": {}}) is None
    with pytest.raises(ValueError, match="unknown tier"):
        tier_block("mediocre", data_return=1.0, random_return=0.0, expert_return=1.0, policies=[])


def test_medium_is_the_first_update_whose_smoothed_return_reaches_the_fraction():
    updates = np.arange(1, 101)
    returns = np.minimum(updates / 50.0, 1.0) * 10.0  # rises linearly to 10 at update 50, then flat
    update, smoothed, final = pick_medium_update(updates, returns, 0.5)
    assert final == 10.0 and smoothed >= 5.0
    assert 25 <= update <= 28, "half of 10 is reached at update 25; a trailing median of 5 lags by 2"
    spiky = returns.copy()
    spiky[4] = 100.0  # one lucky chunk early on is not a medium policy
    assert pick_medium_update(updates, spiky, 0.5)[0] >= 20
    with pytest.raises(UserError, match="learned nothing"):
        pick_medium_update(updates, np.zeros(100), 0.5)


def make_tier(directory: Path, rollout: dict, name: str, random_return: float, expert_return: float) -> Path:
    classic_dataset(directory, rollout)
    manifest = read_manifest(directory)
    manifest["metadata"][TIER_KEY] = tier_block(name, data_return=2.0, random_return=random_return,
                                                expert_return=expert_return, policies=[])
    write_manifest(directory, manifest)
    return directory


def test_evaluate_many_writes_one_table_with_normalised_scores_grouping_seeds(tmp_path, classic_rollout):
    data = make_tier(tmp_path / "medium", classic_rollout, "medium", random_return=0.0, expert_return=10.0)
    runs = []
    for seed in (0, 1):  # one run per seed: grouped into one row
        cfg = config(BCConfig, tmp_path, data, f"bc-s{seed}", seed=seed)
        train(cfg, BC(cfg))
        runs.append(str(tmp_path / f"bc-s{seed}"))
    # Two seeds in one run: two values. Its own final evaluation already scores against the tier.
    cfg = config(IQLConfig, tmp_path, data, "iql-s0", num_seeds=2, eval_episodes=2, eval_max_steps=1500)
    final = train(cfg, IQL(cfg))["summary"]["eval"]
    assert final["tier"]["name"] == "medium" and len(final["normalized_score_per_seed"]) == 2
    assert final["normalized_score"] == pytest.approx(10.0 * final["return"])
    runs.append(str(tmp_path / "iql-s0"))
    args = [*runs, "--episodes", "2", "--max-steps", "1500", "--no-progress"]  # random play ends well before

    # As a two-task array: each task evaluates its share and writes no table; then one collects.
    assert evaluate_many_main([*args, "--task-index", "0", "--task-count", "2"])["table"] is None
    with pytest.raises(SystemExit):
        evaluate_many_main([*args, "--collect", "--out", str(tmp_path / "table")])  # task 1 has not run
    evaluate_many_main([*args, "--task-index", "1", "--task-count", "2"])
    document = evaluate_many_main([*args, "--collect", "--out", str(tmp_path / "table.md")])

    saved = json.loads((tmp_path / "table.json").read_text())
    assert saved["table"] == json.loads(json.dumps(document["table"]))
    rows = {row["method"]: row for row in saved["table"]}
    assert set(rows) == {"bc", "iql"} and all(row["tier"] == "medium" for row in rows.values())
    for row in rows.values():
        assert row["return"]["n"] == 2 and len(row["normalized_score"]["values"]) == 2
        returns, normalised = row["return"]["values"], row["normalized_score"]["values"]
        for ret, score in zip(returns, normalised):  # random 0, expert 10: the score is 10x the return
            assert score == pytest.approx(10.0 * ret)
        assert row["fraction_of_data"]["mean"] == pytest.approx(np.mean(returns) / 2.0)
    assert len(rows["bc"]["runs"]) == 2 and len(rows["iql"]["runs"]) == 1
    table = (tmp_path / "table.md").read_text()
    assert "| Craftax-Classic-Symbolic-v1 | medium | bc | none |" in table and "(2)" in table
    each = json.loads((tmp_path / "bc-s1" / "eval.json").read_text())["summary"]
    assert each["tier"]["name"] == "medium" and each["normalized_score"] == pytest.approx(10.0 * each["return"])


def test_evaluate_many_refuses_a_folder_without_checkpoints_before_evaluating(tmp_path, capsys):
    (tmp_path / "empty").mkdir()
    with pytest.raises(SystemExit) as stop:
        evaluate_many_main([str(tmp_path / "empty"), "--no-progress"])
    assert stop.value.code == 2 and "no checkpoint found" in capsys.readouterr().err


def test_pixel_tiers_need_a_symbolic_env_with_a_pixel_twin():
    from benchmarks.offline_tiers import TiersConfig, data_env_for
    from utils import envs

    symbolic = envs.make("Craftax-Classic-Symbolic-v1", 4, reset_ratio=4)
    assert data_env_for(TiersConfig(), symbolic) == (symbolic, None)
    pixel_env, view = data_env_for(TiersConfig(pixels=True), symbolic)
    assert pixel_env.name == "Craftax-Classic-Pixels-v1" and pixel_env.num_envs == 4 and view is not None
    with pytest.raises(UserError, match="no pixel twin"):
        data_env_for(TiersConfig(pixels=True), pixel_env)


@pytest.mark.slow
def test_offline_tiers_builds_every_tier_from_a_tiny_ppo_run(tmp_path):
    """The whole pipeline at debug size (minutes on a busy CPU): PPO, the medium re-run saving every
    rollout, three policies' returns, five tier folders whose manifests hold the tier block; a re-run
    keeps what is there."""
    from benchmarks.offline_tiers import main as tiers_main

    out = tmp_path / "tiers"
    summary = tiers_main(["--preset", "debug", "--out", str(out), "--no-progress"])
    assert sorted(summary["tiers"]) == sorted(TIERS)
    returns = summary["returns"]
    assert 0 < summary["medium_update"] <= returns["expert"]["update"] == 32
    for name in TIERS:
        data = TrajectoryDataset(out / name)
        block = tier_of(data.manifest)
        assert block["name"] == name and block["random_return"] == returns["random"]["return"]
        assert block["expert_return"] == returns["expert"]["return"] and block["policies"]
        assert data.num_transitions > 0 and not (out / f"{name}.partial").exists()
    for name in ("random", "medium", "expert"):
        assert TrajectoryDataset(out / name).num_transitions == 1024
    mixed = TrajectoryDataset(out / "medium-expert")
    assert mixed.num_transitions == 2048
    assert [int(s["update"]) for s in mixed.shards] == [0, 1, 2, 3, 5, 6, 7, 8], "a gap between the halves"
    replay = TrajectoryDataset(out / "medium-replay")
    assert [int(s["update"]) for s in replay.shards] == list(range(summary["medium_update"])), \
        "every rollout up to medium, so episodes run whole across them"
    assert not (out / "ppo" / "rollouts").exists(), "the PPO run itself saves nothing: the re-run does"
    assert tier_of(TrajectoryDataset(out / "medium").manifest)["policies"][0]["update"] == summary["medium_update"]
    record = tmp_path / "offline_tiers_toy.json"
    again = tiers_main(["--preset", "debug", "--out", str(out), "--no-progress", "--record", str(record)])
    assert again["written_now"] == [] and again["medium_update"] == summary["medium_update"]
    table = json.loads(record.read_text())
    assert [row["tier"] for row in table["rows"]] == list(TIERS)
    rows = {row["tier"]: row for row in table["rows"]}
    assert rows["expert"]["expert_return"] == pytest.approx(returns["expert"]["return"], rel=1e-6)
    assert rows["medium-expert"]["rows"] == 2048
    assert rows["medium-replay"]["policies"] == f"ppo-training (update 0..{summary['medium_update'] - 1})"

    pixels = tiers_main(["--preset", "debug", "--from-run", str(out / "ppo" / "run"), "--pixels", "--tiers", "expert",
                         "medium-replay", "--out", str(tmp_path / "pixels"), "--no-progress"])
    assert pixels["env"] == "Craftax-Classic-Pixels-v1" and sorted(pixels["tiers"]) == ["expert"]
    frames, symbolic = TrajectoryDataset(pixels["tiers"]["expert"]), TrajectoryDataset(out / "expert")
    assert frames.manifest["env_name"] == "Craftax-Classic-Pixels-v1" and frames.manifest["obs_shape"] == [63, 63, 3]
    assert tier_of(frames.manifest)["expert_return"] == pytest.approx(returns["expert"]["return"], rel=1e-6)
    ours, theirs = frames.load_shard(0), symbolic.load_shard(0)
    same = np.mean(ours["action"] == theirs["action"])
    assert same > 0.95, f"the same states and keys: the symbolic policy acts alike ({same:.0%} of actions equal)"
    assert ours["obs"].shape[1:] == (63, 63, 3) and ours["obs"].std() > 0
