"""benchmarks/gpu_check.sh and benchmarks/gpu_llm_check.py on the CPU: the agreement maths, the prompt
groups, the baseline file, the argument handling, the summary table and the dry-run listing.

The engines themselves need a GPU: the ``gpu``-marked test at the end runs the agreement path against
a real vLLM or SGLang and is skipped (with the reason) elsewhere."""

from __future__ import annotations

import importlib.util
import json
import os
import re
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from benchmarks import gpu_llm_check as check
from utils.errors import UserError
from utils.llm import LLMSpec, PromptBuilder, load_tokenizer

REPO = Path(__file__).resolve().parents[1]
SCRIPT = REPO / "benchmarks" / "gpu_check.sh"


# ----------------------------------------------------------------------------------------------
# Agreement maths
# ----------------------------------------------------------------------------------------------


def test_agreement_of_identical_states_is_exact():
    states = np.random.default_rng(0).normal(size=(5, 16)).astype(np.float32)
    result = check.agreement(states, states.copy())
    assert result["rows"] == 5 and result["max_abs_diff"] == 0 and result["rel_max_abs_diff"] == 0
    assert result["cosine_min"] == pytest.approx(1) and result["cosine_mean"] == pytest.approx(1)
    assert result["max_abs_baseline"] == pytest.approx(np.abs(states).max())


def test_agreement_separates_direction_from_size():
    expected = np.array([[3.0, 4.0], [1.0, 0.0], [0.0, 2.0]])
    got = np.array([[6.0, 8.0], [0.0, 1.0], [0.0, -2.0]])  # same direction x2, orthogonal, opposite
    result = check.agreement(got, expected)
    assert result["max_abs_diff"] == pytest.approx(4.0) and result["max_abs_baseline"] == 4.0
    assert result["rel_max_abs_diff"] == pytest.approx(1.0)
    assert result["cosine_min"] == pytest.approx(-1.0)
    assert result["cosine_mean"] == pytest.approx((1.0 + 0.0 - 1.0) / 3)


def test_agreement_of_small_bf16_like_noise_passes_the_floor():
    """Rounding the size of bf16's (2^-8 relative) keeps every cosine far above MIN_COSINE, so the floor
    only catches real mistakes (a wrong layer, pooling or normalisation)."""
    rng = np.random.default_rng(1)
    expected = rng.normal(size=(64, 256))
    noisy = expected * (1 + rng.uniform(-2**-8, 2**-8, size=expected.shape))
    assert check.agreement(noisy, expected)["cosine_min"] > 0.9999 > check.MIN_COSINE
    other_layer = rng.normal(size=expected.shape)
    assert check.agreement(other_layer, expected)["cosine_min"] < check.MIN_COSINE


def test_agreement_zero_rows_and_bad_input():
    zeros = np.zeros((2, 3))
    assert check.agreement(zeros, zeros)["cosine_min"] == 1.0
    assert check.agreement(np.array([[0.0, 0, 0], [1, 0, 0]]), np.array([[1.0, 0, 0], [1, 0, 0]]))["cosine_min"] == 0
    with pytest.raises(ValueError, match="cannot be compared"):
        check.agreement(np.zeros((2, 3)), np.zeros((3, 3)))
    with pytest.raises(ValueError, match="non-finite"):
        check.agreement(np.array([[np.nan, 1.0]]), np.array([[1.0, 1.0]]))


# ----------------------------------------------------------------------------------------------
# Prompts and the baseline file
# ----------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def groups(tiny_llm_path):
    return check.prompt_groups(load_tokenizer(tiny_llm_path), 6, 300, 150)


def test_prompt_groups_share_the_header_or_a_long_prefix(tiny_llm_path, groups):
    """What a prefix cache sees with Craftax prompts: observation texts share their header (about 90
    tokens); the shared_prefix group shares --prefix-tokens more. Prompts too short to differ after
    the shared part are refused."""
    builder = PromptBuilder(LLMSpec(model=tiny_llm_path), load_tokenizer(tiny_llm_path))
    assert set(groups) == set(check.GROUPS)
    for texts in groups.values():
        assert len(texts) == 6 and len(set(texts)) == 6
        assert all(abs(len(ids) - 300) <= 6 for ids in builder.encode(texts))
    header = check.shared_prefix_length(builder, groups["observations"])
    assert 60 <= header <= 120
    assert check.shared_prefix_length(builder, groups["shared_prefix"]) >= 148 + header
    tokenizer = load_tokenizer(tiny_llm_path)
    with pytest.raises(UserError, match="--prefix-tokens 100 must be between"):
        check.shared_prefix_prompts(tokenizer, 2, 100, 100)
    with pytest.raises(UserError, match="shared_prefix prompts are not all different"):
        check.prompt_groups(tokenizer, 4, 300, 240)  # 60 tokens after the block: only the header


def test_baseline_round_trip_and_refusals(tmp_path, groups):
    states = {(group, layer): np.full((6, 4), layer, np.float32) for group in check.GROUPS for layer in (-1, 1)}
    path = tmp_path / "base.npz"
    check.save_baseline(path, {"model_revision": "local:abc", "engine": "transformers",
                               "states_per_s": {"observations/-1": 12.5}}, groups, states)
    loaded = check.load_baseline(path, groups, "local:abc")
    assert set(loaded["states"]) == set(states) and loaded["meta"]["engine"] == "transformers"
    np.testing.assert_array_equal(loaded["states"][("shared_prefix", 1)], states[("shared_prefix", 1)])
    row = check.compare_row(loaded, "observations", -1, states[("observations", -1)])
    assert row["agreement"]["max_abs_diff"] == 0 and row["baseline_states_per_s"] == 12.5
    assert check.compare_row(loaded, "observations", 18, states[("observations", -1)])["agreement"] is None
    with pytest.raises(UserError, match="other shared_prefix prompts"):
        check.load_baseline(path, {**groups, "shared_prefix": groups["shared_prefix"][::-1]}, "local:abc")
    with pytest.raises(UserError, match="other weights"):
        check.load_baseline(path, groups, "local:def")
    with pytest.raises(UserError, match="make it first with --engine transformers"):
        check.load_baseline(tmp_path / "missing.npz", groups, None)


# ----------------------------------------------------------------------------------------------
# Argument handling (one line, exit 2)
# ----------------------------------------------------------------------------------------------


@pytest.mark.parametrize("argv,message", [
    ([], "give --engine vllm|sglang|transformers"),
    (["--engine", "vllm", "--save-states", "x.npz"], "--save-states is for --engine transformers"),
    (["--engine", "vllm", "--baseline", "x.npz"], "agreement needs the same weights"),
    (["--engine", "transformers"], "--engine transformers needs --model"),
    (["--engine", "vllm", "--prompts", "0", "--dry-run"], "--prompts must be positive"),
    (["--engine", "vllm", "--min-cosine", "2", "--dry-run"], "--min-cosine must be between 0 and 1"),
])
def test_bad_arguments_are_one_line(argv, message, capsys):
    with pytest.raises(SystemExit) as exit_info:
        check.main(argv)
    err = capsys.readouterr().err
    assert exit_info.value.code == 2 and message in err and "Traceback" not in err, err


def test_a_weightless_model_cannot_be_a_baseline(tmp_path, capsys):
    from utils.testing.tiny_llm import build_tiny_llm

    shaped = build_tiny_llm(tmp_path / "shaped", "tiny", weights=False)
    with pytest.raises(SystemExit):
        check.main(["--engine", "transformers", "--model", shaped, "--save-states", str(tmp_path / "b.npz")])
    assert "folder with weights" in capsys.readouterr().err


# ----------------------------------------------------------------------------------------------
# The whole agreement path on the CPU (transformers against its own saved states)
# ----------------------------------------------------------------------------------------------


def _rows(text: str) -> list[dict]:
    return [json.loads(line) for line in text.splitlines() if line.startswith("{")]


def test_agreement_path_end_to_end_on_the_cpu(tiny_llm_path, tmp_path, capsys):
    common = ["--engine", "transformers", "--device", "cpu", "--dtype", "float32", "--model", tiny_llm_path,
              "--prompts", "4", "--tokens", "240", "--prefix-tokens", "100", "--layers", "-1", "1", "--repeats", "1"]
    base = tmp_path / "base.npz"
    assert check.main([*common, "--save-states", str(base)]) == 0
    saved = _rows(capsys.readouterr().out)
    assert {(r["group"], r["layer"]) for r in saved if "group" in r} == {(g, l) for g in check.GROUPS for l in (-1, 1)}
    assert all(r["states_per_s"] > 0 and "agreement" not in r for r in saved if "group" in r)

    assert check.main([*common, "--baseline", str(base)]) == 0
    rows = _rows(capsys.readouterr().out)
    assert len(rows) == 4
    for row in rows:
        assert row["agreement"]["max_abs_diff"] == pytest.approx(0, abs=1e-5)
        assert row["agreement"]["cosine_min"] == pytest.approx(1)
        assert row["baseline_states_per_s"] > 0 and row["baseline_engine"] == "transformers"

    # A baseline that disagrees (here: made negative) fails the run with one line.
    with np.load(base) as data:
        arrays = {k: (-data[k] if k.startswith("states__") else data[k]) for k in data.files}
    np.savez(base, **arrays)
    assert check.main([*common, "--baseline", str(base)]) == 1
    assert "disagrees with the baseline: cosine -1" in capsys.readouterr().err


def test_dry_run_plans_both_groups_with_the_baseline(tiny_llm_path, tmp_path, capsys):
    args = ["--engine", "vllm", "--prompts", "4", "--tokens", "240", "--prefix-tokens", "100",
            "--model-dir", str(tmp_path / "shaped"), "--dry-run", "--baseline", str(tmp_path / "later.npz")]
    assert check.main(args) == 0
    plans = _rows(capsys.readouterr().out)
    assert {(p["layer"], p["group"]) for p in plans} == {(l, g) for l in (-1, 18) for g in check.GROUPS}
    assert all(p["dry_run"] and p["layers_total"] == 36 and p["hidden_size"] == 2560 for p in plans)
    assert all(p["engine_options"]["load_format"] == "dummy" and p["weights"] == "dummy" for p in plans)
    assert all(p["agreement"]["baseline"].endswith("later.npz") for p in plans)
    assert min(p["shared_prefix_tokens"] for p in plans if p["group"] == "shared_prefix") >= 98


def test_summary_table_lists_measured_agreement_only(tmp_path):
    assert "no agreement measured" in check.summarize(tmp_path)
    measured = {"engine": "vllm", "layer": -1, "group": "shared_prefix", "states_per_s": 812.25,
                "baseline_states_per_s": 95.5, "agreement": {"max_abs_diff": 0.0625, "rel_max_abs_diff": 0.004,
                                                             "cosine_min": 0.99991, "cosine_mean": 0.99998}}
    missing = {**measured, "layer": 18, "agreement": None, "baseline_states_per_s": None}
    plan = {**measured, "dry_run": True}
    lines = "\n".join(map(json.dumps, [measured, plan, missing]))
    (tmp_path / "llm_vllm_last.log").write_text(f"engine starting\n{lines}")
    (tmp_path / "ppo_gpu.log").write_text(json.dumps(measured))  # not an llm_ log
    table = check.summarize(tmp_path)
    assert "| vllm | -1 | shared_prefix | 812.2 | 95.5 | 0.0625 | 0.004 | 0.999910 | 0.999980 |" in table
    assert "| vllm | 18 | shared_prefix | 812.2 | - | - | - | - | - |" in table
    assert table.count("| vllm |") == 2


# ----------------------------------------------------------------------------------------------
# gpu_check.sh: arguments, limits, the dry-run listing
# ----------------------------------------------------------------------------------------------


def test_gpu_check_arguments():
    result = subprocess.run(["bash", str(SCRIPT), "--bogus"], capture_output=True, text=True, timeout=60)
    assert result.returncode == 2 and "unknown argument --bogus" in result.stderr
    result = subprocess.run(["bash", str(SCRIPT), "--help"], capture_output=True, text=True, timeout=60)
    assert result.returncode == 0 and "--dry-run" in result.stdout and "max-abs-diff and cosine" in result.stdout
    assert not result.stdout.startswith("#")


def test_gpu_check_limits_leave_room_for_cold_engine_starts():
    """Until measured on a GPU, every engine step's limit covers cold starts of 120 s each, twice over."""
    text = SCRIPT.read_text()
    assert "NOT yet measured on this project's GPU" in text
    limits = {name: int(value) for name, value in re.findall(r"^(LIMIT_\w+)=(\d+)", text, re.MULTILINE)}
    cold = 120
    assert limits["LIMIT_ENGINE"] >= 2 * cold and limits["LIMIT_ENGINE_TWICE"] >= 2 * 2 * cold
    assert limits["LIMIT_VLLM_TESTS"] >= 1.5 * 4 * cold and limits["LIMIT_SGLANG_TESTS"] >= 1.5 * 2 * cold
    used = set(re.findall(r"\$(LIMIT_\w+)", text))
    assert used == set(limits), "a limit is defined but unused, or used but undefined"


@pytest.mark.slow
def test_gpu_check_dry_run_on_the_cpu(tmp_path):
    """benchmarks/gpu_check.sh --dry-run: model folder, ~500-token prompts in both groups, engine
    arguments, the agreement path end to end (transformers on the tiny model) and the gpu tests'
    collection all work here, and every GPU step, agreement included, is listed with its command."""
    env = {**os.environ, "PYTHON": sys.executable, "OUT_DIR": str(tmp_path)}
    env.pop("LLM_MODEL", None)
    result = subprocess.run(["bash", str(SCRIPT), "--dry-run"], capture_output=True, text=True, timeout=1500,
                            env=env, cwd=REPO)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-2000:]
    summary = (tmp_path / "summary.md").read_text()
    for step in ("llm_vllm_plan", "llm_sglang_plan", "agreement_model_cpu", "agreement_baseline_cpu",
                 "llm_agreement_cpu", "gpu_tests_collect", "benchmark_imports"):
        assert f"| {step} | ok |" in summary, summary
    for step in ("llm_model", "llm_transformers", "llm_vllm_last", "llm_vllm_layer18", "gpu_tests_vllm",
                 "gpu_tests_vlm", "llm_sglang_last", "gpu_tests_sglang", "ppo_gpu", "dreamer_gpu"):
        assert f"| {step} | would run (limit " in summary, summary
    listed = {line.split(":", 1)[0]: line for line in result.stdout.splitlines() if "would run on the GPU" in line}
    assert "--save-states" in listed["== llm_transformers (limit 420s)"]
    for engine_step in ("llm_vllm_last", "llm_vllm_layer18", "llm_sglang_last"):
        assert any(key.startswith(f"== {engine_step} ") and "--baseline" in line for key, line in listed.items())
    # The agreement table, from the CPU's transformers-against-itself step.
    assert "Agreement with the transformers backend" in summary
    assert re.search(r"\| transformers \| -1 \| shared_prefix \| [\d.]+ \| [\d.]+ \| 0 \| 0 \| 1\.000000", summary)

    plans = [json.loads(line) for name in ("llm_vllm_plan", "llm_sglang_plan")
             for line in (tmp_path / f"{name}.log").read_text().splitlines() if line.startswith("{")]
    assert {p["engine"] for p in plans} == {"vllm", "sglang"}
    assert {p["group"] for p in plans} == set(check.GROUPS)
    assert all(p["layers_total"] == 36 and p["hidden_size"] == 2560 for p in plans)
    assert all(abs(p["mean_prompt_tokens"] - 500) <= 10 for p in plans)
    vllm_mid = [p for p in plans if p["engine"] == "vllm" and p["layer"] == 18]
    assert vllm_mid[0]["engine_options"]["hf_overrides"]["num_hidden_layers"] == 18
    collected = (tmp_path / "gpu_tests_collect.log").read_text()
    assert "test_vllm_matches_transformers_on_gpu" in collected and "test_sglang_matches" in collected
    assert "test_vllm_frames_match_transformers_on_gpu" in collected, "the vision-language step's tests"


# ----------------------------------------------------------------------------------------------
# On a GPU: the agreement path against a real engine
# ----------------------------------------------------------------------------------------------


def _gpu_with(package: str) -> bool:
    try:
        import torch
    except ImportError:
        return False
    return torch.cuda.is_available() and importlib.util.find_spec(package) is not None


@pytest.mark.gpu
@pytest.mark.parametrize("engine", [
    pytest.param("vllm", marks=pytest.mark.skipif(not _gpu_with("vllm"),
                                                  reason="needs a CUDA GPU with vllm installed")),
    pytest.param("sglang", marks=pytest.mark.skipif(not _gpu_with("sglang"),
                                                    reason="needs a CUDA GPU with sglang installed")),
])
def test_engine_agrees_with_transformers_through_gpu_llm_check(engine, tmp_path, monkeypatch, capsys):
    """gpu_llm_check's baseline and comparison with a real engine, on the small bf16 model of the gpu
    tests (head_dim 64), shared prefixes included: every row above the cosine floor."""
    from utils.testing.tiny_llm import build_tiny_llm

    monkeypatch.setenv("VLLM_GPU_MEMORY_UTILIZATION", "0.2")
    monkeypatch.setenv("SGLANG_MEM_FRACTION_STATIC", "0.3")
    model = build_tiny_llm(tmp_path / "gpu_llm", "gpu")
    common = ["--model", model, "--prompts", "16", "--tokens", "300", "--prefix-tokens", "200", "--layers", "-1"]
    base = tmp_path / "base.npz"
    assert check.main(["--engine", "transformers", "--device", "cuda", *common, "--save-states", str(base)]) == 0
    capsys.readouterr()
    assert check.main(["--engine", engine, *common, "--baseline", str(base)]) == 0
    rows = _rows(capsys.readouterr().out)
    assert {r["group"] for r in rows} == set(check.GROUPS)
    assert all(r["agreement"]["cosine_min"] > check.MIN_COSINE and r["states_per_s"] > 0 for r in rows)
