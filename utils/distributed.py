"""Several processes (hosts) in one run: ``jax.distributed.initialize`` from Slurm's environment.

Every process of a multi-host run calls :func:`initialize` before JAX touches a device; afterwards
``jax.devices()`` lists the devices of all processes, and a mesh over them (``utils.parallel``) splits
the envs over every host's devices in one global program. Where the processes come from:

- under ``srun`` (one task per node, ``scripts/sbatch/ppo_multinode.sbatch``): ``SLURM_NTASKS``,
  ``SLURM_PROCID`` and the first host of ``SLURM_STEP_NODELIST`` (or ``SLURM_JOB_NODELIST``), with the
  coordinator's port derived from ``SLURM_JOB_ID`` unless ``CRAFTAX_COORDINATOR_PORT`` names one;
- anywhere else (two local processes in a test, another launcher): ``CRAFTAX_COORDINATOR`` (host:port),
  ``CRAFTAX_NUM_PROCESSES`` and ``CRAFTAX_PROCESS_ID``, which also override Slurm's values.

One process (no variables, or one task) initialises nothing, so single-process runs are unchanged.
On CPUs the processes exchange data through gloo (``jax_cpu_collectives_implementation``).
"""

from __future__ import annotations

import os
import re
from typing import Mapping, NamedTuple

from utils.errors import UserError


class ProcessSpec(NamedTuple):
    coordinator: str  # host:port of process 0
    num_processes: int
    process_id: int


def first_host(nodelist: str) -> str:
    """The first host of a Slurm node list: 'gpu[003-005,9],cpu1' -> 'gpu003'; 'a1,b2' -> 'a1'."""
    match = re.match(r"([^,\[]+)(?:\[([^\],-]+))?", nodelist.strip())
    if not match:
        raise UserError(f"cannot read a host from the Slurm node list {nodelist!r}")
    return match.group(1) + (match.group(2) or "")


def process_spec(environ: Mapping[str, str] | None = None) -> ProcessSpec | None:
    """Who this process is in a multi-process run, from the environment; None for a single process."""
    env = os.environ if environ is None else environ
    try:
        if "CRAFTAX_COORDINATOR" in env:
            spec = ProcessSpec(env["CRAFTAX_COORDINATOR"], int(env["CRAFTAX_NUM_PROCESSES"]),
                               int(env["CRAFTAX_PROCESS_ID"]))
        elif int(env.get("SLURM_NTASKS", "1")) > 1 and "SLURM_PROCID" in env:
            nodelist = env.get("SLURM_STEP_NODELIST") or env.get("SLURM_JOB_NODELIST")
            if not nodelist:
                raise UserError("SLURM_NTASKS > 1 but no SLURM_STEP_NODELIST/SLURM_JOB_NODELIST: launch with srun")
            port = env.get("CRAFTAX_COORDINATOR_PORT") or str(61440 + int(env.get("SLURM_JOB_ID", "0")) % 4096)
            spec = ProcessSpec(f"{first_host(nodelist)}:{port}", int(env["SLURM_NTASKS"]), int(env["SLURM_PROCID"]))
        else:
            return None
    except KeyError as missing:
        raise UserError(f"CRAFTAX_COORDINATOR is set but {missing.args[0]} is not; set all three or none") from None
    except ValueError as error:
        raise UserError(f"bad process count or id in the environment: {error}") from None
    if not 0 <= spec.process_id < spec.num_processes:
        raise UserError(f"process id {spec.process_id} is outside 0..{spec.num_processes - 1}")
    return spec if spec.num_processes > 1 else None


def initialize(environ: Mapping[str, str] | None = None) -> ProcessSpec | None:
    """``jax.distributed.initialize`` for a multi-process run (nothing for one process); must run before
    any JAX computation. Returns the spec it used."""
    spec = process_spec(environ)
    if spec is None:
        return None
    import jax

    jax.config.update("jax_cpu_collectives_implementation", "gloo")
    # At exit every process waits for the others at a shutdown barrier (default 300 s). The last steps
    # (evaluation, the final checkpoint) can finish minutes apart on a loaded machine; a process that
    # really died is reported by the heartbeat instead, so a long wait here costs nothing.
    timeout = int(os.environ.get("CRAFTAX_SHUTDOWN_TIMEOUT_S", "1800"))
    jax.distributed.initialize(spec.coordinator, spec.num_processes, spec.process_id,
                               shutdown_timeout_seconds=timeout)
    return spec
