"""Data parallelism: PPO with --devices 2 (two simulated CPU devices) computes what one device computes,
and its checkpoints resume on either device count."""

import json
import os
import subprocess
import sys
import textwrap

import pytest

from utils.errors import UserError

SCRIPT = textwrap.dedent("""
    import dataclasses, json, sys
    from utils.jax_setup import enable_compilation_cache
    enable_compilation_cache()
    import jax, numpy as np
    from online_rl import ppo
    from utils.config import apply_presets, load_presets

    root = sys.argv[1]
    assert len(jax.local_devices()) == 2, jax.local_devices()
    cfg = apply_presets(ppo.PPOConfig(), ["debug"], load_presets("online_rl", "ppo"), "debug")
    cfg = dataclasses.replace(cfg, progress=False, eval_every=0)
    run = lambda name, devices, **kw: ppo.train(dataclasses.replace(cfg, run_dir=f"{root}/{name}", devices=devices), **kw)
    one = run("one", 1)
    two = run("two", 2)
    # Killed on 2 devices after 2 of 4 updates, resumed on 1 (and the other way round).
    run("two_then_one", 2, stop_after_updates=2)
    two_then_one = run("two_then_one", 1)
    run("one_then_two", 1, stop_after_updates=2)
    one_then_two = run("one_then_two", 2)

    def max_diff(a, b):
        return max(float(np.max(np.abs(np.asarray(x, np.float64) - np.asarray(y, np.float64))))
                   for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b)))

    split = [leaf.sharding.spec == jax.sharding.PartitionSpec(None, "data") for leaf in jax.tree.leaves(two["carry"].obs)]
    rows = lambda name: [r["loss/total"] for r in map(json.loads, open(f"{root}/{name}/metrics.jsonl"))]
    print(json.dumps({
        "params_two": max_diff(one["carry"].params, two["carry"].params),
        "params_two_then_one": max_diff(one["carry"].params, two_then_one["carry"].params),
        "params_one_then_two": max_diff(one["carry"].params, one_then_two["carry"].params),
        "env_state": max_diff(one["carry"].env_state, two["carry"].env_state),
        "losses": max_diff(rows("one"), rows("two")),
        "obs_spec": split,
        "returns": [one["summary"]["final"]["episode/return"]["per_seed"],
                    two["summary"]["final"]["episode/return"]["per_seed"]],
    }))
""")


@pytest.mark.slow
def test_two_devices_match_one_and_checkpoints_move_between_device_counts(tmp_path):
    env = {**os.environ, "XLA_FLAGS": "--xla_force_host_platform_device_count=2", "JAX_PLATFORMS": "cpu"}
    done = subprocess.run([sys.executable, "-c", SCRIPT, str(tmp_path)], capture_output=True, text=True,
                          timeout=1800, env=env)
    assert done.returncode == 0, done.stderr[-3000:]
    result = json.loads(done.stdout.strip().splitlines()[-1])
    assert result["obs_spec"] == [True], "the envs really are split over the devices"
    for key in ("params_two", "params_two_then_one", "params_one_then_two", "env_state", "losses"):
        assert result[key] < 1e-4, (key, result[key])
    assert result["returns"][0] == pytest.approx(result["returns"][1], abs=1e-4)


def test_devices_are_checked_before_anything_compiles():
    from jax.sharding import Mesh

    from utils import parallel

    mesh = parallel.make_mesh(0)
    assert isinstance(mesh, Mesh) and mesh.size >= 1
    with pytest.raises(UserError, match="--devices 99: this process sees"):
        parallel.make_mesh(99)
    parallel.check_divisible(8, parallel.make_mesh(1), "the envs", "--num-envs")


def test_process_spec_reads_slurm_and_explicit_variables():
    from utils.distributed import first_host, process_spec

    assert process_spec({}) is None and process_spec({"SLURM_NTASKS": "1", "SLURM_PROCID": "0"}) is None
    slurm = {"SLURM_NTASKS": "4", "SLURM_PROCID": "2", "SLURM_JOB_ID": "4097", "SLURM_STEP_NODELIST": "gpu[003-004]"}
    assert process_spec(slurm) == ("gpu003:61441", 4, 2)
    assert process_spec({**slurm, "CRAFTAX_COORDINATOR_PORT": "5000"}).coordinator == "gpu003:5000"
    explicit = {"CRAFTAX_COORDINATOR": "127.0.0.1:7", "CRAFTAX_NUM_PROCESSES": "2", "CRAFTAX_PROCESS_ID": "1"}
    assert process_spec({**slurm, **explicit}) == ("127.0.0.1:7", 2, 1), "explicit variables win"
    assert [first_host(n) for n in ("a1", "a1,b2", "n[7,9-12],x", "n[01-02]")] == ["a1", "a1", "n7", "n01"]
    with pytest.raises(UserError, match="CRAFTAX_PROCESS_ID"):
        process_spec({"CRAFTAX_COORDINATOR": "h:1", "CRAFTAX_NUM_PROCESSES": "2"})
    with pytest.raises(UserError, match="outside 0..1"):
        process_spec({**explicit, "CRAFTAX_PROCESS_ID": "2"})
    with pytest.raises(UserError, match="launch with srun"):
        process_spec({"SLURM_NTASKS": "2", "SLURM_PROCID": "0"})


def free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.mark.slow
def test_two_processes_match_one_process(tmp_path):
    """scripts/shell/ppo_multiprocess.sh (the multi-node sbatch script's local twin): two processes with
    two CPU devices each, joined by jax.distributed, train the run one process trains on one device."""
    import dataclasses

    import jax
    import numpy as np

    from online_rl import ppo
    from utils.checkpoint import Checkpointer
    from utils.config import apply_presets, load_presets
    from utils.io import read_jsonl

    repo = __import__("pathlib").Path(__file__).resolve().parent.parent
    env = {**os.environ, "XLA_FLAGS": "--xla_force_host_platform_device_count=2", "JAX_PLATFORMS": "cpu",
           "CRAFTAX_PYTHON": sys.executable, "CRAFTAX_COORDINATOR_PORT": str(free_port())}
    multi = tmp_path / "multi"
    done = subprocess.run(["bash", "scripts/shell/ppo_multiprocess.sh", "--preset", "debug", "--eval-every", "0",
                           "--run-dir", str(multi)], capture_output=True, text=True, timeout=1800, env=env, cwd=repo)
    assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-3000:]
    assert done.stdout.count("run folder:") == 2, "both processes finished"

    cfg = apply_presets(ppo.PPOConfig(), ["debug"], load_presets("online_rl", "ppo"), "debug")
    single = ppo.train(dataclasses.replace(cfg, run_dir=str(tmp_path / "single"), progress=False, eval_every=0))
    checkpoints = Checkpointer(multi / "checkpoints")
    restored, meta = checkpoints.restore(checkpoints.latest_step(), single["carry"])
    checkpoints.close()
    assert meta["update"] == single["summary"]["updates"]
    for a, b in zip(jax.tree.leaves(single["carry"]), jax.tree.leaves(restored)):
        np.testing.assert_allclose(np.asarray(a, np.float64), np.asarray(b, np.float64), rtol=1e-4, atol=1e-4)
    losses = lambda folder: [row["loss/total"] for row in read_jsonl(folder / "metrics.jsonl")]
    np.testing.assert_allclose(losses(multi), losses(tmp_path / "single"), rtol=1e-4, atol=1e-5)
    assert json.loads((multi / "summary.json").read_text())["complete"]
