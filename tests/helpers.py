"""Shared test helpers: float64 NumPy references for batch norm, binomial bounds, trace counters.

Everything here is plain NumPy in float64 (the oracle) or small utilities; no test
file should copy these.
"""

from __future__ import annotations

import functools
import math

import jax
import jax.extend
import jax.numpy as jnp
import numpy as np

# Tolerances for comparing an output of dtype `dt` with the float64 reference, for values of
# order 1-10 (normalised activations). The statistics are computed in float32 (or float64),
# so the error is dominated by the final rounding to the output dtype: half an ulp of a value
# up to ~8 is 2**-8 * 8 / 2 = 1.6e-2 for bfloat16 (8-bit mantissa) and 2**-11 * 8 / 2 = 2e-3
# for float16 (11-bit); float32 gets ~100 ulps of headroom for the summation order, float64
# a generous 1e-10.
TOL = {
    jnp.dtype(jnp.bfloat16): 2e-2,
    jnp.dtype(jnp.float16): 3e-3,
    jnp.dtype(jnp.float32): 1e-5,
    jnp.dtype(jnp.float64): 1e-10,
}


def f64(a) -> np.ndarray:
    """Any array (including bfloat16 JAX arrays) as a float64 NumPy array, exactly."""
    return np.asarray(a).astype(np.float64)


def feature_axes(axis, ndim: int) -> tuple[int, ...]:
    """The feature axes for ``axis`` (an int or a tuple of ints), sorted and non-negative."""
    axes = (axis,) if isinstance(axis, int) else tuple(axis)
    return tuple(sorted(a % ndim for a in axes))


def reduction_axes(axis, ndim: int) -> tuple[int, ...]:
    feats = feature_axes(axis, ndim)
    return tuple(a for a in range(ndim) if a not in feats)


def stats_shape(x_shape, axis) -> tuple[int, ...]:
    """``x``'s rank with size 1 on every reduction axis (broadcasts against ``x``)."""
    feats = feature_axes(axis, len(x_shape))
    return tuple(d if a in feats else 1 for a, d in enumerate(x_shape))


def feature_shape(x_shape, axis) -> tuple[int, ...]:
    return tuple(x_shape[a] for a in feature_axes(axis, len(x_shape)))


def ref_moments(x, axis=-1, mask=None):
    """Per-feature mean, BIASED variance and element count in float64 (two-pass, exact).

    Returns arrays of the feature shape. ``mask`` (broadcastable to ``x``) selects
    the elements that count; a feature with no element gets mean 0, var 0, count 0.
    """
    x = f64(x)
    red = reduction_axes(axis, x.ndim)
    m = np.ones(x.shape, bool) if mask is None else np.broadcast_to(np.asarray(mask, bool), x.shape)
    count = m.sum(red, keepdims=True).astype(np.float64)
    safe = np.maximum(count, 1.0)
    mean = np.where(m, x, 0.0).sum(red, keepdims=True) / safe
    var = np.where(m, (x - mean) ** 2, 0.0).sum(red, keepdims=True) / safe
    fshape = feature_shape(x.shape, axis)
    return mean.reshape(fshape), var.reshape(fshape), count.reshape(fshape)


def ref_normalize(x, axis, mean, var, scale=None, bias=None, epsilon=1e-5):
    """``(x - mean) / sqrt(var + epsilon) * scale + bias`` in float64, stats of feature shape."""
    x = f64(x)
    sshape = stats_shape(x.shape, axis)
    y = (x - f64(mean).reshape(sshape)) / np.sqrt(f64(var).reshape(sshape) + epsilon)
    if scale is not None:
        y = y * f64(scale).reshape(sshape)
    if bias is not None:
        y = y + f64(bias).reshape(sshape)
    return y


def ref_batch_norm_train(x, axis=-1, scale=None, bias=None, epsilon=1e-5, mask=None):
    """Training-mode batch norm in float64: ``(y, batch_mean, batch_var, count)``."""
    mean, var, count = ref_moments(x, axis, mask)
    return ref_normalize(x, axis, mean, var, scale, bias, epsilon), mean, var, count


def ref_running_update(old_mean, old_var, batch_mean, batch_var, momentum, *, count=None,
                       step=None, unbiased=False):
    """The running-average update in float64 (Flax/Keras convention).

    ``new = momentum * old + (1 - momentum) * batch``; ``momentum=None`` is the
    cumulative average, ``old + (batch - old) / step`` with ``step`` the number of
    updates including this one. ``unbiased`` uses ``var * count / (count - 1)``.
    """
    old_mean, old_var = f64(old_mean), f64(old_var)
    batch_mean, batch_var = f64(batch_mean), f64(batch_var)
    if unbiased:
        batch_var = batch_var * count / (count - 1.0)
    if momentum is None:
        w = 1.0 / step
        return old_mean + w * (batch_mean - old_mean), old_var + w * (batch_var - old_var)
    return (momentum * old_mean + (1 - momentum) * batch_mean,
            momentum * old_var + (1 - momentum) * batch_var)


def optimised_jit(fun, **kwargs):
    """``jax.jit`` with XLA's full code generation, for the few tests that run one program on
    millions of elements (statistical samples of masks).

    tests/conftest.py compiles the suite without LLVM's optimisation passes, which makes its
    thousands of small compiles fast but leaves large element-wise programs several times
    slower to run (DropBlock on 4M elements: 0.5 s instead of 0.03 s). This compile asks for
    the default optimisation level again; the program computed is the same (a mask is bits,
    identical at every level)."""
    return jax.jit(fun, compiler_options={"xla_backend_optimization_level": 3}, **kwargs)


def binomial_bounds(n: int, p: float, z: float = 6.0) -> tuple[float, float]:
    """Bounds for a Binomial(n, p) count: ``n p -/+ z sqrt(n p (1 - p))``.

    With z = 6 a correct sampler falls outside with probability < 2e-9 (normal
    approximation, good for the n >= 1e4 used here); keys are fixed, so the tests
    are deterministic anyway, and a wrong probability by a few standard
    deviations fails them.
    """
    sd = math.sqrt(n * p * (1.0 - p))
    return n * p - z * sd, n * p + z * sd


def quantised_keep(rate: float, bits: int) -> float:
    """The keep probability dropout really uses: ``round((1 - rate) 2**bits) / 2**bits``.

    Written out here independently of ``dropnorm._masks`` (see its docstring).
    """
    return round((1.0 - rate) * 2**bits) / 2**bits


class TraceCounter:
    """Wrap a function and count how many times JAX traces it (its Python body runs)."""

    def __init__(self, fn):
        self.fn = fn
        self.traces = 0
        functools.update_wrapper(self, fn)

    def __call__(self, *args, **kwargs):
        self.traces += 1
        return self.fn(*args, **kwargs)


def primitive_names(fn, *args, **kwargs) -> set[str]:
    """Names of every primitive in ``fn``'s jaxpr, including nested sub-jaxprs."""
    names: set[str] = set()

    def walk(jaxpr):
        for eqn in jaxpr.eqns:
            names.add(eqn.primitive.name)
            for sub in jax.extend.core.jaxprs_in_params(eqn.params):
                walk(sub)

    walk(jax.make_jaxpr(fn)(*args, **kwargs).jaxpr)
    return names


def random_normal(shape, dtype=np.float32, seed=0, loc=0.0, scale=1.0) -> jax.Array:
    """A NumPy-generated normal sample as a JAX array of ``dtype``."""
    rng = np.random.default_rng(seed)
    return jnp.asarray((loc + scale * rng.standard_normal(shape)).astype(np.float64), dtype)
