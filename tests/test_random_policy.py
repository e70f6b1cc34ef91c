"""The uniform random policy: the floor a suite compares against, through the training contract."""

from __future__ import annotations

import json

import numpy as np

from online_rl import random_policy
from utils.io import read_jsonl


def test_random_policy_logs_a_run_folder_per_seed_and_continues_to_a_longer_budget(tmp_path):
    run = tmp_path / "run"
    argv = ["--preset", "debug", "--num-envs", "16", "--num-steps", "64", "--updates-per-chunk", "4",
            "--num-seeds", "2", "--seed", "7", "--run-dir", str(run), "--no-progress"]
    random_policy.main([*argv, "--total-steps", str(16 * 64 * 12)])  # 12 updates: 3 chunks of 4
    summary = json.loads((run / "summary.json").read_text())
    assert summary["complete"] and summary["env_steps_per_seed"] == 16 * 64 * 12, "exactly the budget"
    returns = summary["final"]["episode/return"]["per_seed"]
    assert len(returns) == 2 and all(r is not None and 0 <= r < 10 for r in returns), returns
    rows = read_jsonl(run / "metrics.jsonl")
    assert [r["step"] for r in rows] == [4 * 1024, 8 * 1024, 12 * 1024]
    assert sum(np.sum(r["episode/count"]) for r in rows) > 0, "1,024 random steps per env end episodes"
    assert any(k.startswith("achievements/") for k in rows[-1]) and (run / "learning_curve.png").exists()
    random_policy.main([*argv, "--total-steps", str(16 * 64 * 16)])  # a longer budget continues the run
    rows = read_jsonl(run / "metrics.jsonl")
    assert [r["step"] for r in rows] == [4 * 1024, 8 * 1024, 12 * 1024, 16 * 1024]
    assert json.loads((run / "summary.json").read_text())["env_steps_per_seed"] == 16 * 64 * 16
