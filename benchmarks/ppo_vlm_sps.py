"""Steps/s of pixel PPO with VLM features at skip_n 25 against plain pixel PPO, as a measured table.

``benchmarks.ppo_llm_sps`` on a pixel env (both sides pixel PPO with the CNN; features of frames
through the tiny random vision-language model of ``utils/testing/tiny_vlm.py`` unless ``--model`` or
``--server-url`` says otherwise), with defaults sized for a shared 2-core CPU and the table written
to ``docs/data/ppo_vlm_sps.json`` (render it with ``python -m benchmarks.report``). Every flag of
``benchmarks.ppo_llm_sps`` works and overrides these defaults.

    python -m benchmarks.ppo_vlm_sps                                   # CPU, tiny VLM, a few minutes
    python -m benchmarks.ppo_vlm_sps --repeats 5 --skip-n 1 25 100     # more calls, more skip_n
    python -m benchmarks.ppo_vlm_sps --server-url http://127.0.0.1:8000 --table /tmp/vlm.json
"""

from __future__ import annotations

import sys

from benchmarks import ppo_llm_sps

DEFAULTS = ["--env", "Craftax-Classic-Pixels-v1", "--skip-n", "25", "--num-envs", "8", "--num-steps", "25",
            "--num-minibatches", "1", "--update-epochs", "1", "--updates", "1", "--repeats", "3",
            "--table", "docs/data/ppo_vlm_sps.json"]
"""Sized for a shared 2-core CPU: one update of 25 steps holds exactly one refresh of every env at
skip_n 25. One epoch of one minibatch keeps the update small, so the comparison is about the features:
with PPO's 4 epochs of 8 minibatches the CNN's update takes most of both methods' time on the CPU."""


def main(argv: list[str] | None = None) -> dict:
    argv = sys.argv[1:] if argv is None else list(argv)
    return ppo_llm_sps.main([*DEFAULTS, *argv], prog="benchmarks.ppo_vlm_sps", typed=argv)


if __name__ == "__main__":
    main()
