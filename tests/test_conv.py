"""utils/conv.py: the loop-friendly convolution computes JAX's values and gradients, and covers only
the cases it claims."""

import functools
import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax import lax

from utils.conv import conv_function, loop_friendly_conv

NHWC = ("NHWC", "HWIO", "NHWC")


def loss_of(conv, **options):
    options = {"window_strides": (1, 1), "padding": "SAME", "dimension_numbers": NHWC, **options}
    return lambda x, k: jnp.sum(jnp.sin(conv(x, k, **options)))


@pytest.mark.parametrize("kernel_size,in_channels,out_channels", [(5, 3, 32), (3, 8, 4), (1, 2, 2), (5, 32, 16)])
def test_values_and_both_gradients_match_jax(kernel_size, in_channels, out_channels):
    x = jax.random.normal(jax.random.PRNGKey(0), (3, 11, 9, in_channels))
    kernel = jax.random.normal(jax.random.PRNGKey(1), (kernel_size, kernel_size, in_channels, out_channels))
    options = {"window_strides": (1, 1), "padding": "SAME", "dimension_numbers": NHWC}
    np.testing.assert_allclose(loop_friendly_conv(x, kernel, **options),
                               lax.conv_general_dilated(x, kernel, **options), rtol=1e-5, atol=1e-5)
    expected = jax.grad(loss_of(lax.conv_general_dilated), (0, 1))(x, kernel)
    got = jax.grad(loss_of(loop_friendly_conv), (0, 1))(x, kernel)
    for e, g in zip(expected, got):
        assert g.shape == e.shape and g.dtype == e.dtype
        np.testing.assert_allclose(g, e, rtol=1e-4, atol=1e-4)


def test_gradients_match_inside_a_scan_and_under_vmap():
    """Where training uses it: a loop of steps, and vmapped over seeds."""
    x = jax.random.normal(jax.random.PRNGKey(0), (2, 4, 8, 8, 3))
    kernel = jax.random.normal(jax.random.PRNGKey(1), (2, 5, 5, 3, 4))

    def steps(conv):
        def one_seed(k, frames):
            step = lambda k, x: (k - 0.01 * jax.grad(loss_of(conv), 1)(x, k), None)
            return lax.scan(step, k, frames)[0]
        return jax.jit(jax.vmap(one_seed, in_axes=(0, None)))(kernel, x)

    np.testing.assert_allclose(steps(loop_friendly_conv), steps(lax.conv_general_dilated), rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("options", [
    {"window_strides": (2, 2)},
    {"padding": "VALID"},
    {"padding": ((1, 1), (2, 2))},
    {"rhs_dilation": (2, 2)},
    {"kernel_size": 4},  # even: SAME pads unevenly
    {"dimension_numbers": ("NCHW", "OIHW", "NCHW")},
])
def test_cases_it_does_not_cover_go_to_lax_unchanged(options):
    options = dict(options)
    size = options.pop("kernel_size", 3)
    dims = options.get("dimension_numbers", NHWC)
    x = jnp.ones((2, 8, 8, 8))
    kernel = jnp.ones((size, size, 8, 8)) if dims == NHWC else jnp.ones((8, 8, size, size))
    call = functools.partial(loop_friendly_conv, window_strides=options.pop("window_strides", (1, 1)),
                             padding=options.pop("padding", "SAME"), **{"dimension_numbers": NHWC, **options})
    plain = functools.partial(lax.conv_general_dilated, window_strides=call.keywords["window_strides"],
                              padding=call.keywords["padding"],
                              **{k: v for k, v in call.keywords.items() if k not in ("window_strides", "padding")})
    assert "custom_vjp" not in str(jax.make_jaxpr(call)(x, kernel))
    np.testing.assert_array_equal(call(x, kernel), plain(x, kernel))


def test_the_covered_case_uses_its_own_gradients():
    x, kernel = jnp.ones((1, 6, 6, 2)), jnp.ones((3, 3, 2, 2))
    jaxpr = str(jax.make_jaxpr(lambda x, k: loop_friendly_conv(x, k, (1, 1), "SAME", dimension_numbers=NHWC))(
        x, kernel))
    assert "custom_vjp" in jaxpr


def test_auto_is_loop_friendly_on_the_cpu_and_choices_are_checked():
    assert jax.default_backend() == "cpu"
    assert conv_function("auto") is loop_friendly_conv
    assert conv_function("loop_friendly") is loop_friendly_conv
    assert conv_function("lax") is None  # flax's default
    with pytest.raises(ValueError, match="auto, lax or loop_friendly"):
        conv_function("fast")


def test_the_pixel_torso_has_the_same_parameters_and_gradients_either_way():
    from utils.networks import ActorCritic, ConvTorso, make_torso

    frames = jax.random.uniform(jax.random.PRNGKey(0), (4, 63, 63, 3))

    def build(conv):
        net = ActorCritic(17, torso=make_torso(False, 32, 1, "relu"),
                          shared=functools.partial(ConvTorso, 32, conv=conv))
        return net, net.init(jax.random.PRNGKey(1), frames)

    (plain, params), (friendly, params_friendly) = build("lax"), build("loop_friendly")
    assert jax.tree.structure(params) == jax.tree.structure(params_friendly)
    jax.tree.map(np.testing.assert_array_equal, params, params_friendly)

    def loss(net):
        return lambda p: sum(jnp.sum(jnp.tanh(out)) for out in net.apply(p, frames))

    jax.tree.map(functools.partial(np.testing.assert_allclose, rtol=1e-4, atol=1e-5),
                 jax.grad(loss(friendly))(params), jax.grad(loss(plain))(params))


def test_benchmark_writes_a_table_of_every_variant(tmp_path):
    from benchmarks import conv_grad_loop

    table = tmp_path / "conv.json"
    conv_grad_loop.main(["--cases", "torso", "--steps", "1", "--batch", "2", "--repeats", "1", "--table", str(table)])
    record = json.loads(table.read_text())
    assert record["schema"] == "craftax-baselines/table/1"
    assert [(r["case"], r["variant"]) for r in record["rows"]] == [
        ("torso", "lax"), ("torso", "loop_friendly"), ("torso", "unrolled")]
    assert all(len(r["seconds"]) == 1 and r["seconds"][0] > 0 for r in record["rows"])
    assert record["rows"][0]["speedup"] == [1.0]


def test_benchmark_refuses_bad_arguments():
    from benchmarks import conv_grad_loop

    for argv in (["--cases", "dense"], ["--repeats", "0"]):
        with pytest.raises(SystemExit):
            conv_grad_loop.parse_args(argv)
