"""Monte-Carlo dropout prediction: K forward passes with dropout on, vectorised over keys.

The forward pass is the caller's function ``fn(key, *args)``: it decides which layers are
random (dropout on) and which are frozen (BatchNorm in evaluation mode). This module only
draws the K keys, maps ``fn`` over them (one ``vmap``, or chunks of it with ``lax.map``)
and reduces the K samples to their mean and spread. The Flax shells build ``fn`` from a
model: :func:`dropnorm.linen.mc_dropout_fn` and :func:`dropnorm.nnx.mc_dropout_fn`.
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from dropnorm import _checks


class MCDropoutPrediction(NamedTuple):
    """The result of :func:`mc_dropout`: the predictive mean and the per-class spread.

    Both have the shape of one forward pass's output and at least float32 precision.
    Registered for ``jax.export`` serialisation (as ``"dropnorm.MCDropoutPrediction"``),
    so an exported function may return it.

    Attributes:
      mean: the mean over the K samples of ``softmax(fn(key_k, *args))`` (of
        ``fn(key_k, *args)`` itself with ``softmax=False``): the predictive
        distribution, each row summing to 1.
      std: the standard deviation over the K samples, element by element (divisor K,
        so 0 for K = 1 and for a function that ignores its key).

    Examples:
      >>> import jax, jax.numpy as jnp, dropnorm
      >>> pred = dropnorm.mc_dropout(lambda key, x: x, jax.random.key(0), 4, jnp.zeros(3))
      >>> pred.mean.tolist(), pred.std.tolist()
      ([0.3333333432674408, 0.3333333432674408, 0.3333333432674408], [0.0, 0.0, 0.0])

    References:
      Gal & Ghahramani, "Dropout as a Bayesian Approximation: Representing Model
      Uncertainty in Deep Learning", ICML 2016.
    """

    mean: jax.Array  # the output's shape; promote_types(output dtype, float32)
    std: jax.Array  # the same shape and dtype; >= 0


# Exported functions (jax.export) may return it: a serialised program names it by this key.
jax.export.register_namedtuple_serialization(MCDropoutPrediction,
                                             serialized_name="dropnorm.MCDropoutPrediction")


_FN = "mc_dropout"


def _check_num_samples(num_samples: Any, name: str) -> int:
    if _checks.is_traced(num_samples):
        raise TypeError(
            f"{_FN}: `{name}` must be a Python int (the number of forward passes is a "
            f"shape, so it is static); got a traced value. Pass it as a static argument "
            f"(jax.jit(..., static_argnums=...)) or a constant.")
    if isinstance(num_samples, (bool, np.bool_)) or not isinstance(num_samples,
                                                                   (int, np.integer)):
        hint = (f" Pass int({num_samples!r})." if isinstance(num_samples, float)
                and float(num_samples).is_integer() and num_samples >= 1 else "")
        raise TypeError(
            f"{_FN}: `{name}` must be a positive int (the number K of forward passes with "
            f"dropout on); got {num_samples!r} of type {type(num_samples).__name__}.{hint}")
    if num_samples < 1:
        raise ValueError(
            f"{_FN}: `{name}` must be at least 1 (the number K of forward passes with "
            f"dropout on; 8 to 32 are usual); got {num_samples!r}.")
    return int(num_samples)


def mc_dropout(fn: Callable[..., jax.Array], key: jax.Array, num_samples: int, *args: Any,
               softmax: bool = True, axis: int = -1,
               chunk_size: int | None = None) -> MCDropoutPrediction:
    """Monte-Carlo dropout: the mean and spread of K stochastic forward passes.

    With keys ``k_1, ..., k_K = jax.random.split(key, K)`` and ``p_k = softmax(fn(k_k,
    *args))`` (softmax over ``axis``; ``p_k = fn(k_k, *args)`` with ``softmax=False``)::

        mean = (1 / K) sum_k p_k
        std  = sqrt((1 / K) sum_k (p_k - mean)**2)

    ``mean`` is the predictive distribution of Gal & Ghahramani (2016), dropout read as
    approximate Bayesian inference; ``std`` is the per-class spread of the samples. The K
    passes run as one ``jax.vmap`` over the keys (``chunk_size`` passes at a time with
    ``lax.map`` to bound the memory), in float32 at least, two-pass for the spread.

    ``fn`` is the forward pass with dropout ON and statistics FROZEN; it decides which is
    which. With the pure API that is ``train=True`` for :func:`dropnorm.dropout` and
    ``train=False`` for :func:`dropnorm.batch_norm`; for Flax models,
    :func:`dropnorm.linen.mc_dropout_fn` and :func:`dropnorm.nnx.mc_dropout_fn` make it::

        pred = dropnorm.mc_dropout(dnn.mc_dropout_fn(model, variables, train=False), key, 32, x)
        pred = dropnorm.mc_dropout(dnx.mc_dropout_fn(model), key, 32, x)                # NNX

    Args:
      fn: ``fn(key, *args) -> array``: one forward pass whose randomness comes from
        ``key`` only (so the same key gives the same sample), returning logits (or, with
        ``softmax=False``, the values to average).
      key: a PRNG key; sample ``k`` uses ``jax.random.split(key, K)[k]``.
      num_samples: K, the number of forward passes: a positive Python int. K = 1 is one
        ordinary dropout pass.
      *args: passed to every call of ``fn`` unchanged (not mapped over).
      softmax: True (default) to average the probabilities ``softmax(logits, axis)``;
        False to average ``fn``'s outputs as they are (regression outputs, or a ``fn``
        that returns probabilities itself).
      axis: the class axis of ``fn``'s output, for the softmax.
      chunk_size: None (default) maps all K passes in one ``vmap`` (fastest; K times the
        memory of one pass); an int computes that many at a time (``lax.map``).

    Returns:
      An :class:`MCDropoutPrediction` ``(mean, std)``, each shaped like one pass's
      output, in ``promote_types(output dtype, float32)``.

    Raises:
      TypeError: ``fn`` not callable (or ``fn`` and ``key`` swapped), a malformed key,
        ``num_samples`` or ``chunk_size`` not an int (or traced), or ``fn`` returning
        something other than one floating array.
      ValueError: ``num_samples`` or ``chunk_size`` below 1, or ``axis`` out of range
        for ``fn``'s output.

    Examples:
      >>> import jax, jax.numpy as jnp, dropnorm
      >>> w = jax.random.normal(jax.random.key(0), (16, 3))
      >>> params, state = dropnorm.batch_norm_init(16)
      >>> def f(key, x):  # dropout on (train=True), statistics frozen (train=False)
      ...     h, _ = dropnorm.batch_norm(params, state, x, train=False)
      ...     return dropnorm.dropout(key, jax.nn.relu(h), 0.5, train=True) @ w
      >>> x = jax.random.normal(jax.random.key(1), (5, 16))
      >>> pred = dropnorm.mc_dropout(f, jax.random.key(2), 32, x)
      >>> pred.mean.shape, bool(jnp.allclose(pred.mean.sum(-1), 1.0))
      ((5, 3), True)
      >>> bool(jnp.all(pred.std > 0))  # the K passes differ
      True

    References:
      Gal & Ghahramani, "Dropout as a Bayesian Approximation: Representing Model
      Uncertainty in Deep Learning", ICML 2016.
    """
    if not callable(fn):
        swapped = callable(key) and (_checks.is_key(fn) or isinstance(fn, (jax.Array,
                                                                           np.ndarray)))
        raise TypeError(
            f"{_FN}: `fn` must be a function fn(key, *args) -> logits; got "
            f"{type(fn).__name__}." + (" `fn` and `key` look swapped: the function comes "
                                       "first, mc_dropout(fn, key, num_samples, *args)."
                                       if swapped else ""))
    if key is None:
        raise TypeError(f"{_FN}: `key` is None; the {num_samples!r} forward passes need a PRNG "
                        f"key (jax.random.key(seed)), which is split into one key per pass.")
    key = _checks.check_key(key, _FN)
    k = _check_num_samples(num_samples, "num_samples")
    if chunk_size is not None:
        if _checks.is_traced(chunk_size) or isinstance(chunk_size, (bool, np.bool_)) or (
                not isinstance(chunk_size, (int, np.integer))):
            raise TypeError(f"{_FN}: `chunk_size` must be None or a positive Python int (the "
                            f"number of passes computed at once); got {chunk_size!r}.")
        if chunk_size < 1:
            raise ValueError(f"{_FN}: `chunk_size` must be at least 1 (or None: all "
                             f"{k} passes at once); got {chunk_size!r}.")
    keys = jax.random.split(key, k)

    def one(sample_key):
        out = fn(sample_key, *args)
        if not isinstance(out, (jax.Array, np.ndarray)) or not jnp.issubdtype(
                jnp.asarray(out).dtype, jnp.floating):
            got = (f"an array of dtype {out.dtype}" if hasattr(out, "dtype")
                   else type(out).__name__)
            raise TypeError(
                f"{_FN}: `fn` must return one floating array (the logits of one forward "
                f"pass); got {got}. Return only the output (e.g. drop the new state or "
                f"the mutated collections).")
        return out

    if chunk_size is None:
        samples = jax.vmap(one)(keys)
    else:
        samples = jax.lax.map(one, keys, batch_size=min(int(chunk_size), k))
    class_axis = None
    if softmax:
        if samples.ndim == 1:
            raise ValueError(f"{_FN}: `fn` returns a scalar, which has no class `axis` for the "
                             f"softmax; return logits with a class axis, or pass "
                             f"softmax=False.")
        (class_axis,) = _checks.normalize_axes(axis, samples.ndim - 1, _FN, "axis")
    return _summarise(samples, class_axis)


@functools.partial(jax.jit, static_argnums=1)
def _summarise(samples: jax.Array, class_axis: int | None) -> MCDropoutPrediction:
    """Softmax over ``class_axis`` (None: none) of each sample, then the mean and the
    two-pass spread over the samples (axis 0), in at least float32. One cached jit: eager
    calls compile it once per shape instead of once per operation."""
    samples = samples.astype(jnp.promote_types(samples.dtype, jnp.float32))
    if class_axis is not None:
        samples = jax.nn.softmax(samples, axis=class_axis + 1)
    mean = jnp.mean(samples, axis=0)
    std = jnp.sqrt(jnp.mean(jnp.square(samples - mean), axis=0))
    return MCDropoutPrediction(mean, std)
