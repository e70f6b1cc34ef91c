"""Offline-RL data loading throughput (transitions/s) against the training step it has to feed.

For each loader setting it times ``--batches`` shuffled training batches from ``BatchLoader`` (the
start-up, i.e. decoding the first shards, reported separately), and compares with:

* decoding alone: ``TrajectoryDataset.load_shard`` of whole shards on this thread, rows/s;
* training alone: BC / AWR gradient updates of the ``cpu`` preset's network on one fixed batch
  (so no loading at all), transitions/s.

The loader keeps up when its rate is above the training rate; the trainers also log the fraction of
wall time spent waiting for data as ``perf/loader_wait_fraction``.

    python -m benchmarks.offline_loader --dataset DATA --workers 0 1 2
"""

from __future__ import annotations

import argparse
import json
import time

import torch

from benchmarks.common import machine_description
from offline_rl.data import BatchLoader, open_dataset, to_tensors
from offline_rl.networks import NetworkSpec, build_network
from offline_rl.trainer import policy_stats


def decode_rate(dataset, shards: int) -> float:
    """Rows/s of decoding whole shards (observations and actions) on this thread."""
    start = time.perf_counter()
    rows = 0
    for i in range(min(shards, dataset.num_shards)):
        rows += len(dataset.load_shard(i, ("obs", "action"))["action"])
    return rows / (time.perf_counter() - start)


def loader_rate(spec, workers: int, batch_size: int, batches: int, shards_in_memory: int) -> dict:
    loader = BatchLoader(spec, batch_size=batch_size, seed=0, num_workers=workers,
                         shards_in_memory=shards_in_memory)
    start = time.perf_counter()
    iterator = loader.epoch(0)
    next(iterator)
    first = time.perf_counter() - start
    start = time.perf_counter()
    count = 0
    for count, _ in enumerate(iterator, start=1):
        if count >= batches:
            break
    seconds = time.perf_counter() - start
    loader.close()
    return {"workers": workers, "first_batch_seconds": first,
            "transitions_per_second": count * batch_size / seconds, "batches": count}


def training_rate(spec, dataset, batch_size: int, updates: int, critic: bool, width: int, depth: int) -> float:
    """Transitions/s of gradient updates alone (one fixed batch, no loading)."""
    batch = to_tensors(next(dataset.iter_batches(batch_size, keys=["obs", "action"])))
    model = build_network(NetworkSpec(spec.obs_shape, spec.num_actions, width=width, depth=depth, critic=critic), 0)
    optimizer = torch.optim.Adam(model.parameters(), lr=3e-4)
    target = torch.zeros(batch_size)

    def step():
        logits, value = model(batch["obs"])
        log_prob, _ = policy_stats(logits, batch["action"])
        loss = -log_prob.mean() + (0.5 * (value - target).pow(2).mean() if critic else 0.0)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()

    for _ in range(5):
        step()
    start = time.perf_counter()
    for _ in range(updates):
        step()
    return updates * batch_size / (time.perf_counter() - start)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--dataset", required=True)
    parser.add_argument("--workers", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--batch-size", type=int, default=256)
    parser.add_argument("--batches", type=int, default=1000)
    parser.add_argument("--shards-in-memory", type=int, default=4)
    parser.add_argument("--decode-shards", type=int, default=4)
    parser.add_argument("--train-updates", type=int, default=200)
    parser.add_argument("--torch-threads", type=int, default=1)
    parser.add_argument("--width", type=int, default=256)
    parser.add_argument("--depth", type=int, default=2)
    args = parser.parse_args()
    torch.set_num_threads(args.torch_threads)
    dataset, spec = open_dataset(args.dataset)
    result = {
        "dataset": spec.directory, "transitions": spec.num_transitions, "obs_shape": list(spec.obs_shape),
        "batch_size": args.batch_size, "torch_threads": args.torch_threads,
        "decode_rows_per_second": decode_rate(dataset, args.decode_shards),
        "train_bc_transitions_per_second": training_rate(spec, dataset, args.batch_size, args.train_updates,
                                                         False, args.width, args.depth),
        "train_awr_transitions_per_second": training_rate(spec, dataset, args.batch_size, args.train_updates,
                                                          True, args.width, args.depth),
        "loader": [loader_rate(spec, w, args.batch_size, args.batches, args.shards_in_memory) for w in args.workers],
        "machine": machine_description(),
    }
    print(json.dumps(result, indent=2))
    print("\n| loader | transitions/s | first batch (s) |\n|---|---|---|")
    for row in result["loader"]:
        name = f"{row['workers']} worker process(es)" if row["workers"] else "background thread"
        print(f"| {name} | {row['transitions_per_second']:,.0f} | {row['first_batch_seconds']:.1f} |")
    print(f"| decoding alone, this thread | {result['decode_rows_per_second']:,.0f} | |")
    print(f"| BC updates alone (no loading) | {result['train_bc_transitions_per_second']:,.0f} | |")
    print(f"| AWR updates alone (no loading) | {result['train_awr_transitions_per_second']:,.0f} | |")


if __name__ == "__main__":
    main()
