"""The one Orbax wrapper every JAX area checkpoints through.

Each checkpoint holds the training state (any pytree of arrays) and a JSON record of the config,
the step and the format version, so a checkpoint can be understood without the code that wrote it.
Orbax writes into a temporary folder and renames it when complete, so a run killed mid-save keeps
its previous checkpoint intact.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import jax
import orbax.checkpoint as ocp

FORMAT_VERSION = 1


class Checkpointer:
    """Save and restore ``(state, meta)`` pairs under ``directory/<step>/``."""

    def __init__(self, directory: str | Path, max_to_keep: int = 2):
        self.directory = Path(directory).absolute()
        options = ocp.CheckpointManagerOptions(max_to_keep=max_to_keep, create=True)
        self._manager = ocp.CheckpointManager(
            self.directory, options=options, item_names=("state", "meta")
        )

    def latest_step(self) -> int | None:
        return self._manager.latest_step()

    def save(self, step: int, state: Any, meta: dict) -> None:
        """Write asynchronously; the next save or ``close`` waits for it to finish."""
        record = {**meta, "step": int(step), "format_version": FORMAT_VERSION}
        self._manager.save(
            step,
            args=ocp.args.Composite(
                state=ocp.args.StandardSave(state), meta=ocp.args.JsonSave(record)
            ),
            force=True,
        )

    def restore(self, step: int, like: Any) -> tuple[Any, dict]:
        """Restore the state at ``step`` into the structure, shapes and dtypes of ``like``."""
        abstract = jax.tree.map(ocp.utils.to_shape_dtype_struct, like)
        restored = self._manager.restore(
            step,
            args=ocp.args.Composite(
                state=ocp.args.StandardRestore(abstract), meta=ocp.args.JsonRestore()
            ),
        )
        return restored["state"], self._checked_meta(step, restored["meta"])

    def restore_fields(self, step: int, like: dict[str, Any]) -> tuple[dict[str, Any], dict]:
        """Restore only some fields of the saved state, e.g. ``{"params": params_like}`` (nested
        dicts select nested fields), as a dict shaped like ``like``. The rest (env states, replay
        buffers) is never read, so loading a policy costs its parameters' size only."""
        abstract = jax.tree.map(ocp.utils.to_shape_dtype_struct, like)
        device = jax.sharding.SingleDeviceSharding(jax.devices()[0])
        restore_args = jax.tree.map(lambda _: ocp.ArrayRestoreArgs(sharding=device), abstract)
        restored = self._manager.restore(
            step,
            args=ocp.args.Composite(
                state=ocp.args.PyTreeRestore(item=abstract, restore_args=restore_args, partial_restore=True),
                meta=ocp.args.JsonRestore(),
            ),
        )
        return dict(restored["state"]), self._checked_meta(step, restored["meta"])

    def _checked_meta(self, step: int, meta: Any) -> dict:
        meta = dict(meta)
        if meta.get("format_version") != FORMAT_VERSION:
            from utils.errors import UserError

            raise UserError(
                f"checkpoint {self.directory / str(step)} has format version "
                f"{meta.get('format_version')}, this code reads version {FORMAT_VERSION}"
            )
        return meta

    def close(self) -> None:
        self._manager.wait_until_finished()
        self._manager.close()
