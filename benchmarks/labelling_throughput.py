"""Labelled transitions/s of the LLM backends, and the labelling queue's overhead per job.

    python -m benchmarks.labelling_throughput                       # tiny model, this machine
    python -m benchmarks.labelling_throughput --model Qwen/Qwen2.5-0.5B-Instruct --device cuda
    python -m benchmarks.labelling_throughput --part queue --jobs 200

``backend``: observations -> canonical text -> hidden states (``utils.llm.observation_features``)
for a batch of Craftax-Classic observations, per batch size; the default model is the tiny random
Qwen2 of the tests (2 layers, hidden size 32), written to a temporary folder, so the figure is the
pipeline's own cost (tokenizer, padding, a small forward pass) rather than a real model's.
``worker``: the same through the whole queue (enqueue, one worker, labelled shards on disk).
``queue``: (a) the Redis operations of one job alone (add, read, acknowledge), (b) a whole job
with a stand-in backend that returns constant vectors, i.e. everything a worker does besides the
model: read the shard, render text, write the labelled shard, rewrite the manifest, heartbeat.
Redis is the embedded one (a unix socket on this machine).
"""

from __future__ import annotations

import argparse
import json
import os
import tempfile
import time
from pathlib import Path

import numpy as np

ENV = "Craftax-Classic-Symbolic-v1"


def write_synthetic_dataset(directory: Path, shards: int, steps: int, streams: int,
                            observations: np.ndarray | None = None, seed: int = 0) -> Path:
    """A trajectory dataset of ``shards`` rollouts; observations are taken from ``observations``
    (cycled) or generated well-formed at random (``synthetic_observations``), the rest random."""
    from benchmarks.text_obs_speed import synthetic_observations
    from utils.trajectories import TrajectoryWriter

    rng = np.random.default_rng(seed)
    rows = steps * streams
    with TrajectoryWriter(directory, env_name=ENV, obs_shape=(1345,), obs_dtype=np.float32,
                          num_streams=streams, num_actions=17) as writer:
        for update in range(shards):
            if observations is None:
                flat = synthetic_observations(ENV, rows, seed=seed + update)
            else:
                flat = observations[np.arange(update * rows, (update + 1) * rows) % len(observations)]
            obs = flat.reshape(steps, streams, -1).astype(np.float32)
            writer.write_rollout(
                update=update, obs=obs, action=rng.integers(0, 17, (steps, streams)),
                reward=rng.normal(size=(steps, streams)).astype(np.float32),
                done=rng.random((steps, streams)) < 0.1,
                log_prob=rng.normal(size=(steps, streams)).astype(np.float32),
                value=rng.normal(size=(steps, streams)).astype(np.float32),
                terminal_obs=obs, last_value=np.zeros(streams, np.float32))
    return directory


def _observations(source: str, num: int) -> np.ndarray:
    from benchmarks.text_obs_speed import real_observations, synthetic_observations

    return real_observations(ENV, num) if source == "real" else synthetic_observations(ENV, num)


def bench_backend(model: str, obs: np.ndarray, batch_sizes: list[int], repeats: int,
                  device: str, backend_name: str, threads: int) -> list[dict]:
    import torch

    from utils.llm import LLMSpec, make_backend, observation_features

    torch.set_num_threads(threads)
    results = []
    for batch_size in batch_sizes:
        backend = make_backend(LLMSpec(model=model, batch_size=batch_size, device=device,
                                       backend=backend_name))
        observation_features(backend, obs[:batch_size], ENV)  # warm-up
        times = []
        for _ in range(repeats):
            start = time.perf_counter()
            _, texts = observation_features(backend, obs, ENV, return_texts=True)
            times.append(time.perf_counter() - start)
        tokens = [len(t) for t in backend.prompts.encode(texts)]
        seconds = min(times)  # best of the repeats: the machine is shared, noise only adds time
        results.append({"part": "backend", "backend": backend_name, "device": getattr(backend, "device", "cuda"),
                        "threads": threads, "batch_size": batch_size, "rows": len(obs), "seconds": round(seconds, 3),
                        "rows_per_s": round(len(obs) / seconds, 1),
                        "mean_tokens": round(float(np.mean(tokens)), 1)})
    return results


def bench_worker(model: str, obs: np.ndarray, shards: int, steps: int, streams: int,
                 batch_size: int, threads: int, workdir: Path) -> dict:
    from labelling.enqueue import EnqueueConfig, enqueue
    from labelling.queue import close, connect
    from labelling.worker import WorkerConfig, run_worker
    from utils.llm import make_backend

    source = write_synthetic_dataset(workdir / "worker-data", shards, steps, streams, obs)
    db = str(workdir / "worker.rdb")
    client = connect(WorkerConfig(embedded_redis=db))
    config = EnqueueConfig(dataset=str(source), out=str(workdir / "worker-out"), model=model,
                           batch_size=batch_size, embedded_redis=db)
    enqueue(config, client)
    loaded = make_backend(config.spec())  # loaded before the clock starts, like a warm worker
    start = time.perf_counter()
    summary = run_worker(WorkerConfig(embedded_redis=db, idle_exit_s=0, poll_s=0.02, progress=False,
                                      threads=threads), client, load=lambda spec: loaded)
    seconds = time.perf_counter() - start
    close(client)
    return {"part": "worker", "shards": summary.jobs, "rows": summary.rows, "threads": threads,
            "batch_size": batch_size,
            "seconds": round(seconds, 2), "rows_per_s": round(summary.rows / seconds, 1)}


class ConstantBackend:
    """Stand-in model for timing the queue: constant vectors, no computation (never for labels)."""

    hidden_size = 32
    num_layers = 2

    def __init__(self, spec):
        self.spec = spec

    def hidden_states(self, texts):
        return np.ones((len(texts), self.hidden_size), np.float32)

    def generate(self, prompts, max_new_tokens=64, temperature=0.0):
        return [""] * len(prompts)


def bench_queue(jobs: int, model: str, workdir: Path) -> list[dict]:
    from labelling.enqueue import EnqueueConfig, enqueue
    from labelling.queue import JobQueue, close, connect, job_fields
    from labelling.worker import WorkerConfig, run_worker
    from utils.llm import LLMSpec

    db = str(workdir / "queue.rdb")
    client = connect(WorkerConfig(embedded_redis=db))
    queue = JobQueue(client, "bench-ops")
    spec = LLMSpec(model=model)
    start = time.perf_counter()
    for i in range(jobs):
        queue.add(job_fields("/src", "/out", f"shard_{i:06d}.npz", 16, spec))
        job = queue.next_job("bench", min_idle_ms=60_000, block_ms=1)
        queue.heartbeat(job, "bench")
        queue.complete(job, "bench", seconds="0", skipped=0)
    ops = (time.perf_counter() - start) / jobs

    source = write_synthetic_dataset(workdir / "queue-data", jobs, 8, 2)
    enqueue(EnqueueConfig(dataset=str(source), out=str(workdir / "queue-out"), model=model,
                          embedded_redis=db, queue="bench-jobs"), client)
    start = time.perf_counter()
    summary = run_worker(WorkerConfig(embedded_redis=db, queue="bench-jobs", idle_exit_s=0,
                                      poll_s=0.02, progress=False), client, load=ConstantBackend)
    whole = (time.perf_counter() - start) / summary.jobs
    close(client)
    return [{"part": "queue", "what": "redis ops per job (add, read, heartbeat, ack)", "jobs": jobs,
             "ms_per_job": round(ops * 1000, 2)},
            {"part": "queue", "what": "whole job with a constant stand-in model (16-row shards)",
             "jobs": summary.jobs, "ms_per_job": round(whole * 1000, 2)}]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--part", choices=("backend", "worker", "queue"), action="append",
                        help="what to measure (default: all)")
    parser.add_argument("--model", help="model folder or hub id (default: the tiny test model)")
    parser.add_argument("--backend", default="transformers", choices=("transformers", "vllm"))
    parser.add_argument("--device", default="auto")
    parser.add_argument("--source", choices=("real", "synthetic"), default="real",
                        help="observations from env resets (needs JAX) or random worst-case ones")
    parser.add_argument("--num", type=int, default=256, help="observations per backend measurement")
    parser.add_argument("--batch-size", type=int, action="append", help="default: 8 and 32")
    parser.add_argument("--threads", type=int, action="append",
                        help="torch CPU threads (default: 1, then one per core)")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--jobs", type=int, default=100, help="jobs for the queue measurement")
    args = parser.parse_args()
    parts = args.part or ["backend", "worker", "queue"]

    from benchmarks.common import machine_description

    print(json.dumps({"machine": machine_description()}))
    with tempfile.TemporaryDirectory() as tmp:
        workdir = Path(tmp)
        model = args.model
        if model is None:
            from utils.testing.tiny_llm import build_tiny_llm

            model = build_tiny_llm(workdir / "tiny_llm")
        obs = _observations(args.source, args.num) if {"backend", "worker"} & set(parts) else None
        thread_counts = args.threads or [1, os.cpu_count() or 1]
        if "backend" in parts:
            for threads in thread_counts:
                for row in bench_backend(model, obs, args.batch_size or [8, 32], args.repeats,
                                         args.device, args.backend, threads):
                    print(json.dumps({"source": args.source, **row}), flush=True)
        if "worker" in parts:
            for threads in thread_counts:
                row = bench_worker(model, obs, 8, 16, 4, 32, threads, workdir / f"t{threads}")
                print(json.dumps({"source": args.source, **row}), flush=True)
        if "queue" in parts:
            for row in bench_queue(args.jobs, model, workdir):
                print(json.dumps(row))


if __name__ == "__main__":
    main()
