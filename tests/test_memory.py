"""Memory kept for the backward pass, and the derivative rules that make it small.

Residuals are what reverse mode saves between the forward and the backward pass
(the arrays held by the ``jax.vjp`` closure); they are what stays alive across layers
in a deep model. The targets: dropout keeps at most 1 bit per element (it keeps
none: the mask is regenerated from the key in the backward pass), batch_norm at
most the input's own bytes plus per-feature vectors.
The 12-layer training step's compiled temp memory is a deterministic
compile-time figure (``memory_analysis()``), so it is a test, not a benchmark.

The hand-written tangent of batch_norm's training path is checked here against
float64 autodiff of the textbook formula (forward mode, reverse mode, Hessian),
since it is what makes the small residuals possible.
"""

from __future__ import annotations

import math
import pathlib
import sys

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from helpers import random_normal

import dropnorm
import dropnorm.linen as dl

DTYPES = [jnp.float32, jnp.bfloat16]
# Scalars and tiny constants (the key, the rate, literals) that autodiff also keeps as
# residuals: a fixed allowance, independent of the input size.
SMALL = 256


def _residual_bytes(fn, *args) -> int:
    """Bytes of every array the ``jax.vjp`` closure holds: the residuals reverse mode keeps
    (the arrays ``jax.ad_checkpoint.print_saved_residuals`` lists)."""
    _, vjp_fn = jax.vjp(fn, *args)
    return sum(leaf.size * leaf.dtype.itemsize for leaf in jax.tree.leaves(vjp_fn))


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape", [(64, 96), (8, 7, 5, 33)])
@pytest.mark.parametrize("fn", [dropnorm.dropout, dropnorm.alpha_dropout])
def test_dropout_keeps_at_most_one_bit_per_element(fn, shape, dtype):
    x = random_normal(shape, dtype)
    n = math.prod(shape)
    used = _residual_bytes(lambda x: fn(jax.random.key(0), x, 0.1, True), x)
    assert used <= math.ceil(n / 8) + SMALL, (used, n)  # the target: 1 bit per element
    assert used <= SMALL  # what dropnorm does: only the key and the rate, nothing per element
    # A traced rate keeps the same: the rate is a scalar.
    used_traced = _residual_bytes(lambda x, r: fn(jax.random.key(0), x, r, True), x,
                                  jnp.float32(0.1))
    assert used_traced <= SMALL


def test_dropout_with_a_shared_mask_keeps_nothing_per_element_either():
    x = random_normal((16, 32, 32, 8))
    used = _residual_bytes(lambda x: dropnorm.dropout(jax.random.key(0), x, 0.2, True,
                                                      broadcast_dims=(1, 2)), x)
    assert used <= SMALL


@pytest.mark.parametrize("dtype", DTYPES)
def test_flax_dropout_keeps_more_than_one_byte_per_element(dtype):
    # The comparison that makes the bound above meaningful: flax.linen.Dropout keeps a bool
    # mask and a full-size array (the issue measured 5 bytes per element in float32).
    x = random_normal((64, 96), dtype)
    layer = nn.Dropout(0.1, deterministic=False)
    used = _residual_bytes(lambda x: layer.apply({}, x, rngs={"dropout": jax.random.key(0)}), x)
    assert used >= x.size  # at least the bool mask


def _bn_fn(mask=None, axis=-1):
    def f(x, scale, bias):
        params = dropnorm.BatchNormParams(scale, bias)
        _, state = dropnorm.batch_norm_init(scale.shape[0])
        return dropnorm.batch_norm(params, state, x, True, axis=axis, mask=mask)
    return f


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape,axis", [((256, 48), -1), ((8, 6, 6, 32), -1), ((8, 32, 6, 6), 1)])
def test_batch_norm_keeps_at_most_the_input_plus_per_feature_vectors(shape, axis, dtype):
    x = random_normal(shape, dtype, loc=3.0)
    c = shape[axis]
    scale, bias = jnp.full((c,), 1.5), jnp.full((c,), 0.2)
    used = _residual_bytes(_bn_fn(axis=axis), x, scale, bias)
    # x itself, plus at most 16 per-feature vectors of 8 bytes (mean, 1/std, scale, ...).
    assert used <= x.nbytes + 16 * 8 * c + SMALL, (used, x.nbytes)


def test_batch_norm_with_a_mask_keeps_the_input_and_the_mask():
    x = random_normal((64, 40), jnp.bfloat16)
    mask = jnp.arange(64)[:, None] < 50
    scale, bias = jnp.ones(40), jnp.zeros(40)
    used = _residual_bytes(_bn_fn(mask=mask), x, scale, bias)
    assert used <= x.nbytes + x.size + 16 * 8 * 40 + SMALL  # x, a bool mask, vectors


def test_flax_batch_norm_keeps_four_times_a_bf16_input():
    # What the bound above improves on (the issue: two float32 arrays for bf16 input).
    x = random_normal((256, 48), jnp.bfloat16)
    bn = nn.BatchNorm(use_running_average=False, dtype=jnp.bfloat16)
    v = bn.init(jax.random.key(0), x)

    def f(x, params):
        return bn.apply({"params": params, "batch_stats": v["batch_stats"]}, x,
                        mutable=["batch_stats"])[0]

    assert _residual_bytes(f, x, v["params"]) >= 4 * x.nbytes


# The 12-layer model and its compiled-memory figure are the benchmark's own (one definition).
sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[1] / "benchmarks"))
from bench import twelve_layer_temp_bytes  # noqa: E402


def test_twelve_layer_bf16_step_temp_memory_at_most_0_8_of_flax():
    ours = twelve_layer_temp_bytes(dl.BatchNorm, dl.Dropout, batch=256, width=128)
    flax = twelve_layer_temp_bytes(nn.BatchNorm, nn.Dropout, batch=256, width=128)
    # Measured 0.715 on jax 0.10 CPU (256 x 128, and 512 x 256; 0.61-0.72 for variants of the
    # dropout backward); the target is 0.8.
    assert ours <= 0.8 * flax, (ours, flax, ours / flax)


# --- the hand-written tangent of the training path, against float64 autodiff ----------------

def _jvp(f, primals, tangents):
    # Jitted, as the grads and Hessians of the derivative tests: one compile per function
    # instead of one per primitive run eagerly (these tests compiled ~1,200 programs).
    return jax.jit(lambda p, t: jax.jvp(f, p, t)[1])(primals, tangents)


def _textbook(x, scale, bias, mask=None, eps=1e-5):
    red = tuple(range(x.ndim - 1))
    if mask is None:
        mean = x.mean(red, keepdims=True)
        var = jnp.square(x - mean).mean(red, keepdims=True)
    else:
        mask = jnp.broadcast_to(mask, x.shape)
        n = mask.sum(red, keepdims=True)
        mean = jnp.where(mask, x, 0).sum(red, keepdims=True) / n
        var = jnp.where(mask, jnp.square(x - mean), 0).sum(red, keepdims=True) / n
    y = (x - mean) / jnp.sqrt(var + eps) * scale + bias
    return y, mean.reshape(-1), var.reshape(-1)


@pytest.mark.parametrize("with_mask", [False, True])
@pytest.mark.parametrize("loc", [0.0, 1e3])
def test_batch_norm_derivatives_match_float64_autodiff(with_mask, loc):
    # Everything in float64, so the comparison measures the derivative rule, not rounding:
    # 1e-9 relative leaves room for the different summation orders (values up to 1e3 and
    # sums over 120 elements lose ~1e-13).
    with jax.enable_x64(True):
        x = random_normal((24, 5, 3), jnp.float64, seed=1, loc=loc)
        scale = jnp.asarray([1.0, 2.0, 0.5], jnp.float64)
        bias = jnp.asarray([0.0, 1.0, -1.0], jnp.float64)
        mask = (jnp.arange(24)[:, None, None] % 5 != 0) if with_mask else None
        _, state = dropnorm.batch_norm_init(3)

        def ours(x, scale, bias):
            y, new = dropnorm.batch_norm(dropnorm.BatchNormParams(scale, bias), state, x, True,
                                         momentum=0.0, mask=mask)
            return jnp.sum(jnp.sin(y)) + jnp.sum(3.0 * new.mean + new.var)

        def ref(x, scale, bias):
            y, mean, var = _textbook(x, scale, bias, mask)
            return jnp.sum(jnp.sin(y)) + jnp.sum(3.0 * mean + var)

        def close(a, b):
            a, b = np.asarray(a), np.asarray(b)
            np.testing.assert_allclose(a, b, rtol=1e-9, atol=1e-9 * np.abs(b).max())

        for g_ours, g_ref in zip(jax.jit(jax.grad(ours, (0, 1, 2)))(x, scale, bias),
                                 jax.jit(jax.grad(ref, (0, 1, 2)))(x, scale, bias), strict=True):
            close(g_ours, g_ref)
        t = (random_normal(x.shape, jnp.float64, seed=2), jnp.ones(3), jnp.ones(3))
        close(_jvp(ours, (x, scale, bias), t), _jvp(ref, (x, scale, bias), t))
        xs = x[:6, :2]
        h = jax.jit(jax.hessian(lambda v: ours(x.at[:6, :2].set(v), scale, bias)))(xs)
        h_ref = jax.jit(jax.hessian(lambda v: ref(x.at[:6, :2].set(v), scale, bias)))(xs)
        close(h, h_ref)


def test_batch_norm_training_path_works_under_vmap_scan_and_checkpoint():
    x = random_normal((3, 32, 8), jnp.float32)
    params, state = dropnorm.batch_norm_init(8)

    def layer(x):
        return dropnorm.batch_norm(params, state, x, True)[0]

    per_item = jax.vmap(layer)(x)
    for i in range(3):
        np.testing.assert_allclose(per_item[i], layer(x[i]), rtol=1e-6, atol=1e-6)

    def body(carry, xi):
        return carry + jnp.sum(jnp.sin(jax.checkpoint(layer)(xi))), None

    g_scan = jax.grad(lambda x: jax.lax.scan(body, 0.0, x)[0])(x)
    g_loop = jax.grad(lambda x: sum(jnp.sum(jnp.sin(layer(x[i]))) for i in range(3)))(x)
    # float32, same operations in a different program: a few ulps of values of order 1.
    np.testing.assert_allclose(g_scan, g_loop, rtol=1e-5, atol=1e-5)


# --- every training path keeps the input plus per-feature vectors, with the same rule -------

_P = dropnorm.BatchNormParams


def _path(kind):
    """``f(x, scale, bias) -> y`` for one training path of batch_norm (x: (64, 8, 12))."""
    _, state = dropnorm.batch_norm_init(12)
    state = state._replace(mean=jnp.full((12,), 0.5), var=jnp.full((12,), 2.0))

    def bn(x, scale, bias, **kw):
        return dropnorm.batch_norm(_P(scale, bias), state, x, True, **kw)[0]

    if kind == "axis_name, vmap":
        return lambda x, s, b: jax.vmap(lambda xi: bn(xi, s, b, axis_name="i"),
                                        axis_name="i")(x.reshape(8, 8, 8, 12)).reshape(x.shape)
    if kind == "axis_name, shard_map":
        from jax.sharding import Mesh
        from jax.sharding import PartitionSpec as P
        mesh = Mesh(np.array(jax.devices()[:8]), ("d",))
        return jax.shard_map(lambda x, s, b: bn(x, s, b, axis_name="d"), mesh=mesh,
                             in_specs=(P("d"), P(), P()), out_specs=P("d"))
    if kind == "groups":
        return lambda x, s, b: jax.vmap(
            lambda xi: bn(xi, s, b, axis_name="i", axis_index_groups=[[0, 1, 2], [3, 4, 5, 6, 7]]),
            axis_name="i")(x.reshape(8, 8, 8, 12)).reshape(x.shape)
    if kind == "ghost":
        return lambda x, s, b: bn(x, s, b, virtual_batch_size=16)
    if kind == "renorm":
        return lambda x, s, b: dropnorm.batch_renorm(_P(s, b), state, x, True, r_max=1.5,
                                                     d_max=0.5)[0]
    if kind == "traced train":
        return lambda x, s, b: jax.jit(
            lambda x, s, b, t: dropnorm.batch_norm(_P(s, b), state, x, t)[0])(
            x, s, b, jnp.asarray(True))
    if kind == "mask":
        return lambda x, s, b: bn(x, s, b, mask=jnp.arange(64)[:, None, None] % 3 != 0)
    raise ValueError(kind)


PATHS = ["axis_name, vmap", "axis_name, shard_map", "groups", "ghost", "renorm", "traced train",
         "mask"]


@pytest.mark.parametrize("kind", PATHS)
def test_every_training_path_keeps_at_most_the_input_plus_per_feature_vectors(kind):
    # These paths used plain autodiff through the statistics code before (`fast = ... and
    # axis_name is None`); now they share the one custom derivative. Ghost batches keep
    # their vectors per chunk (4 chunks here), a mask its own bytes.
    x = random_normal((64, 8, 12), jnp.float32, loc=3.0)
    scale, bias = jnp.full((12,), 1.5), jnp.full((12,), 0.2)
    used = _residual_bytes(_path(kind), x, scale, bias)
    # With groups every vmap lane (device) has its own group's statistics, so the vectors
    # are per lane (8 lanes); still O(features x devices), not O(input).
    vectors = 16 * 8 * 12 * {"ghost": 4, "groups": 8}.get(kind, 1)
    extra = x.size if kind == "mask" else 0
    assert used <= x.nbytes + extra + vectors + SMALL, (kind, used, x.nbytes)


def _textbook_paths(kind, x, scale, bias, run_mean, run_var, eps=1e-5):
    """Float64 autodiff reference for the paths (the formulas written out plainly)."""
    def bn(x, red):
        mean = x.mean(red, keepdims=True)
        var = jnp.square(x - mean).mean(red, keepdims=True)
        return mean, var

    if kind == "ghost":
        xs = x.reshape((4, 6) + x.shape[1:])
        mean, var = bn(xs, (1, 2))
        return ((xs - mean) / jnp.sqrt(var + eps) * scale + bias).reshape(x.shape)
    if kind == "eval":
        return (x - run_mean) / jnp.sqrt(run_var + eps) * scale + bias
    mean, var = bn(x, (0, 1))
    if kind == "renorm":
        std, run_std = jnp.sqrt(var + eps), jnp.sqrt(run_var + eps)
        r = jax.lax.stop_gradient(jnp.clip(std / run_std, 1 / 1.5, 1.5))
        d = jax.lax.stop_gradient(jnp.clip((mean - run_mean) / run_std, -0.5, 0.5))
        return ((x - mean) / std * r + d) * scale + bias
    return (x - mean) / jnp.sqrt(var + eps) * scale + bias


@pytest.mark.parametrize("kind", ["axis_name", "groups", "ghost", "renorm", "traced train",
                                  "traced eval"])
def test_every_training_path_derivatives_match_float64_autodiff(kind):
    # Float64, so the comparison measures the derivative rule (reverse, forward, Hessian);
    # 1e-9 relative as in the test above. "groups" uses two groups of 4 vmap lanes with the
    # reference computed per group.
    with jax.enable_x64(True):
        x = random_normal((24, 5, 3), jnp.float64, seed=3, loc=2.0)
        scale = jnp.asarray([1.0, 2.0, 0.5], jnp.float64)
        bias = jnp.asarray([0.0, 1.0, -1.0], jnp.float64)
        run_mean = jnp.asarray([1.0, 3.0, 2.5], jnp.float64)
        run_var = jnp.asarray([0.5, 2.0, 4.0], jnp.float64)
        state = dropnorm.BatchNormState(run_mean, run_var, jnp.zeros((), jnp.int32))

        def ours(x, scale, bias):
            p = _P(scale, bias)
            if kind in ("axis_name", "groups"):
                groups = [[0, 1, 2, 3], [4, 5, 6, 7]] if kind == "groups" else None
                y = jax.vmap(lambda xi: dropnorm.batch_norm(
                    p, state, xi, True, axis_name="i", axis_index_groups=groups)[0],
                    axis_name="i")(x.reshape(8, 3, 5, 3)).reshape(x.shape)
            elif kind == "ghost":
                y = dropnorm.batch_norm(p, state, x, True, virtual_batch_size=6)[0]
            elif kind == "renorm":
                y = dropnorm.batch_renorm(p, state, x, True, r_max=1.5, d_max=0.5)[0]
            else:
                y = dropnorm.batch_norm(p, state, x, jnp.asarray(kind == "traced train"))[0]
            return jnp.sum(jnp.sin(y))

        def ref(x, scale, bias):
            if kind == "groups":
                halves = [_textbook_paths("plain", h, scale, bias, run_mean, run_var)
                          for h in (x[:12], x[12:])]
                y = jnp.concatenate(halves)
            else:
                y = _textbook_paths({"traced eval": "eval"}.get(kind, kind), x, scale, bias,
                                    run_mean, run_var)
            return jnp.sum(jnp.sin(y))

        def close(a, b):
            a, b = np.asarray(a), np.asarray(b)
            np.testing.assert_allclose(a, b, rtol=1e-9, atol=1e-9 * np.abs(b).max())

        for g_ours, g_ref in zip(jax.jit(jax.grad(ours, (0, 1, 2)))(x, scale, bias),
                                 jax.jit(jax.grad(ref, (0, 1, 2)))(x, scale, bias), strict=True):
            close(g_ours, g_ref)
        t = (random_normal(x.shape, jnp.float64, seed=4), jnp.ones(3), jnp.ones(3))
        close(_jvp(ours, (x, scale, bias), t), _jvp(ref, (x, scale, bias), t))
        xs = x[:4, :2]
        h = jax.jit(jax.hessian(lambda v: ours(x.at[:4, :2].set(v), scale, bias)))(xs)
        h_ref = jax.jit(jax.hessian(lambda v: ref(x.at[:4, :2].set(v), scale, bias)))(xs)
        close(h, h_ref)


def test_gradient_through_the_running_statistics_in_traced_eval():
    # With a traced train that is False the output depends on the running statistics; the
    # custom rule carries their tangents (test-time adaptation differentiates them).
    with jax.enable_x64(True):
        x = random_normal((16, 3), jnp.float64, seed=5)
        params, _ = dropnorm.batch_norm_init(3, dtype=jnp.float64)

        def ours(mean, var):
            state = dropnorm.BatchNormState(mean, var, jnp.zeros((), jnp.int32))
            return jnp.sum(jnp.sin(dropnorm.batch_norm(params, state, x, jnp.asarray(False))[0]))

        def ref(mean, var):
            return jnp.sum(jnp.sin((x - mean) / jnp.sqrt(var + 1e-5)))

        m, v = jnp.asarray([0.1, -0.2, 0.3]), jnp.asarray([1.0, 2.0, 0.5])
        for a, b in zip(jax.jit(jax.grad(ours, (0, 1)))(m, v), jax.jit(jax.grad(ref, (0, 1)))(m, v),
                        strict=True):
            np.testing.assert_allclose(a, b, rtol=1e-9)
