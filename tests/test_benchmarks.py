"""Benchmarks that the README and docs quote as commands: each one runs at a debug size, so a change to
the code it measures cannot break it unseen."""

from __future__ import annotations

import json

from benchmarks import ppo_sps


def test_ppo_sps_runs_the_readme_command_at_debug_size(capsys):
    """``python -m benchmarks.ppo_sps --preset cpu`` (README, common commands) at the debug preset: it
    once crashed after ``make_train`` began returning an ``Algorithm``."""
    ppo_sps.main(["--preset", "debug", "--updates", "1", "--repeats", "1"])
    result = json.loads(capsys.readouterr().out)
    assert result["preset"] == ["debug"] and result["num_envs"] == 8
    assert result["ppo_steps_per_second"] > 0 and result["env_steps_per_second"] > 0
    assert result["ppo_over_env"] == result["ppo_steps_per_second"] / result["env_steps_per_second"]
