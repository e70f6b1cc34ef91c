"""Presets applied left to right, then flags; run folders refuse a different config."""

import dataclasses

import pytest

from online_rl.ppo import PPOConfig
from utils.config import apply_presets, parse_config
from utils.errors import UserError
from utils.run_dir import default_run_name, open_run_dir, resolve_run_dir

PRESETS = {"small": {"num_envs": 8, "lr": 0.1}, "fast": {"lr": 0.5, "num_steps": 4}}


def test_presets_apply_left_to_right_then_fields_override():
    cfg = apply_presets(PPOConfig(), ["small", "fast"], PRESETS, "test")
    assert (cfg.num_envs, cfg.lr, cfg.num_steps) == (8, 0.5, 4)
    cfg = apply_presets(PPOConfig(), ["fast", "small"], PRESETS, "test")
    assert cfg.lr == 0.1 and cfg.preset == ("fast", "small")


def test_parse_config_uses_yaml_presets_then_flags():
    cfg = parse_config(PPOConfig, "online_rl", "ppo", ["--preset", "debug", "--num-envs", "12", "--seed", "3"])
    assert cfg.num_envs == 12  # flag beats preset
    assert cfg.num_steps == 16  # from the debug preset
    assert cfg.seed == 3 and cfg.preset == ("debug",)
    cfg = parse_config(PPOConfig, "online_rl", "ppo", ["--preset", "debug", "--preset", "cpu"])
    assert cfg.num_envs == 256 and cfg.preset == ("debug", "cpu")


def test_unknown_preset_and_unknown_field_are_clear_errors():
    with pytest.raises(UserError, match="unknown preset 'nope'.*available"):
        apply_presets(PPOConfig(), ["nope"], PRESETS, "test")
    with pytest.raises(UserError, match="unknown fields: nmu_envs"):
        apply_presets(PPOConfig(), ["bad"], {"bad": {"nmu_envs": 3}}, "test")


def test_help_documents_every_field(capsys):
    with pytest.raises(SystemExit):
        parse_config(PPOConfig, "online_rl", "ppo", ["--help"])
    text = capsys.readouterr().out
    for field in dataclasses.fields(PPOConfig):
        assert "--" + field.name.replace("_", "-") in text, field.name


def test_run_folder_resumes_same_config_and_refuses_a_different_one(tmp_path):
    cfg = PPOConfig(run_dir=str(tmp_path / "run"))
    assert open_run_dir(cfg, tmp_path / "run") is False
    assert open_run_dir(dataclasses.replace(cfg, progress=False), tmp_path / "run") is True
    with pytest.raises(UserError, match=r"different config \(lr: 0.0002 -> 0.001\)"):
        open_run_dir(dataclasses.replace(cfg, lr=1e-3), tmp_path / "run")


def test_only_algorithms_without_a_schedule_over_the_run_may_change_its_length(tmp_path):
    from world_models.dreamer import DreamerConfig

    ppo = PPOConfig(run_dir=str(tmp_path / "ppo"))
    open_run_dir(ppo, tmp_path / "ppo")
    with pytest.raises(UserError, match=r"total_steps: 1000000 -> 2000000"):  # its learning rate anneals over it
        open_run_dir(dataclasses.replace(ppo, total_steps=2_000_000), tmp_path / "ppo")
    dreamer = DreamerConfig(run_dir=str(tmp_path / "dreamer"))
    open_run_dir(dreamer, tmp_path / "dreamer")
    assert open_run_dir(dataclasses.replace(dreamer, total_steps=2_000_000), tmp_path / "dreamer") is True


def test_a_run_saved_before_fields_were_added_or_removed_resumes_with_a_note(tmp_path, capsys):
    import yaml

    cfg = PPOConfig(run_dir=str(tmp_path / "run"))
    open_run_dir(cfg, tmp_path / "run")
    saved = yaml.safe_load((tmp_path / "run" / "config.yaml").read_text())
    saved.pop("ent_coef")
    saved["icm"] = False  # a field an older version had
    (tmp_path / "run" / "config.yaml").write_text(yaml.safe_dump(saved))
    assert open_run_dir(cfg, tmp_path / "run") is True
    note = capsys.readouterr().out
    assert "new fields take their current values: ent_coef" in note and "fields no longer used: icm" in note
    with pytest.raises(UserError, match=r"lr: 0.0002 -> 0.001"):  # fields both sides have still count
        open_run_dir(dataclasses.replace(cfg, lr=1e-3), tmp_path / "run")


def test_default_run_folder_is_deterministic_so_rerunning_resumes():
    cfg = PPOConfig(preset=("debug",), seed=2)
    assert default_run_name(cfg) == "debug-s2"
    assert str(resolve_run_dir(cfg, "online_rl", "ppo")) == "runs/online_rl/ppo/Craftax-Classic-Symbolic-v1/debug-s2"


def test_chunks_divide_the_run_and_seed_keys_are_independent_of_the_group():
    from utils import training

    assert training.updates_for(1000, 300) == 4
    assert training.updates_for(0, 300) == 1
    assert training.largest_chunk(12, 5) == 4
    assert training.largest_chunk(12, 100, multiple_of=6) == 6
    assert training.largest_chunk(7, 5) == 1
    alone = training.seed_keys(3, 1)
    group = training.seed_keys(2, 3)
    assert (alone[0] == group[1]).all()


# Every preset file and the config class its entry point parses it into.
PRESET_FILES = {
    ("online_rl", "ppo"): "online_rl.ppo:PPOConfig", ("online_rl", "ppo_rnn"): "online_rl.ppo_rnn:PPORNNConfig",
    ("online_rl", "random_policy"): "online_rl.random_policy:RandomPolicyConfig",
    ("world_models", "dreamer"): "world_models.dreamer:DreamerConfig",
    ("offline_rl", "bc"): "offline_rl.bc:BCConfig", ("offline_rl", "awr"): "offline_rl.awr:AWRConfig",
    ("offline_rl", "evaluate"): "offline_rl.evaluate:EvalConfig", ("offline_rl", "iql"): "offline_rl.iql:IQLConfig",
    ("offline_rl", "evaluate_many"): "offline_rl.evaluate_many:EvaluateManyConfig",
    ("offline_rl", "offline_tiers"): "benchmarks.offline_tiers:TiersConfig",
    ("online_rl_llm", "ppo_llm"): "online_rl_llm.ppo_llm:PPOLLMConfig",
    ("online_rl_llm", "llm_play"): "online_rl_llm.llm_play:LLMPlayConfig",
    ("labelling", "worker"): "labelling.worker:WorkerConfig",
    ("labelling", "enqueue"): "labelling.enqueue:EnqueueConfig",
    ("servers", "hidden_state_server"): "servers.hidden_state_server:ServerConfig",
}


def test_every_shipped_preset_passes_the_central_checks():
    """The rules of check_config (counts positive, ...) must not refuse a preset the repo ships."""
    import importlib
    from pathlib import Path

    from utils.config import CONFIG_ROOT, check_config, load_presets

    shipped = {(p.parent.name, p.stem) for p in Path(CONFIG_ROOT).glob("*/*.yaml")}
    assert shipped <= set(PRESET_FILES), f"add {sorted(shipped - set(PRESET_FILES))} to PRESET_FILES"
    for (area, algo), target in PRESET_FILES.items():
        module, name = target.split(":")
        config_cls = getattr(importlib.import_module(module), name)
        presets = load_presets(area, algo)
        for preset in presets:
            cfg = apply_presets(config_cls(), [preset], presets, f"{area}/{algo}")
            inputs = {f: ("" if f == "dataset" else None)
                      for f in ("dataset", "checkpoint", "few_shot") if hasattr(cfg, f)}
            check_config(dataclasses.replace(cfg, **inputs))  # input paths are the user's, not the preset's


def test_check_config_names_the_flag():
    from utils.config import check_config

    for field, value, message in [("total_steps", 0, "--total-steps must be positive"),
                                  ("num_envs", -4, "--num-envs must be positive"),
                                  ("eval_every", -1, "--eval-every must be zero or more"),
                                  ("lr", 0.0, "--lr must be positive"),
                                  ("gae_lambda", 1.2, "--gae-lambda must be between"),
                                  ("env", "Nope-v1", "unknown env 'Nope-v1'; valid names: .*; fix --env")]:
        with pytest.raises(UserError, match=message):
            check_config(dataclasses.replace(PPOConfig(), **{field: value}))
    assert check_config(dataclasses.replace(PPOConfig(), eval_every=0, seed=-1)).seed == -1


def test_run_dir_with_corrupt_config_is_refused_not_overwritten(tmp_path):
    (tmp_path / "config.yaml").write_text("env: [unclosed\n")
    cfg = dataclasses.replace(PPOConfig(), run_dir=str(tmp_path))
    with pytest.raises(UserError, match="--run-dir: .*config.yaml is not valid YAML"):
        open_run_dir(cfg, tmp_path)
    assert (tmp_path / "config.yaml").read_text() == "env: [unclosed\n"
