"""Convolution gradients inside a loop on the CPU: JAX's own against ``utils.conv``'s, as a measured table.

Every update of this repository runs in ``lax.scan`` loops, and XLA's CPU backend runs the backward
convolutions JAX derives far slower inside a loop body than outside one (``utils/conv.py`` says why the
repository's convolutions use their own gradients there). This script times, in one process and round
robin so that all variants share the machine's load:

- ``layer``: one 5x5 SAME convolution (16 frames of 63x63x32 to 32 channels), gradients of both inputs;
- ``torso``: the pixel actor-critic of the PPO family (``utils.networks.actor_critic``, three conv and
  max-pool stages) on 16 Craftax-Classic-sized frames, gradient steps with Adam;

each as ``--steps`` gradient steps in a ``lax.scan`` with JAX's gradients (``lax``), with ``utils.conv``'s
(``loop_friendly``), and JAX's gradients with the loop unrolled (``unrolled``, the fast reference that
a training loop cannot use: the updates of a chunk are themselves a loop).

    python -m benchmarks.conv_grad_loop                      # about 5 minutes on 2 cores; writes the table
    python -m benchmarks.conv_grad_loop --repeats 1 --table ''   # a quick look, nothing written
"""

from __future__ import annotations

import argparse
import functools
import sys
import time

from benchmarks import records

VARIANTS = ("lax", "loop_friendly", "unrolled")


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="benchmarks.conv_grad_loop", description=__doc__.split("\n\n")[0])
    parser.add_argument("--steps", type=int, default=4, help="gradient steps per timed call (the scan's length)")
    parser.add_argument("--batch", type=int, default=16, help="frames per gradient step")
    parser.add_argument("--repeats", type=int, default=3, help="timed calls per variant, round robin")
    parser.add_argument("--cases", default="layer,torso", help="comma-separated subset of layer,torso")
    parser.add_argument("--table", default="docs/data/conv_grad_loop.json",
                        help="write the measured table here ('' for none); render with python -m benchmarks.report")
    args = parser.parse_args(argv)
    if min(args.steps, args.batch, args.repeats) < 1:
        parser.error("--steps, --batch and --repeats must be at least 1")
    unknown = set(args.cases.split(",")) - {"layer", "torso"}
    if unknown:
        parser.error(f"unknown --cases {sorted(unknown)}; choose from layer, torso")
    return args


def layer_programs(steps: int, batch: int) -> dict:
    """variant -> (jitted scan, its data) for one 5x5 SAME convolution."""
    import jax
    import jax.numpy as jnp
    from jax import lax

    from utils.conv import loop_friendly_conv

    dims = ("NHWC", "HWIO", "NHWC")
    frames = jax.random.normal(jax.random.PRNGKey(0), (steps, batch, 63, 63, 32))
    kernel = jax.random.normal(jax.random.PRNGKey(1), (5, 5, 32, 32)) * 0.05

    def program(conv, unroll):
        def step(total, x):
            loss = lambda x, k: jnp.sum(conv(x, k, (1, 1), "SAME", dimension_numbers=dims) ** 2)
            grad_x, grad_k = jax.grad(loss, (0, 1))(x, kernel)
            return total + grad_x.sum() + grad_k.sum(), None

        return jax.jit(lambda data: lax.scan(step, 0.0, data, unroll=unroll)[0])

    return {"lax": (program(lax.conv_general_dilated, 1), frames),
            "loop_friendly": (program(loop_friendly_conv, 1), frames),
            "unrolled": (program(lax.conv_general_dilated, True), frames)}


def torso_programs(steps: int, batch: int) -> dict:
    """variant -> (jitted scan, its data) for Adam steps on the PPO family's pixel actor-critic."""
    import jax
    import jax.numpy as jnp
    import optax

    from utils import networks

    frames = jax.random.uniform(jax.random.PRNGKey(0), (steps, batch, 63, 63, 3))
    optimizer = optax.adam(3e-4)

    def program(conv, unroll):
        torso = functools.partial(networks.ConvTorso, 128, conv=conv)
        net = networks.ActorCritic(17, torso=networks.make_torso(False, 128, 1, "relu"), shared=torso)
        params = net.init(jax.random.PRNGKey(2), frames[0])

        def loss(params, x):
            logits, value = net.apply(params, x)
            return jax.nn.log_softmax(logits)[:, 0].mean() + jnp.square(value).mean()

        def step(state, x):
            params, opt_state = state
            updates, opt_state = optimizer.update(jax.grad(loss)(params, x), opt_state, params)
            return (jax.tree.map(lambda p, u: p + u, params, updates), opt_state), None

        run = jax.jit(lambda params, data: jax.lax.scan(step, (params, optimizer.init(params)), data,
                                                        unroll=unroll)[0][0])
        return lambda data: run(params, data)

    return {"lax": (program("lax", 1), frames), "loop_friendly": (program("loop_friendly", 1), frames),
            "unrolled": (program("lax", True), frames)}


def measure(programs: dict, repeats: int) -> dict[str, list[float]]:
    """Seconds per call of each variant: one untimed call each (compiles), then ``repeats`` rounds."""
    import jax

    for fn, data in programs.values():
        jax.block_until_ready(fn(data))
    seconds = {name: [] for name in programs}
    for _ in range(repeats):
        for name, (fn, data) in programs.items():
            start = time.perf_counter()
            jax.block_until_ready(fn(data))
            seconds[name].append(time.perf_counter() - start)
    return seconds


def main(argv: list[str] | None = None) -> dict:
    args = parse_args(argv)
    from utils.jax_setup import enable_compilation_cache

    enable_compilation_cache()
    builders = {"layer": layer_programs, "torso": torso_programs}
    rows = []
    for case in args.cases.split(","):
        seconds = measure(builders[case](args.steps, args.batch), args.repeats)
        for name in VARIANTS:
            rows.append({"case": case, "variant": name, "seconds": seconds[name],
                         "speedup": [plain / s for plain, s in zip(seconds["lax"], seconds[name])]})
            print(f"{case:6s} {name:14s} " + " ".join(f"{s:7.3f}" for s in seconds[name]) + " s", flush=True)
    if args.table:
        command = "python -m benchmarks.conv_grad_loop " + " ".join(argv if argv is not None else sys.argv[1:])
        path = records.write_table(
            args.table, name="conv_grad_loop", title="Convolution gradients inside a loop on the CPU",
            command=command.strip(),
            description=(f"{args.steps} gradient steps of {args.batch} frames in one `lax.scan` per call. `layer`: one "
                         "5x5 SAME convolution 63x63x32 to 32 channels; `torso`: the PPO family's pixel "
                         "actor-critic (three conv + max-pool stages, Adam). `lax`: the gradients JAX derives; "
                         "`loop_friendly`: utils/conv.py's, the ones the repository uses on the CPU; `unrolled`: "
                         "JAX's with the loop unrolled, a reference a training loop cannot use. Speed-up: the `lax` "
                         "call of the same round over this one."),
            columns=[{"key": "case", "label": "case"}, {"key": "variant", "label": "gradients"},
                     {"key": "seconds", "label": "seconds per call", "digits": 2},
                     {"key": "speedup", "label": "speed-up over lax", "digits": 1}],
            rows=rows)
        print(f"wrote {path}; render it with python -m benchmarks.report")
    return {"rows": rows}


if __name__ == "__main__":
    main()
