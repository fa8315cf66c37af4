"""Argument validation shared by every dropnorm function.

Every check runs at trace time. A concrete (Python or NumPy) value is checked
completely; a traced value can only be checked for its shape and dtype, and the
functions that accept traced values document what they do with bad ones.
"""

from __future__ import annotations

import functools
import math
from collections.abc import Sequence
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np


class Caller(NamedTuple):
    """Who is calling a pure function, so that its errors speak the caller's own terms.

    The public functions use the defaults; the Flax modules pass their own names, e.g.
    ``Caller("dropnorm.linen.BatchNorm", "use_running_average=True", flax_small_batch=True)``.
    """

    fn: str  # the name every message starts with, e.g. "batch_norm" or "dropnorm.nnx.Dropout"
    train_off: str = "train=False"  # the caller's way to stop training, used in hints
    x_name: str = "x"  # the name of the input argument
    flax_small_batch: bool = False  # one value per feature is legal (Flax): output = bias
    state_hint: str | None = None  # how the caller's state got its shape (None: batch_norm_init)


def as_caller(caller: Caller | str) -> Caller:
    return caller if isinstance(caller, Caller) else Caller(caller)


def is_traced(value: Any) -> bool:
    """True when ``value`` is a JAX tracer (its value is unknown at trace time)."""
    return isinstance(value, jax.core.Tracer)


def is_static(n: Any) -> bool:
    """Whether a size is a known integer: False for a symbolic dimension (``jax.export``'s
    shape polymorphism), whose comparisons with numbers may be undecidable at trace time."""
    return isinstance(n, (int, np.integer))


def _describe(value: Any) -> str:
    if isinstance(value, (jax.Array, np.ndarray)):
        return f"an array of shape {tuple(value.shape)} and dtype {value.dtype}"
    return repr(value)


def check_rate(rate: Any, fn: str, name: str = "rate") -> float | jax.Array:
    """Validate a drop probability.

    Returns a Python float when ``rate`` is concrete and a float32 scalar when it
    is traced. A concrete rate must lie in [0, 1]; a traced one must be a real
    scalar (its range is checked where it is used: see ``in_unit_interval``).
    """
    if is_traced(rate):
        return traced_real_scalar(rate, fn, name)
    if isinstance(rate, (bool, str, bytes)) or np.ndim(rate) != 0 or (
        np.asarray(rate).dtype.kind in "bc"  # booleans and complex numbers are no rates
    ):
        raise ValueError(
            f"{fn}: `{name}` must be a real number in [0, 1] (the probability of dropping an "
            f"element); got {_describe(rate)}."
        )
    try:
        value = float(np.asarray(rate))
    except (TypeError, ValueError):
        raise ValueError(
            f"{fn}: `{name}` must be a real number in [0, 1] (the probability of dropping an "
            f"element); got {rate!r}."
        ) from None
    if not (0.0 <= value <= 1.0):  # also rejects NaN
        raise ValueError(
            f"{fn}: `{name}` must be in [0, 1] (the probability of DROPPING an element, not of "
            f"keeping it); got {rate!r}. Use 0 to disable dropout; if you meant a keep "
            f"probability k, pass {name}=1 - k."
        )
    return value


def in_unit_interval(value: jax.Array) -> jax.Array:
    """For a traced rate or momentum: False where it is NaN or outside [0, 1]."""
    return (value >= 0.0) & (value <= 1.0)


def check_train(train: Any, fn: str, name: str = "train") -> bool | jax.Array:
    """A Python bool (static path) or a traced boolean scalar (one compiled function)."""
    if isinstance(train, (bool, np.bool_)):
        return bool(train)
    if isinstance(train, (jax.Array, np.ndarray)) and train.shape == () and train.dtype == bool:
        return train if is_traced(train) else bool(train)
    raise TypeError(
        f"{fn}: `{name}` must be a Python bool or a boolean scalar array (which may be traced); "
        f"got {_describe(train)}. Pass {name}=True for training, {name}=False for evaluation."
    )


def train_from_off_flag(flag: Any, caller: Caller, name: str) -> bool | jax.Array:
    """``not flag`` for a module's ``use_running_average`` or ``deterministic`` (traced flags
    stay traced). True switches training off, the reverse of the pure functions' ``train``,
    so a bad flag gets the module's own hint."""
    try:
        flag = check_train(flag, caller.fn, name)
    except TypeError:
        raise TypeError(
            f"{caller.fn}: `{name}` must be a Python bool or a boolean scalar array (which may "
            f"be traced); got {flag!r}. Pass {caller.train_off.split(' ')[0]} for evaluation, "
            f"{name}=False for training.") from None
    return (not flag) if isinstance(flag, bool) else jnp.logical_not(flag)


@functools.cache
def _raw_key_shape(impl_name: str) -> tuple[int, ...]:
    """Shape of a legacy raw key (``jax.random.PRNGKey``) of the default implementation."""
    del impl_name  # the cache key: the shape follows ``jax_default_prng_impl``
    return tuple(jax.eval_shape(lambda: jax.random.PRNGKey(0)).shape)


def default_raw_key_shape() -> tuple[int, ...]:
    return _raw_key_shape(str(jax.config.jax_default_prng_impl))


def is_key(value: Any) -> bool:
    """True for a typed PRNG key array (``jax.random.key``) of any implementation."""
    dtype = getattr(value, "dtype", None)
    return dtype is not None and jax.dtypes.issubdtype(dtype, jax.dtypes.prng_key)


def check_key(key: Any, fn: str, train_off: str = "train=False",
              name: str = "key") -> jax.Array:
    """A JAX PRNG key: a typed key of any implementation (``jax.random.key(seed, impl=...)``)
    or a raw uint32 key of the default implementation's shape (``jax.random.PRNGKey``:
    ``(2,)`` for threefry, ``(4,)`` under ``jax_default_prng_impl='rbg'`` / ``'unsafe_rbg'``).
    ``name``: the argument's name in the caller's terms (``dropout_rng`` for attention)."""
    if key is None:
        raise TypeError(
            f"{fn}: `{name}` is None but the layer is training, so it needs randomness. Pass a "
            f"key from `jax.random.key(seed)` (split it for each call), or pass {train_off}."
        )
    if isinstance(key, (jax.Array, np.ndarray)):
        if is_key(key):
            if key.shape != ():
                raise TypeError(
                    f"{fn}: `{name}` must be a single PRNG key; got a key array of shape "
                    f"{key.shape}. Index it, or use jax.vmap to map over a batch of keys."
                )
            return key
        raw = default_raw_key_shape()
        if key.dtype == np.uint32 and tuple(key.shape) == raw:
            return jnp.asarray(key)
        if key.dtype == np.uint32 and key.ndim == 1:
            raise TypeError(
                f"{fn}: `{name}` is {_describe(key)}, a raw key, but the default "
                f"PRNG implementation ({jax.config.jax_default_prng_impl}) makes raw keys of "
                f"shape {raw}. Make it with the current default, or use a typed key, "
                f"`jax.random.key(seed, impl=...)`, which carries its implementation."
            )
    raise TypeError(
        f"{fn}: `{name}` must be a JAX PRNG key made by `jax.random.key(seed)` (or the legacy "
        f"`jax.random.PRNGKey(seed)`); got {_describe(key)}."
    )


def check_floating(x: Any, fn: str, name: str = "x", allow_complex: bool = False) -> jax.Array:
    """``x`` as a JAX array of a floating (or, when allowed, complex floating) dtype."""
    if is_key(x):
        raise TypeError(
            f"{fn}: `{name}` is a PRNG key ({x.dtype}), not data: were two arguments swapped? "
            f"Pass the array to normalise or drop as `{name}`."
        )
    x = jnp.asarray(x) if not isinstance(x, jax.Array) else x
    ok = jnp.issubdtype(x.dtype, jnp.floating) or (
        allow_complex and jnp.issubdtype(x.dtype, jnp.complexfloating))
    if not ok:
        kinds = "a floating or complex dtype" if allow_complex else "a floating dtype"
        raise TypeError(
            f"{fn}: `{name}` must have {kinds}; got {x.dtype}. Cast it first, e.g. "
            f"{name}.astype(jnp.float32)."
        )
    return x


def normalize_axes(axis: Any, ndim: int, fn: str, name: str = "axis") -> tuple[int, ...]:
    """Turn an int or a sequence of ints into sorted, non-negative, distinct axes."""
    axes = (axis,) if isinstance(axis, (int, np.integer)) else axis
    if isinstance(axes, bool) or not isinstance(axes, Sequence) or isinstance(axes, str):
        raise ValueError(f"{fn}: `{name}` must be an int or a tuple of ints; got {axis!r}.")
    out = []
    for a in axes:
        if isinstance(a, bool) or not isinstance(a, (int, np.integer)):
            raise ValueError(f"{fn}: `{name}` must be an int or a tuple of ints; got {axis!r}.")
        if not -ndim <= a < ndim:
            raise ValueError(
                f"{fn}: `{name}`={axis!r} is out of range for an input with {ndim} dimensions "
                f"(valid: {-ndim} to {ndim - 1})."
            )
        out.append(int(a) % ndim)
    if len(set(out)) != len(out):
        raise ValueError(f"{fn}: `{name}`={axis!r} names the same axis twice.")
    return tuple(sorted(out))


def real_scalar(value: Any) -> float:
    """``value`` as a Python float if it is a real number (int or float scalar), else NaN.

    Strings, booleans, complex numbers and arrays of more than one dimension are not
    accepted as numbers (``float("0.9")`` or ``float(True)`` would silently succeed).
    """
    if isinstance(value, (bool, str, bytes)) or np.ndim(value) != 0:
        return math.nan
    try:
        arr = np.asarray(value)
    except (TypeError, ValueError):
        return math.nan
    if arr.dtype.kind not in "iuf":
        return math.nan
    return float(arr)


def traced_real_scalar(value: jax.Array, fn: str, name: str) -> jax.Array:
    """A traced number's shape and dtype (all that is known at trace time), as float32."""
    if jnp.ndim(value) != 0 or not (
        jnp.issubdtype(value.dtype, jnp.floating) or jnp.issubdtype(value.dtype, jnp.integer)
    ):
        raise ValueError(
            f"{fn}: `{name}` must be a real scalar; got a traced value of shape "
            f"{jnp.shape(value)} and dtype {value.dtype}."
        )
    return jnp.asarray(value, jnp.float32)


def poison_unless(valid: jax.Array, value: jax.Array) -> jax.Array:
    """``value`` where ``valid``, else NaN: an invalid traced argument cannot raise, so it
    makes every result it touches NaN instead of being clipped or ignored."""
    return jnp.where(valid, value, jnp.nan)


def check_momentum(momentum: Any, fn: str, allow_none: bool = False) -> float | jax.Array | None:
    if momentum is None and allow_none:
        return None
    if is_traced(momentum):
        m = traced_real_scalar(momentum, fn, "momentum")
        return poison_unless(in_unit_interval(m), m)
    value = real_scalar(momentum)
    if not (0.0 <= value <= 1.0):
        extra = " or None (cumulative average, PyTorch's momentum=None)" if allow_none else ""
        raise ValueError(
            f"{fn}: `momentum` must be in [0, 1]{extra}; got {momentum!r}. It is the decay of the "
            f"running average (new = momentum * old + (1 - momentum) * batch); PyTorch's "
            f"momentum m corresponds to 1 - m here (PyTorch 0.1 == 0.9)."
        )
    return value


def check_epsilon(epsilon: Any, fn: str) -> float | jax.Array:
    if is_traced(epsilon):
        e = traced_real_scalar(epsilon, fn, "epsilon")
        return poison_unless(e >= 0.0, e)
    value = real_scalar(epsilon)
    if not value >= 0.0:
        raise ValueError(
            f"{fn}: `epsilon` must be a non-negative number added to the variance; got "
            f"{epsilon!r}. The usual value is 1e-5."
        )
    return value


def check_positive_int(value: Any, fn: str, name: str) -> int:
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value <= 0:
        raise ValueError(f"{fn}: `{name}` must be a positive int; got {value!r}.")
    return int(value)
