"""Queue every shard of a trajectory dataset that is not labelled yet.

    python -m labelling.enqueue --dataset runs/data/classic --out runs/data/classic-qwen \\
        --model Qwen/Qwen2.5-0.5B-Instruct --layer -1 --pooling last
    python -m labelling.enqueue --dataset runs/data/pixels --out runs/data/pixels-vlm --model runs/tiny_vlm

The model decides the modality (``--modality auto``): a vision-language model labels the frames of
a pixel dataset (image features, stored as ``image_hidden_state``), a text LLM the canonical texts
of a symbolic one (``hidden_state``); the other pairings are refused here in one line. A labelled
dataset given as ``--dataset`` keeps its features and gets one more (``--feature NAME`` when the
default name is taken), so text and image features can sit side by side.

The LLM fields (model, layer, pooling, template, system prompt, backend, dtype) are fixed here
and travel with every job, so all workers label identically; the output folder's manifest gets
its ``labels`` block now, and enqueueing other labels into the same folder is refused. The model's
config is checked (path, layer range) without loading weights; GPU and vLLM checks happen in the
workers. Shards already labelled, waiting, in flight or dead-lettered are skipped, so running
this twice is harmless, and after adding shards to the dataset it queues just the new ones.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path

from labelling.labels import check_modality, check_source_features, labels_block, resolve_feature, update_manifest
from labelling.queue import JobQueue, QueueConfig, connect, job_fields, redact_url
from utils.config import parse_config
from utils.errors import UserError, exit_on_user_error
from utils.io import check_output_path
from utils.llm import LLMSpec, check_spec, resolve_modality
from utils.text_obs import obs_layout
from utils.trajectories import read_manifest

AREA, COMMAND = "labelling", "enqueue"


@dataclasses.dataclass
class EnqueueConfig(LLMSpec, QueueConfig):
    """Queue the unlabelled shards of a trajectory dataset for labelling workers."""

    dataset: str = ""
    """Trajectory dataset folder (written by --save-trajectories)."""
    out: str | None = None
    """Output folder for the labelled dataset; default <dataset>-labelled."""
    feature: str | None = None
    """Array the features are stored under; default hidden_state (text features) or image_hidden_state
    (image features). Another name adds a second feature of the same modality to a labelled --dataset."""

    def spec(self) -> LLMSpec:
        """The LLM fields as an LLMSpec; a local model folder becomes an absolute path, so workers
        started elsewhere and later readers of the manifest find it."""
        spec = LLMSpec(**{f.name: getattr(self, f.name) for f in dataclasses.fields(LLMSpec)})
        local = Path(spec.model).expanduser()
        return spec.replace(model=str(local.resolve())) if spec.model and local.exists() else spec

    def out_dir(self) -> Path:
        return Path(self.out) if self.out else Path(str(Path(self.dataset)).rstrip("/") + "-labelled")


@dataclasses.dataclass
class EnqueueResult:
    out: Path
    queued: int
    already_labelled: int
    already_queued: int
    dead: int


def enqueue(cfg: EnqueueConfig, client=None) -> EnqueueResult:
    """Check the inputs, write the output manifest, and queue the missing shards."""
    if not cfg.dataset:
        raise UserError("pass --dataset with the trajectory dataset folder to label")
    source = Path(cfg.dataset)
    manifest = read_manifest(source)
    out = cfg.out_dir()
    check_output_path(out, "--out", "dir")
    if out.resolve() == source.resolve():
        raise UserError(f"--out {out} is the source dataset; labels go to a separate folder")
    spec = cfg.spec()
    check_spec(spec)
    spec = resolve_modality(spec)  # jobs and the manifest say text or image, never auto
    check_modality(manifest, spec.modality, str(source))
    if spec.modality == "text":
        obs_layout(manifest["env_name"])  # an env without a text renderer: say so now
    feature = resolve_feature(cfg.feature, spec.modality)
    check_source_features(manifest, feature, str(source))
    client = client if client is not None else connect(cfg)
    queue = JobQueue(client, cfg.queue)
    with queue.manifest_lock(str(out.resolve())):
        update_manifest(source, out, labels_block(spec, None), feature)
    dead = queue.dead_keys()
    result = EnqueueResult(out=out, queued=0, already_labelled=0, already_queued=0, dead=0)
    for entry in manifest["shards"]:
        fields = job_fields(str(source), str(out), entry["file"], int(entry["rows"]), spec, feature)
        if (out / entry["file"]).is_file():
            result.already_labelled += 1
        elif queue.add(fields) is not None:
            result.queued += 1
        elif fields["key"] in dead:
            result.dead += 1
        else:
            result.already_queued += 1
    return result


@exit_on_user_error
def main(argv: list[str] | None = None) -> None:
    cfg = parse_config(EnqueueConfig, AREA, COMMAND, argv)
    check_output_path(cfg.out_dir() if cfg.dataset else None, "--out", "dir")  # before connecting to Redis
    result = enqueue(cfg)
    print(f"queued {result.queued} shards of {cfg.dataset} for {result.out} on queue {cfg.queue!r} "
          f"({result.already_labelled} already labelled, {result.already_queued} already queued"
          f"{f', {result.dead} in the dead-letter stream' if result.dead else ''})")
    if result.dead:
        print("dead letters stay out until you requeue them: python -m labelling.status "
              "--requeue-dead")
    if result.queued:
        print("label them with: python -m labelling.worker"
              + (f" --redis-url {redact_url(cfg.redis_url)}" if cfg.redis_url else "")
              + (f" --queue {cfg.queue}" if cfg.queue != QueueConfig.queue else "")
              + (f" --embedded-redis {cfg.embedded_redis}"
                 if not cfg.redis_url and cfg.embedded_redis != QueueConfig.embedded_redis else ""))


if __name__ == "__main__":
    main()
