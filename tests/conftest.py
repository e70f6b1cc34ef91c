"""Test-session setup: CPU JAX with the persistent compilation cache on."""

import os

os.environ.setdefault("JAX_PLATFORMS", "cpu")

from utils.jax_setup import enable_compilation_cache  # noqa: E402

enable_compilation_cache()


import pytest  # noqa: E402


def pytest_configure(config):
    """Build Craftax's texture caches once, before pytest-xdist starts its workers (utils/textures.py).

    On a fresh install the workers would otherwise race to write them and one would read a half-written
    file; the controller process (no ``workerinput``) runs this before any worker exists.
    """
    if not hasattr(config, "workerinput"):
        from utils.textures import ensure_texture_caches

        ensure_texture_caches()


@pytest.fixture(scope="session")
def tiny_llm_path(tmp_path_factory) -> str:
    """A tiny random Qwen2 model and tokenizer on disk (utils/testing/tiny_llm.py), built once a session."""
    from utils.testing.tiny_llm import build_tiny_llm

    return build_tiny_llm(tmp_path_factory.mktemp("tiny_llm"))


@pytest.fixture(scope="session")
def tiny_vlm_path(tmp_path_factory) -> str:
    """A tiny random Gemma-3-shaped VLM and processor on disk (utils/testing/tiny_vlm.py), built once a session."""
    from utils.testing.tiny_vlm import build_tiny_vlm

    return build_tiny_vlm(tmp_path_factory.mktemp("tiny_vlm"))


# Every command of the other docs pages, in two files so that `-n 2 --dist loadfile` runs the halves side by
# side: `slow` and also `docs`. 40 minutes or more on 2 cores with a cold cache, which CI's 90 minutes cannot
# hold beside the rest, so CI runs `-m "slow and not docs"`; run them by hand (`-m docs`) before a change to
# the docs or to an entry point's flags lands.
DOCS_TESTS = (
    "tests/test_docs_run_a.py::test_documented_command_runs",
    "tests/test_docs_run_b.py::test_documented_command_runs",
)

# Tests that each compile and train whole programs for a minute or more on a cold compilation cache
# (measured: docs/results.md, "Test suite"). The README's test command leaves them out (`-m "not slow"`)
# so a new user's first run stays under 15 minutes; CI runs them as its second command (`-m "slow and not docs"`).
# Listed here, by node id prefix, so the split can be tuned from one place as the measured durations
# change; tests that are slow wherever they run carry `@pytest.mark.slow` themselves.
SLOW_TESTS = (
    "tests/test_ppo_family.py::test_debug_run_saves_trajectories_and_resumes_to_the_same_state",
    "tests/test_ppo_llm.py::test_debug_runs_in_process_and_through_the_server_and_resume",
    "tests/test_dreamer_smoke.py::test_every_version_learns_a_contextual_bandit_through_its_world_model",
    "tests/test_dreamer_smoke.py::test_killed_run_resumes_to_the_same_state_and_metrics",
    "tests/test_dreamer_smoke.py::test_finished_run_extends_to_a_larger_budget",
    "tests/test_dreamer_smoke.py::test_debug_run_on_tetris_with_its_action_mode_preset",
    "tests/test_dreamer_smoke.py::test_debug_run_with_replay_context_resumes_with_its_stored_latents",
    "tests/test_compare.py::test_suite_runs_every_method_and_writes_the_table",
    "tests/test_compare.py::test_rerun_skips_finished_runs",
    "tests/test_compare.py::test_rerunning_one_method_keeps_every_row",
    "tests/test_compare.py::test_a_changed_budget_is_a_new_run",
    "tests/test_compare.py::test_slurm_dry_run_prints_a_valid_array_job",
    "tests/test_compare.py::test_collecting_on_a_machine_without_the_runs_keeps_the_committed_seeds",  # same fixture
    "tests/test_ppo.py::test_pixels_debug_run_uses_the_cnn",
    "tests/test_augment.py::test_ppo_pixels_shift_trains_and_pad_zero_is_the_plain_run",  # three pixel PPO programs
    "tests/test_ppo.py::test_ppo_trains_on_tetris_and_reports_lines",
    "tests/test_ppo.py::test_saved_trajectories_match_training_and_survive_a_kill",
    # Moved after the README command took 21.9 min on a fresh clone with an empty cache (cold seconds):
    "tests/test_ppo.py::test_killed_run_resumes_to_the_same_parameters",  # 281
    "tests/test_tools.py::test_render_online_checkpoint_to_gif",  # 131
    "tests/test_dreamer_smoke.py::test_debug_run_v3_two_seeds_with_evaluation",  # 120 (its fixture)
    "tests/test_world_models.py::test_replay_context_starts_from_the_latent",  # 84
    "tests/test_dreamer_smoke.py::test_debug_run_on_classic_symbolic[2]",  # 75 (V1 stays: the Dreamer smoke)
    "tests/test_ppo_llm.py::test_features_refresh_every_skip_n_steps_and_at_episode_starts",  # 75
    "tests/test_benchmarks.py::test_ppo_sps_runs_the_readme_command_at_debug_size",  # 73
    "tests/test_dreamer_smoke.py::test_bandit_benchmark_prints_a_row_per_chunk",  # 63
    "tests/test_llm_play.py::test_llm_play_with_the_tiny_model_writes_every_output",  # 59
    "tests/test_world_models.py::test_mixed_settings_train_a_chunk",  # 57 + 50
    "tests/test_dreamer_smoke.py::test_achievement_events_split_first_unlocks_from_repeats_on_classic",  # 54
    "tests/test_world_models.py::test_prefill_skips_training_for_every_seed_with_a_real_branch",  # 50
    "tests/test_envs.py::test_optimistic_resets_and_episode_statistics",  # 43
    # Compiles the Craftax-Classic pixel env twice (evaluation in process and through a server): 40 s warm.
    "tests/test_vlm_labelling.py::test_awr_on_image_features_evaluates_with_live_features_in_process_and_through_the_server",
    # Fine-tuning (online_rl/finetune.py): each compiles and trains its own programs (cold seconds):
    "tests/test_init_from.py::test_critic_warmup_freezes_the_actor_and_the_kl_to_the_initial_policy_decays",  # 216
    "tests/test_init_from.py::test_ppo_rnn_starts_from_a_ppo_rnn_run_and_its_warmup_freezes_the_gru",  # 220
    # Pixel PPO with VLM features: the CNN's programs compile for each size (cold seconds):
    "tests/test_ppo_vlm.py::test_frames_are_refreshed_every_skip_n_steps_and_at_episode_starts",  # 113 (20 warm)
    "tests/test_ppo_vlm.py::test_debug_pixel_run_in_process_and_through_the_server",  # 271
    "tests/test_ppo_vlm.py::test_ppo_vlm_sps_writes_its_table_at_a_tiny_budget",  # 111
    # Every command of README.md and docs/README.md at a small budget (docs/README.md, "How the docs are tested"):
    "tests/test_docs_run_front.py::test_documented_command_runs",
    *DOCS_TESTS,
)


def pytest_collection_modifyitems(config, items):
    for item in items:
        if item.nodeid.startswith(SLOW_TESTS):
            item.add_marker(pytest.mark.slow)
        if item.nodeid.startswith(DOCS_TESTS):
            item.add_marker(pytest.mark.docs)
