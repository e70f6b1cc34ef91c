"""Sweeps: grids parsed and checked up front, a shape-free grid trained in one compiled program whose
points equal the corresponding single runs, shape-changing fields as separate programs, and the
ranked table and plot of benchmarks.sweep."""

import dataclasses
import json

import jax
import numpy as np
import pytest

from online_rl import ppo
from utils.config import apply_presets, load_presets
from utils.errors import UserError
from utils.io import read_jsonl
from utils.sweep import grid_points, grid_specs, parse_part, parse_sweep, plan_programs, split_grid


def debug_config(tmp_path, name="run", **overrides) -> ppo.PPOConfig:
    cfg = apply_presets(ppo.PPOConfig(), ["debug"], load_presets("online_rl", "ppo"), "debug")
    return dataclasses.replace(cfg, run_dir=str(tmp_path / name), progress=False, **overrides)


def test_grid_is_parsed_typed_and_checked_before_anything_compiles():
    cfg = ppo.PPOConfig()
    grid = parse_sweep(cfg, ["lr=1e-4,3e-4", "--ent-coef=0.003,0.01", "layer_width=64,128", "anneal_lr=true,false"])
    assert grid == {"lr": [1e-4, 3e-4], "ent_coef": [0.003, 0.01], "layer_width": [64, 128],
                    "anneal_lr": [True, False]}
    assert len(grid_points(grid)) == 16 and grid_points({}) == [{}]
    assert grid_points({"a": [1, 2], "b": [3, 4]})[:2] == [{"a": 1, "b": 3}, {"a": 1, "b": 4}], "last field fastest"
    programs, inner = split_grid(grid, cfg.SWEEP_FIELDS)
    assert list(programs) == ["layer_width", "anneal_lr"] and list(inner) == ["lr", "ent_coef"]
    assert parse_sweep(cfg, grid_specs(inner)) == inner
    for specs, message in [
        (["lr"], "is not NAME=V1,V2"),
        (["nope=1,2"], "unknown field 'nope'"),
        (["seed=1,2"], "seed cannot be swept"),
        (["lr=1e-4", "lr=3e-4"], "listed twice"),
        (["lr=1e-4,1e-4"], "value twice"),
        (["layer_width=64,wide"], "'wide' is not a valid int"),
        (["gamma=0.9,1.5"], "--gamma must be between 0 and 1"),
    ]:
        with pytest.raises(UserError, match=message):
            parse_sweep(cfg, specs)


def counting(make_train, traces: list):
    """``make_train`` whose ``train_chunk`` records every time it is traced (once per compiled program)."""

    def wrapped(*args, **kwargs):
        algorithm = make_train(*args, **kwargs)

        def train_chunk(carry, length, hyper=None):
            traces.append(length)
            return algorithm.train_chunk(carry, length, hyper)

        return algorithm._replace(train_chunk=train_chunk)

    return wrapped


@pytest.mark.slow
def test_shape_free_grid_is_one_program_and_each_point_equals_its_single_run(tmp_path, monkeypatch):
    traces: list = []
    monkeypatch.setattr(ppo, "make_train", counting(ppo.make_train, traces))
    cfg = debug_config(tmp_path, "sweep", num_seeds=2, sweep=("lr=1e-4,3e-4", "ent_coef=0.003,0.01"))
    result = ppo.sweep(cfg)
    assert len(traces) == 1, "the 2x2 grid x 2 seeds trains in one compiled program"
    assert len(result["programs"]) == 1
    carry = result["programs"][0]["carry"]
    assert jax.tree.leaves(carry.params)[0].shape[0] == 8, "4 points x 2 seeds, one slot each"
    index = json.loads((tmp_path / "sweep" / "sweep.json").read_text())
    assert [p["values"] for p in index["points"]] == grid_points({"lr": [1e-4, 3e-4], "ent_coef": [0.003, 0.01]})
    program_rows = read_jsonl(tmp_path / "sweep" / "program_000" / "metrics.jsonl")
    assert len(program_rows[-1]["episode/return"]) == 8

    for point in index["points"]:
        single = ppo.train(debug_config(tmp_path, f"single_{point['slots'][0]}", num_seeds=2, **point["values"]))
        slots = np.asarray(point["slots"])
        for a, b in zip(jax.tree.leaves(single["carry"].params), jax.tree.leaves(carry.params)):
            np.testing.assert_allclose(np.asarray(a), np.asarray(b)[slots], rtol=1e-4, atol=1e-5)
        single_rows = read_jsonl(tmp_path / f"single_{point['slots'][0]}" / "metrics.jsonl")
        for row, program_row in zip(single_rows, program_rows):
            for key in ("episode/return", "loss/total", "eval/return"):
                if key in row:
                    expected = np.array(row[key], dtype=float)
                    got = np.array(program_row[key], dtype=float)[slots]
                    np.testing.assert_allclose(got, expected, rtol=1e-4, atol=1e-5, err_msg=key)
    # The grid points really differ (the hyperparameters reached the program).
    leaves = np.asarray(jax.tree.leaves(carry.params)[0])
    assert not np.allclose(leaves[0], leaves[6])


@pytest.mark.slow
def test_shape_changing_field_runs_separate_programs_and_the_report_ranks_points(tmp_path, capsys):
    from benchmarks import sweep as sweep_report

    folder = tmp_path / "grid"
    ppo.main(["--preset", "debug", "--no-progress", "--run-dir", str(folder), "--num-seeds", "2", "--eval-every", "0",
              "--sweep", "layer_width=16,32", "lr=1e-4,1e-3"])
    assert "sweep folder:" in capsys.readouterr().out
    index = json.loads((folder / "sweep.json").read_text())
    assert [p["values"] for p in index["programs"]] == [{"layer_width": 16}, {"layer_width": 32}]
    assert len(index["points"]) == 4 and index["shape_free"] == ["lr"]
    saved = read_jsonl(folder / "program_001" / "metrics.jsonl")[-1]
    assert len(saved["loss/total"]) == 4  # 2 learning rates x 2 seeds
    # Re-running the same command resumes (nothing left to train) instead of refusing the folders.
    ppo.main(["--preset", "debug", "--no-progress", "--run-dir", str(folder), "--num-seeds", "2", "--eval-every", "0",
              "--sweep", "layer_width=16,32", "lr=1e-4,1e-3"])

    result = sweep_report.main([str(folder)])
    ranked = result["ranked"]
    assert len(ranked) == 4 and all(p["complete"] for p in ranked)
    figures = [p["iqm"] for p in ranked if p["iqm"] is not None]
    assert figures == sorted(figures, reverse=True)
    for point in ranked:
        if point["iqm"] is not None:
            assert point["low"] <= point["iqm"] <= point["high"]
    text = (folder / "sweep.md").read_text()
    assert "| rank | layer_width | lr |" in text and text.count("program_00") == 4
    assert (folder / "sweep.png").stat().st_size > 1000
    assert json.loads((folder / "sweep_results.json").read_text())["ranked"][0]["values"]

    # --record: the same ranking as a docs/data table that benchmarks.report renders.
    from benchmarks import records, report

    sweep_report.main([str(folder), "--record", str(tmp_path / "data" / "grid_tune.json")])
    table = json.loads((tmp_path / "data" / "grid_tune.json").read_text())
    assert table["schema"] == records.TABLE_SCHEMA
    assert [row["iqm"] for row in table["rows"]] == pytest.approx([p["iqm"] for p in ranked], abs=1e-3)
    assert [row["field:layer_width"] for row in table["rows"]] == [str(p["values"]["layer_width"]) for p in ranked]
    assert all(row["sps"] is None or row["sps"] > 0 for row in table["rows"])
    rendered = report.render_table(table, "grid_tune.json")
    assert "| rank | layer_width | lr |" in rendered and "2 seeds" in rendered
    assert "preset=['debug']" in table["description"] and "num_envs=8" in table["description"]
    assert "layer_width=" not in table["description"], "a swept field is not a shared setting"


def test_parts_split_the_grid_so_every_job_gets_work_and_no_point_is_trained_twice():
    grid = {"layer_width": [16, 32], "lr": [1e-4, 3e-4, 1e-3], "ent_coef": [0.003, 0.01]}
    whole = plan_programs(grid, ["lr", "ent_coef"])
    assert [p.values for p in whole] == [{"layer_width": 16}, {"layer_width": 32}]
    assert all(len(p.points) == 6 for p in whole)
    for parts in (1, 2, 3, 4, 5, 12, 40):
        programs = plan_programs(grid, ["lr", "ent_coef"], parts)
        trained = [{**p.values, **v} for p in programs for v in p.points]
        assert trained == [{**p.values, **v} for p in whole for v in p.points], "same points, same order"
        assert len(programs) >= min(parts, 12), f"{parts} jobs all get a program"
        assert [p.folder for p in programs] == [f"program_{i:03d}" for i in range(len(programs))]
    shape_free_only = plan_programs({"lr": [1e-4, 3e-4, 1e-3]}, ["lr"], 2)
    assert [len(p.points) for p in shape_free_only] == [1, 2] and all(p.values == {} for p in shape_free_only)
    assert parse_part("") == (0, 1) and parse_part("2/4") == (2, 4)
    for bad in ("4/4", "-1/2", "1", "a/b", "0/0"):
        with pytest.raises(UserError, match="--sweep-part must be K/N"):
            parse_part(bad)


@pytest.mark.slow
def test_array_parts_together_train_the_whole_sweep(tmp_path):
    """Two jobs of an array (``--sweep-part 0/2`` and ``1/2``) write one sweep folder that holds every
    point, equal to the same points trained by one job."""
    from benchmarks import sweep as sweep_report

    args = ["--preset", "debug", "--no-progress", "--num-seeds", "2", "--eval-every", "0",
            "--sweep", "lr=1e-4,1e-3"]
    ppo.main([*args, "--run-dir", str(tmp_path / "parts"), "--sweep-part", "0/2"])
    partial = sweep_report.load(tmp_path / "parts")[1]
    assert [p["complete"] for p in partial] == [True, False], "part 0 trains the first program only"
    ppo.main([*args, "--run-dir", str(tmp_path / "parts"), "--sweep-part", "1/2"])
    ppo.main([*args, "--run-dir", str(tmp_path / "whole")])
    parts, whole = sweep_report.load(tmp_path / "parts")[1], sweep_report.load(tmp_path / "whole")[1]
    assert [p["values"] for p in parts] == [p["values"] for p in whole] == [{"lr": 1e-4}, {"lr": 1e-3}]
    assert all(p["complete"] for p in parts)
    for a, b in zip(parts, whole):
        np.testing.assert_allclose(a["final"], b["final"], rtol=1e-4)
    with pytest.raises(SystemExit) as stop:
        ppo.main([*args, "--run-dir", str(tmp_path / "bad"), "--sweep-part", "2/2"])
    assert stop.value.code == 2


def test_report_refuses_a_folder_that_is_not_a_sweep(tmp_path):
    from benchmarks import sweep as sweep_report

    with pytest.raises(UserError, match="not a sweep folder"):
        sweep_report.report(tmp_path)


@pytest.mark.slow
def test_dreamer_sweeps_its_learning_rates_and_entropy_in_one_program(tmp_path):
    """Dreamer uses the same runner: a grid over shape-free fields is one program whose slots equal the
    single runs of its points."""
    from world_models import dreamer

    base = dict(progress=False, eval_envs=0, num_seeds=1, env="Craftax-Classic-Symbolic-v1")
    cfg = dreamer.make_config(3, ["debug"], run_dir=str(tmp_path / "sweep"),
                              sweep=("actor_lr=1e-4,1e-3", "actor_entropy=0.0003,0.01"), **base)
    result = dreamer.sweep(cfg)
    assert len(result["programs"]) == 1, "a grid of shape-free fields is one program"
    index = result["index"]
    assert index["shape_free"] == ["actor_lr", "actor_entropy"] and len(index["points"]) == 4
    carry = result["programs"][0]["carry"]
    assert jax.tree.leaves(carry.agent.params)[0].shape[0] == 4
    point = index["points"][3]
    single = dreamer.train(dreamer.make_config(3, ["debug"], run_dir=str(tmp_path / "single"), **point["values"],
                                               **base))
    for a, b in zip(jax.tree.leaves(single["carry"].agent.params), jax.tree.leaves(carry.agent.params)):
        np.testing.assert_allclose(np.asarray(a)[0], np.asarray(b)[point["slots"][0]], rtol=2e-4, atol=2e-5)
    actor = lambda slot: np.concatenate([np.ravel(x[slot]) for x in jax.tree.leaves(carry.agent.params["actor"])])
    assert not np.allclose(actor(0), actor(3)), "the points' values reached the program"
