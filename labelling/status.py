"""Show a labelling queue: waiting, in flight, done, dead letters, throughput and ETA.

    python -m labelling.status                    # embedded Redis of this machine
    python -m labelling.status --redis-url redis://HOST:6379/0 --watch 10
    python -m labelling.status --requeue-dead     # retry dead letters (after fixing the cause)

Also lists each output folder's progress from its manifest (labelled / source shards), which is
the ground truth: a queue that was lost can be rebuilt by running enqueue again.
"""

from __future__ import annotations

import dataclasses
import json
import time
from typing import Any

from labelling.labels import is_complete
from labelling.queue import JobQueue, QueueConfig, connect
from utils.config import parse_config
from utils.errors import exit_on_user_error
from utils.trajectories import DatasetError, default_feature_name, feature_blocks, read_manifest

AREA, COMMAND = "labelling", "status"


@dataclasses.dataclass
class StatusConfig(QueueConfig):
    """Show (or act on) a labelling queue."""

    requeue_dead: bool = False
    """Put every dead-lettered job back in the queue (fix its error first)."""
    window_s: float = 300.0
    """Throughput is measured over the jobs finished in this many recent seconds."""
    json: bool = False
    """Print one JSON object instead of the table."""
    watch: float | None = None
    """Refresh every this many seconds until Ctrl-C."""


def output_progress(out_dirs: list[str]) -> list[dict[str, Any]]:
    """Labelled / source shard counts of each output folder, read from its manifest."""
    rows = []
    for out in out_dirs:
        try:
            manifest = read_manifest(out)
        except DatasetError as exc:
            rows.append({"out": out, "error": str(exc)})
            continue
        source = manifest.get("source") or {}
        feature = source.get("feature") or default_feature_name("text")  # the one this folder adds
        labels = feature_blocks(manifest).get(feature) or {}
        rows.append({"out": out, "labelled": len(manifest["shards"]), "shards": source.get("shards"),
                     "complete": is_complete(manifest), "feature": feature,
                     "modality": labels.get("modality", "text"), "model": labels.get("model"),
                     "layer": labels.get("layer"), "pooling": labels.get("pooling")})
    return rows


def _duration(seconds: float | None) -> str:
    if seconds is None:
        return "unknown"
    minutes, secs = divmod(int(seconds), 60)
    hours, minutes = divmod(minutes, 60)
    return f"{hours}h{minutes:02d}m" if hours else f"{minutes}m{secs:02d}s"


def _history(job: dict[str, Any]) -> str:
    """``, 2 failures, 1 takeover`` for a job that has had either (a worker's error, a dead holder)."""
    parts = [f"{n} {word}{'s' if n != 1 else ''}" for n, word in
             ((job.get("failures", 0), "failure"), (job.get("reclaims", 0), "takeover")) if n]
    return "".join(f", {p}" for p in parts)


def format_status(stats: dict[str, Any], outputs: list[dict[str, Any]]) -> str:
    recent = stats["recent"]
    lines = [
        f"queue {stats['queue']!r}: {stats['waiting']} waiting ({stats.get('retrying', 0)} of them after a "
        f"failure or a takeover), {stats['in_flight']} in flight, {stats['done']} done, "
        f"{stats['dead']} failed (dead letters)",
        f"throughput (last {recent['window_s']:.0f} s): {recent['jobs']} jobs, "
        f"{recent['rows_per_s']:,.1f} rows/s, {recent['jobs_per_min']:.1f} jobs/min; "
        f"{stats['remaining_rows']:,} rows left, ETA {_duration(stats['eta_s'])}",
    ]
    for job in stats["in_flight_jobs"]:
        lines.append(f"  in flight: {job['shard']} -> {job['out']} on {job['worker']} "
                     f"(idle {job['idle_s']:.1f} s, delivery {job['deliveries']}{_history(job)})")
    for job in stats.get("retrying_jobs", []):
        lines.append(f"  retrying: {job['shard']} -> {job['out']}{_history(job) or ' (handed back)'}")
    for dead in stats["dead_letters"]:
        lines.append(f"  dead: {dead.get('shard')} of {dead.get('source')} after "
                     f"{dead.get('attempts')} attempts on {dead.get('worker')}: {dead.get('error')}")
    for out in outputs:
        if "error" in out:
            lines.append(f"  output {out['out']}: {out['error']}")
        else:
            lines.append(f"  output {out['out']}: {out['labelled']}/{out['shards']} shards labelled"
                         f"{' (complete)' if out['complete'] else ''}; {out['feature']}: {out['modality']} features "
                         f"of model {out['model']}, layer {out['layer']}, {out['pooling']} pooling")
    if stats["dead"]:
        lines.append("requeue dead letters after fixing their cause: python -m labelling.status "
                     "--requeue-dead")
    return "\n".join(lines)


@exit_on_user_error
def main(argv: list[str] | None = None) -> None:
    cfg = parse_config(StatusConfig, AREA, COMMAND, argv)
    queue = JobQueue(connect(cfg), cfg.queue)
    if cfg.requeue_dead:
        print(f"requeued {queue.requeue_dead()} dead-lettered jobs on queue {cfg.queue!r}")
    try:
        while True:
            stats = queue.stats(cfg.window_s)
            outputs = output_progress(stats["outputs"])
            if cfg.json:
                print(json.dumps({**stats, "output_progress": outputs}, default=str))
            else:
                print(format_status(stats, outputs), flush=True)
            if cfg.watch is None:
                return
            time.sleep(cfg.watch)
            print()
    except KeyboardInterrupt:  # Ctrl-C ends --watch, also while a report is being read or printed
        if cfg.watch is None:
            raise


if __name__ == "__main__":
    main()
