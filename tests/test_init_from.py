"""PPO fine-tuned from a trained policy (online_rl.finetune): --init-from BC, AWR, IQL and PPO runs gives
the source's policy (and critic), the critic warm-up freezes the actor, the KL penalty to the initial
policy is logged and decays, the default program is unchanged, and every mismatch is one line, exit 2."""

from __future__ import annotations

import dataclasses
import importlib
import subprocess
import sys
from pathlib import Path

import jax
import numpy as np
import pytest
import torch
import yaml

from offline_rl.awr import AWR, AWRConfig
from offline_rl.bc import BC, BCConfig
from offline_rl.checkpoint import load_checkpoint, policies_from_checkpoint, save_checkpoint
from offline_rl.iql import IQL, IQLConfig
from offline_rl.trainer import train as train_offline
from online_rl import finetune
from online_rl.common import make_optimizer, seed_keys
from online_rl.ppo import PPOConfig, TrainCarry, make_network, make_train, train
from utils import envs
from utils.config import apply_presets, load_presets
from utils.io import read_jsonl
from utils.training import init_per_seed
from utils.trajectories import TrajectoryWriter

CLASSIC = "Craftax-Classic-Symbolic-v1"
OFFLINE = {"bc": (BCConfig, BC), "awr": (AWRConfig, AWR), "iql": (IQLConfig, IQL)}
#: The offline debug presets' network (configs/offline_rl/*.yaml): the flags a PPO run starting from one needs.
OFFLINE_NET = {"layer_width": 32, "num_layers": 1, "activation": "relu"}


def ppo_config(run_dir: Path, **overrides) -> PPOConfig:
    cfg = apply_presets(PPOConfig(), ["debug"], load_presets("online_rl", "ppo"), "debug")
    return dataclasses.replace(cfg, run_dir=str(run_dir), progress=False, **overrides)


def random_dataset(directory: Path, shards: int = 4, steps: int = 16, streams: int = 8) -> Path:
    """Rows of Craftax-Classic's observation shape and action count with random contents: enough for the
    offline trainers, and the policies are compared on the same observations whatever they learned."""
    rng = np.random.default_rng(0)
    with TrajectoryWriter(directory, env_name=CLASSIC, obs_shape=(1345,), obs_dtype=np.float32,
                          num_streams=streams, num_actions=17) as writer:
        for update in range(shards):
            obs = rng.uniform(0, 1, (steps, streams, 1345)).astype(np.float32)
            zeros = np.zeros((steps, streams), np.float32)
            writer.write_rollout(update=update, obs=obs, action=rng.integers(0, 17, (steps, streams)),
                                 reward=rng.uniform(0, 1, (steps, streams)).astype(np.float32),
                                 done=rng.random((steps, streams)) < 0.05, log_prob=zeros, value=zeros,
                                 terminal_obs=obs, last_value=np.zeros(streams, np.float32))
    return directory


@pytest.fixture(scope="module")
def sources(tmp_path_factory) -> Path:
    """Two-seed debug runs of PPO (tests/test_ppo.py's first program, so the compilation cache serves both) and
    of BC, AWR and IQL (on random rows: no env is stepped)."""
    root = tmp_path_factory.mktemp("sources")
    train(ppo_config(root / "ppo", num_seeds=2))
    random_dataset(root / "data")
    for name, (config_cls, algorithm_cls) in OFFLINE.items():
        cfg = apply_presets(config_cls(), ["debug"], load_presets("offline_rl", name), "debug")
        cfg = dataclasses.replace(cfg, dataset=str(root / "data"), run_dir=str(root / name), progress=False,
                                  eval_episodes=0, num_seeds=2)
        train_offline(cfg, algorithm_cls(cfg))
    return root


def started(cfg: PPOConfig):
    """``(carry stacked over seeds, fresh carry, env)`` of a run's start, as online_rl.common.run_training builds it."""
    env = envs.make(cfg.env, cfg.num_envs, reset_ratio=cfg.reset_ratio)
    algorithm = make_train(cfg, env, 4, False)
    fresh = init_per_seed(algorithm.init, seed_keys(cfg))
    return algorithm.load_start().apply(fresh), fresh, env


def observations(env, rows: int = 64) -> np.ndarray:
    """Real first observations and random ones in the observation's range: the two functions must agree on both."""
    first, _ = jax.jit(env.reset)(jax.random.PRNGKey(7))
    rng = np.random.default_rng(0)
    noise = rng.uniform(0.0, 1.0, (rows,) + env.obs_shape).astype(np.float32)
    return np.concatenate([np.asarray(first), noise])


def seed(tree, index: int):
    return jax.tree.map(lambda x: x[index], tree)


def ppo_outputs(cfg: PPOConfig, env, params, obs: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Action log-probabilities (stricter than probabilities near the uniform policy) and values."""
    logits, value = make_network(cfg, env).apply(params, obs)
    return np.asarray(jax.nn.log_softmax(logits)), np.asarray(value)


def assert_same_policy(log_probs: np.ndarray, expected: np.ndarray) -> None:
    np.testing.assert_allclose(np.exp(log_probs), np.exp(expected), atol=1e-5)
    np.testing.assert_allclose(log_probs, expected, atol=1e-5)


@pytest.mark.parametrize("algo", ["bc", "awr", "iql"])
def test_init_from_an_offline_run_gives_its_policy_and_critic(sources, algo, tmp_path):
    cfg = ppo_config(tmp_path / "run", init_from=str(sources / algo), num_seeds=2, **OFFLINE_NET)
    carry, fresh, env = started(cfg)
    obs = observations(env)
    payload = load_checkpoint(sources / algo)
    for index, policy in enumerate(policies_from_checkpoint(payload)):
        with torch.no_grad():
            logits, _ = policy(torch.from_numpy(obs))
        log_probs, value = ppo_outputs(cfg, env, seed(carry.params, index), obs)
        assert_same_policy(log_probs, torch.log_softmax(logits, -1).numpy())
        fresh_log_probs, fresh_value = ppo_outputs(cfg, env, seed(fresh.params, index), obs)
        assert np.abs(log_probs - fresh_log_probs).max() > 1e-3, "the source is not PPO's fresh policy"
        if algo == "bc":  # no critic: PPO's stays as initialised
            np.testing.assert_array_equal(value, fresh_value)
        else:  # AWR's value net, IQL's V
            with torch.no_grad():
                offline_value = policy.value_only(torch.from_numpy(obs)).numpy()
            np.testing.assert_allclose(value, offline_value, rtol=1e-5, atol=1e-5)
    # The two seeds start from the source's two seeds, not from one of them twice.
    assert not np.array_equal(carry.params["params"]["Dense_0"]["kernel"][0], carry.params["params"]["Dense_0"]["kernel"][1])


def test_init_from_a_ppo_run_gives_its_policy_and_the_extrinsic_value_under_a_bonus(sources, tmp_path):
    from utils.checkpoint import Checkpointer

    cfg = ppo_config(tmp_path / "run", init_from=str(sources / "ppo"), init_from_seed=1)
    carry, _, env = started(cfg)
    checkpointer = Checkpointer(sources / "ppo" / "checkpoints")
    like = jax.eval_shape(jax.vmap(make_train(cfg, env, 4, False).init), seed_keys(dataclasses.replace(cfg, num_seeds=2)))
    source = seed(checkpointer.restore_fields(checkpointer.latest_step(), {"params": like.params})[0]["params"], 1)
    checkpointer.close()
    obs = observations(env)
    assert_same_policy(ppo_outputs(cfg, env, seed(carry.params, 0), obs)[0], ppo_outputs(cfg, env, source, obs)[0])
    # A bonus run's critic has two outputs: the extrinsic one carries over, the intrinsic head starts fresh.
    rnd = dataclasses.replace(cfg, bonus="rnd")
    carry, fresh, env = started(rnd)
    value = np.asarray(make_network(rnd, env, 2).apply(seed(carry.params, 0), obs)[1])
    np.testing.assert_allclose(value[:, 0], ppo_outputs(cfg, env, source, obs)[1], rtol=1e-5, atol=1e-6)
    head, fresh_head = (seed(c.params, 0)["params"]["Dense_1"] for c in (carry, fresh))
    np.testing.assert_array_equal(head["kernel"][:, 1], fresh_head["kernel"][:, 1])
    np.testing.assert_array_equal(head["bias"][1], fresh_head["bias"][1])


def test_critic_warmup_freezes_the_actor_and_the_kl_to_the_initial_policy_decays(sources, tmp_path):
    cfg = ppo_config(tmp_path / "run", init_from=str(sources / "awr"), num_seeds=2, critic_warmup=2,
                     init_kl_coef=0.5, init_kl_steps=512, eval_every=0, **OFFLINE_NET)
    start, _, _ = started(cfg)
    part = train(cfg, stop_after_updates=2)["carry"]  # the 2 warm-up updates (one chunk), then "killed"
    actor = lambda params: {k: v for k, v in params["params"].items() if k in ("MLP_0", "Dense_0")}
    critic = lambda params: {k: v for k, v in params["params"].items() if k in ("MLP_1", "Dense_1")}
    for a, b in zip(jax.tree.leaves(actor(part.params)), jax.tree.leaves(actor(start.params))):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
    assert any(not np.array_equal(np.asarray(a), np.asarray(b))
               for a, b in zip(jax.tree.leaves(critic(part.params)), jax.tree.leaves(critic(start.params))))
    done = train(cfg)["carry"]  # resumes: the actor trains, pulled towards the anchor from the checkpoint
    assert any(not np.array_equal(np.asarray(a), np.asarray(b))
               for a, b in zip(jax.tree.leaves(actor(done.params)), jax.tree.leaves(actor(start.params))))
    for a, b in zip(jax.tree.leaves(done.anchor), jax.tree.leaves(start.params)):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
    rows = read_jsonl(tmp_path / "run" / "metrics.jsonl")
    # 128 env steps per update over 512: updates 0-1 weigh 1 and 0.75, updates 2-3 weigh 0.5 and 0.25.
    np.testing.assert_allclose([r["loss/init_kl_coef"] for r in rows], [[0.5 * 0.875] * 2, [0.5 * 0.375] * 2])
    np.testing.assert_allclose(rows[0]["loss/init_kl"], 0.0, atol=1e-7, err_msg="a frozen actor is the initial policy")
    assert all(v > 0 for v in rows[1]["loss/init_kl"])


def test_without_the_flags_the_program_is_the_default_one(sources, tmp_path):
    """Off by default: no loader, the plain carry and optimiser state, and --init-from alone changes the
    starting parameters only, never the compiled update."""
    cfg = ppo_config(tmp_path / "run")
    env = envs.make(cfg.env, cfg.num_envs, reset_ratio=cfg.reset_ratio)
    algorithm = make_train(cfg, env, 4, False)
    assert algorithm.load_start is None and not finetune.enabled(cfg)
    carry = jax.eval_shape(algorithm.init, jax.random.PRNGKey(0))
    assert type(carry) is TrainCarry
    plain_state = jax.eval_shape(make_optimizer(cfg, 4).init, carry.params)
    assert jax.tree.structure(carry.opt_state) == jax.tree.structure(plain_state)
    tuned = make_train(dataclasses.replace(cfg, init_from=str(sources / "ppo")), env, 4, False)
    program = lambda algorithm: str(jax.make_jaxpr(lambda c: algorithm.train_chunk(c, 1))(carry))
    assert program(tuned) == program(algorithm)


def one_line(stderr: str, *fragments: str) -> None:
    lines = stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: --"), stderr
    for fragment in fragments:
        assert fragment in lines[0], lines[0]


def refused(capsys, module: str, *args: str, fragments: tuple[str, ...]) -> None:
    """The entry point's ``main`` in this process (the same path as the command line, without starting JAX
    again): exit status 2 and one ``error:`` line."""
    main = importlib.import_module(module).main
    with pytest.raises(SystemExit) as stop:
        main(["--preset", "debug", "--no-progress", *args])
    assert stop.value.code == 2
    one_line(capsys.readouterr().err, *fragments)


def with_llm_features(source: Path, folder: Path) -> Path:
    """The BC checkpoint as if trained with --features hidden_state: the feature identity it records."""
    payload = load_checkpoint(source)
    payload.pop("path")
    payload["features"], payload["network"] = "hidden_state", {**payload["network"], "feature_dim": 8}
    payload["labels"] = {"model": "tiny-llm", "layer": -1, "pooling": "last", "hidden_size": 8}
    save_checkpoint(folder / "checkpoints" / "step_000000020.pt", payload)
    return folder


def test_a_wrong_width_is_one_line_and_exit_2_on_the_command_line(sources, tmp_path):
    result = subprocess.run([sys.executable, "-m", "online_rl.ppo", "--preset", "debug", "--no-progress",
                             "--run-dir", str(tmp_path / "run"), "--init-from", str(sources / "bc")],
                            capture_output=True, text=True, timeout=300)
    assert result.returncode == 2
    one_line(result.stderr, "the bc policy has layer_width 32, num_layers 1, activation relu; this run has "
             "layer_width 64, num_layers 2, activation tanh; pass --layer-width 32 --num-layers 1 --activation relu")
    assert not (tmp_path / "run").exists(), "checked before the run folder is written"


def test_every_other_mismatch_is_one_line_and_exit_2_before_anything_is_written(sources, tmp_path, capsys):
    bc, run = str(sources / "bc"), ["--run-dir", str(tmp_path / "run")]
    net = [f"--{k.replace('_', '-')}={v}" for k, v in OFFLINE_NET.items()]
    refused(capsys, "online_rl.ppo", *run, "--init-from", bc, "--env", "Craftax-Classic-Pixels-v1", *net,
            fragments=("was trained on Craftax-Classic-Symbolic-v1, this run is on Craftax-Classic-Pixels-v1",))
    features = with_llm_features(sources / "bc", tmp_path / "bc_llm")
    refused(capsys, "online_rl.ppo", *run, "--init-from", str(features), *net,
            fragments=("reads LLM hidden states", "tiny-llm", "--features none"))
    llm_run = tmp_path / "ppo_llm"
    (llm_run / "checkpoints").mkdir(parents=True)
    saved = yaml.safe_load((sources / "ppo" / "config.yaml").read_text())
    (llm_run / "config.yaml").write_text(yaml.safe_dump({**saved, "skip_n": 25, "llm_layer": -1}))
    refused(capsys, "online_rl.ppo", *run, "--init-from", str(llm_run), fragments=("reads live LLM hidden states",))
    refused(capsys, "online_rl.ppo", *run, "--init-from", str(sources / "ppo"), "--num-seeds", "3",
            fragments=("holds 2 seed(s), this run trains 3", "--init-from-seed"))
    refused(capsys, "online_rl.ppo", *run, "--init-from", str(tmp_path / "nothing"), fragments=("does not exist",))
    refused(capsys, "online_rl.ppo", *run, "--critic-warmup", "2", fragments=("pass --init-from RUN",))
    refused(capsys, "online_rl.ppo_rnd", *run, "--init-from", bc, *net, "--critic-warmup", "4",
            fragments=("leaves the actor no update of the run's 4",))
    refused(capsys, "online_rl.ppo_rnn", *run, "--init-from", bc, fragments=("ppo_rnn cannot start from it",))
    refused(capsys, "online_rl.ppo_rnn", *run, "--init-from", str(sources / "ppo"),
            fragments=("ppo_rnn starts from an online_rl.ppo_rnn run; this is a ppo run",))
    assert not (tmp_path / "run").exists(), "checked before the run folder is written"


def test_ppo_rnn_starts_from_a_ppo_rnn_run_and_its_warmup_freezes_the_gru(tmp_path):
    """PPO-RNN from a PPO-RNN run: every parameter carries over, and in the warm-up only the critic's own
    layers move (the GRU and the observation torso feed the actor, so they are frozen with it)."""
    from online_rl.ppo_rnn import HEADS, PPORNNConfig
    from online_rl.ppo_rnn import train as train_rnn

    cfg = apply_presets(PPORNNConfig(), ["debug"], load_presets("online_rl", "ppo_rnn"), "debug")
    cfg = dataclasses.replace(cfg, progress=False, eval_every=0)
    source = train_rnn(dataclasses.replace(cfg, run_dir=str(tmp_path / "source"), total_steps=256))["carry"].params
    tuned = dataclasses.replace(cfg, run_dir=str(tmp_path / "tuned"), init_from=str(tmp_path / "source"),
                                critic_warmup=2)
    after = train_rnn(tuned, stop_after_updates=2)["carry"].params  # the two warm-up updates (one chunk)
    labels = jax.tree.leaves(finetune.critic_labels(HEADS)(source))
    moved = [not np.array_equal(np.asarray(a), np.asarray(b)) for a, b in zip(jax.tree.leaves(source),
                                                                               jax.tree.leaves(after))]
    assert labels.count("actor") > labels.count("critic") > 0
    assert not any(m for m, label in zip(moved, labels) if label == "actor"), "the actor, GRU and torso are frozen"
    assert any(m for m, label in zip(moved, labels) if label == "critic")
