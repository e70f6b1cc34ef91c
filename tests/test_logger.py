"""metrics.jsonl: per-seed lists, nulls for missing values, truncation on resume, clear extras errors."""

import importlib.util

import numpy as np
import pytest

from utils.errors import UserError
from utils.io import read_jsonl
from utils.logger import MetricsLogger
from utils.training import weighted_final


def test_rows_keep_per_seed_values_and_write_nan_as_null(tmp_path):
    logger = MetricsLogger(tmp_path)
    logger.log(10, {"episode/return": np.array([1.5, np.nan]), "perf/sps": np.float32(3.0)})
    logger.close()
    assert read_jsonl(tmp_path / "metrics.jsonl") == [{"step": 10, "episode/return": [1.5, None], "perf/sps": 3.0}]


def test_resume_drops_rows_after_the_checkpoint_and_a_fresh_start_clears_them(tmp_path):
    logger = MetricsLogger(tmp_path)
    for step in (10, 20, 30):
        logger.log(step, {"x": step})
    logger.close()
    resumed = MetricsLogger(tmp_path, resume_step=20)
    resumed.log(30, {"x": 31})
    resumed.close()
    assert [(r["step"], r["x"]) for r in read_jsonl(tmp_path / "metrics.jsonl")] == [(10, 10), (20, 20), (30, 31)]
    MetricsLogger(tmp_path).close()
    assert read_jsonl(tmp_path / "metrics.jsonl") == []


@pytest.mark.skipif(importlib.util.find_spec("tensorboardX") is not None, reason="tensorboardX is installed")
def test_missing_tensorboard_extra_is_a_clear_error(tmp_path):
    with pytest.raises(UserError, match=r"pip install -e '\.\[tensorboard\]'"):
        MetricsLogger(tmp_path, tensorboard=True)


def test_bad_wandb_mode_is_a_clear_error(tmp_path):
    with pytest.raises(UserError, match="disabled, offline or online"):
        MetricsLogger(tmp_path, wandb_mode="sometimes")


def test_final_summary_weights_rows_by_episodes():
    rows = [
        {"episode/count": [1.0, 0.0], "episode/return": [10.0, None]},
        {"episode/count": [3.0, 2.0], "episode/return": [2.0, 5.0]},
    ]
    final = weighted_final(rows, fraction=1.0)
    assert final["episodes"] == [4.0, 2.0]
    assert final["episode/return"]["per_seed"] == [4.0, 5.0]  # (10*1 + 2*3) / 4
    assert final["episode/return"]["mean"] == 4.5
