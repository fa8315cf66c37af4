"""Dot-product attention with dropout on the attention weights, the mask kept by no one.

The weights ``(batch..., heads, q, k)`` are the largest activation of a transformer, and
attention dropout is applied to them. Flax draws a Bernoulli mask of that shape and
reverse mode keeps it, with the softmax's output and the dropped weights, until the
backward pass. Here the queries are processed in chunks of rows (a ``lax.scan``), each
chunk under ``jax.checkpoint``: reverse mode keeps only the inputs (queries, keys, values,
bias, mask) and the mask's 64-bit seed, and the backward pass recomputes one chunk's
weights at a time and regenerates its dropout mask from the seed (``_masks.words_at``:
the hash is counter-based, so any block of the mask computes on its own). Nothing of
size ``q x k`` outlives a chunk. Forward mode (``jax.jvp``) works too: there is no
custom derivative rule, only autodiff of the forward computation.
"""

from __future__ import annotations

import functools
import math
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax

from dropnorm import _checks, _masks

_CALLER = _checks.Caller("dot_product_attention", train_off="deterministic=True",
                         x_name="query")
# The rows of a query chunk are chosen so that one chunk's weights, (batch..., heads, rows,
# k), have about this many elements (2 MiB in float32): the backward pass holds a few such
# arrays at once. On CPU, a training step with chunks of 2**19 weights (128 rows at length
# 512, 32 at 2048, batch 2, 4 heads) was among the fastest of the chunk sizes tried, and one
# pass the slowest (BENCHMARKS.md, "Attention dropout").
_CHUNK_ELEMENTS = 2**19


class _Static(NamedTuple):
    n_q: int  # query rows in all
    chunk: int  # query rows per chunk (n_q: one chunk, no loop)
    mask_shape: tuple[int, ...] | None  # the dropout mask's shape; None: no dropout
    bits: int
    rate: float | None  # a Python rate, else None (traced: the dynamic argument)
    causal: bool
    precision: Any
    dtype: Any  # the computation's dtype (Flax's): the scaled query is rounded to it
    out_dtype: Any
    reps: int  # query heads per key head (grouped-query attention)


def _keep(seed, rate, start, rows: int, static: _Static):
    """This chunk's dropout mask: rows ``start .. start + rows`` of the full mask, exactly
    the mask ``dropout(key, ones(mask_shape), rate, True)`` would draw (same words, same bit
    of each word), so a chunk of the mask regenerates on its own."""
    shape = static.mask_shape
    lead, n_k = shape[:-2], shape[-1]
    lead_n = math.prod(lead)
    r = lax.iota(jnp.uint32, rows)[:, None] + start.astype(jnp.uint32)
    c = lax.iota(jnp.uint32, n_k)[None, :]
    if lead_n == 1:
        index = (r * jnp.uint32(n_k) + c).reshape(lead + (rows, n_k))
    else:
        b = lax.iota(jnp.uint32, lead_n).reshape(lead + (1, 1))
        index = (b * jnp.uint32(static.n_q) + r) * jnp.uint32(n_k) + c
    per_word = 32 // static.bits
    if per_word == 1:
        u = _masks.words_at(seed, index)
    else:
        words = _masks.words_at(seed, index // jnp.uint32(per_word))
        shift = (index % jnp.uint32(per_word)) * jnp.uint32(static.bits)
        u = (words >> shift) & jnp.uint32(2**static.bits - 1)
    r_ = static.rate if static.rate is not None else rate
    k = _masks.keep_threshold(r_, static.bits)
    return _masks.keep_from_bits(u, k, static.bits), _masks.inverse_keep(k, static.bits)


def _chunk(q, k, v, bias, mask, seed, rate, start, static: _Static):
    """Output rows ``start .. start + chunk`` (the whole output for one chunk)."""
    rows = static.chunk
    if rows < static.n_q:  # the chunk's rows of q, and of a bias or mask that has rows
        q = lax.dynamic_slice_in_dim(q, start, rows, q.ndim - 3)
        if bias is not None and bias.shape[-2] != 1:
            bias = lax.dynamic_slice_in_dim(bias, start, rows, bias.ndim - 2)
        if mask is not None and mask.shape[-2] != 1:
            mask = lax.dynamic_slice_in_dim(mask, start, rows, mask.ndim - 2)
    s = jnp.einsum("...qhd,...khd->...hqk", q, k, precision=static.precision)
    if bias is not None:
        s = s + bias.astype(s.dtype)
    valid = None if mask is None else mask.astype(bool)
    if static.causal:
        r = lax.iota(jnp.int32, rows)[:, None] + start
        c = (r >= lax.iota(jnp.int32, s.shape[-1])[None, :])
        valid = c if valid is None else valid & c
    if valid is not None:
        s = jnp.where(valid, s, jnp.finfo(s.dtype).min)  # Flax's value: masked rows uniform
    p = jax.nn.softmax(s, axis=-1)
    if static.mask_shape is not None:
        keep, inv = _keep(seed, rate, start, rows, static)
        p = jnp.where(keep, p * jnp.asarray(inv, p.dtype), jnp.zeros((), p.dtype))
    return jnp.einsum("...hqk,...khd->...qhd", p, v, precision=static.precision)


# Reverse mode keeps a checkpointed chunk's inputs only and recomputes its weights and mask
# in the backward pass. One chunk (no loop): CSE must not merge the recomputation with the
# forward pass. Inside the scan the loop already separates them (prevent_cse=False is
# JAX's advice there).
_chunk_alone = jax.checkpoint(_chunk, static_argnums=(8,))
_chunk_in_loop = jax.checkpoint(_chunk, static_argnums=(8,), prevent_cse=False)


def _prepare(query, key, value, static: _Static):
    """The scaled query and the keys and values, in the softmax's dtype (at least float32;
    gradients accumulate over chunks in it), key heads repeated for grouped queries."""
    cdt = jnp.promote_types(static.dtype, jnp.float32)
    # Flax divides the queries by sqrt(depth) in the computation's dtype, before the product.
    q = (query / jnp.sqrt(query.shape[-1]).astype(static.dtype)).astype(cdt)
    k, v = key.astype(cdt), value.astype(cdt)
    if static.reps > 1:  # query head j reads key head j // reps (flax.nnx's layout)
        k, v = jnp.repeat(k, static.reps, axis=-2), jnp.repeat(v, static.reps, axis=-2)
    return q, k, v


@functools.partial(jax.jit, static_argnums=(7,))
def _attend(query, key, value, bias, mask, seed, rate, static: _Static):
    """The attention output. A jit: an eager call compiles once per shape, not per op."""
    q, k, v = _prepare(query, key, value, static)
    n_q, rows = static.n_q, static.chunk
    if rows >= n_q:
        out = _chunk_alone(q, k, v, bias, mask, seed, rate, jnp.int32(0), static)
    else:
        n = -(-n_q // rows)

        def body(_, i):
            # The last chunk ends at the last row (it may overlap the one before it).
            start = jnp.minimum(i * rows, n_q - rows)
            return None, _chunk_in_loop(q, k, v, bias, mask, seed, rate, start, static)

        _, ys = lax.scan(body, None, jnp.arange(n, dtype=jnp.int32))
        ys = jnp.moveaxis(ys, 0, -4)  # (batch..., n, rows, heads, depth)
        lead, tail = ys.shape[:-4], n_q - (n - 1) * rows
        head = ys[..., :-1, :, :, :].reshape(lead + ((n - 1) * rows,) + ys.shape[-2:])
        out = jnp.concatenate([head, ys[..., -1, rows - tail:, :, :]], axis=-3)
    if static.mask_shape is not None and static.rate is None:
        # A traced rate cannot raise: an invalid one (NaN, < 0, > 1) poisons the output.
        out = _checks.poison_unless(_checks.in_unit_interval(rate), out)
    return out.astype(static.out_dtype)


@functools.partial(jax.jit, static_argnums=(5, 6))
def _weights(query, key, value, bias, mask, static: _Static, weights_dtype):
    """The softmax weights before dropout, in Flax's dtype (what Flax sows)."""
    q, k, _ = _prepare(query, key, value, static)
    causal, precision = static.causal, static.precision
    s = jnp.einsum("...qhd,...khd->...hqk", q, k, precision=precision)
    if bias is not None:
        s = s + bias.astype(s.dtype)
    valid = None if mask is None else mask.astype(bool)
    if causal:
        c = jnp.tril(jnp.ones(s.shape[-2:], bool))
        valid = c if valid is None else valid & c
    if valid is not None:
        s = jnp.where(valid, s, jnp.finfo(s.dtype).min)
    return jax.nn.softmax(s, axis=-1).astype(weights_dtype)


def _sow(module, weights):
    """``module.sow`` of the attention weights, into Flax's collection for its API."""
    from flax import nnx  # a module was given: Flax is installed

    if isinstance(module, nnx.Module):
        module.sow(nnx.Intermediate, "attention_weights", weights)
    else:
        module.sow("intermediates", "attention_weights", weights)


def _shape_error(msg: str):
    return ValueError(f"{_CALLER.fn}: {msg}")


def _check_shapes(q, k, v):
    for name, a in (("query", q), ("key", k), ("value", v)):
        if a.ndim < 3:
            raise _shape_error(
                f"`{name}` must have the shape (batch..., length, heads, depth), at least 3 "
                f"dimensions; got shape {tuple(a.shape)}.")
    if not q.ndim == k.ndim == v.ndim:
        raise _shape_error(
            f"`query`, `key` and `value` must have the same rank; got shapes "
            f"{tuple(q.shape)}, {tuple(k.shape)} and {tuple(v.shape)}.")
    if not q.shape[:-3] == k.shape[:-3] == v.shape[:-3]:
        raise _shape_error(
            f"`query`, `key` and `value` must have the same batch dimensions (all but the last "
            f"3); got shapes {tuple(q.shape)}, {tuple(k.shape)} and {tuple(v.shape)}.")
    if q.shape[-1] != k.shape[-1]:
        raise _shape_error(
            f"`query` and `key` must have the same depth (last axis); got {q.shape[-1]} and "
            f"{k.shape[-1]} (shapes {tuple(q.shape)} and {tuple(k.shape)}).")
    if k.shape[-3] != v.shape[-3]:
        raise _shape_error(
            f"`key` and `value` must have the same length (axis -3); got {k.shape[-3]} and "
            f"{v.shape[-3]} (shapes {tuple(k.shape)} and {tuple(v.shape)}).")
    if k.shape[-2] != v.shape[-2] or q.shape[-2] % k.shape[-2]:
        raise _shape_error(
            f"`key` and `value` must have the same number of heads (axis -2), and `query` "
            f"the same or a multiple of it (grouped-query attention); got {q.shape[-2]}, "
            f"{k.shape[-2]} and {v.shape[-2]} heads.")


def _check_broadcast(a, name: str, shape: tuple[int, ...]):
    """``a`` broadcastable to the weights' shape without growing it, at the weights' rank."""
    ok = a.ndim <= len(shape)
    if ok:
        try:
            ok = np.broadcast_shapes(tuple(a.shape), shape) == shape
        except ValueError:
            ok = False
    if not ok:
        raise _shape_error(
            f"`{name}` must broadcast to the attention weights' shape (batch..., heads, "
            f"q_length, kv_length) = {shape}; got shape {tuple(a.shape)}.")
    return a.reshape((1,) * (len(shape) - a.ndim) + tuple(a.shape))


def _unsupported(name: str, value):
    if value is not None:
        raise ValueError(
            f"{_CALLER.fn}: `{name}` is not supported (got {value!r}): this function computes "
            f"the two products itself, in chunks, to recompute them in the backward pass. Use "
            f"flax's own dot_product_attention for a custom einsum (e.g. AQT quantisation).")


def _promote(q, k, v, dtype, promote_dtype):
    if promote_dtype is not None:
        return promote_dtype((q, k, v), dtype=dtype)
    dtype = jnp.result_type(q, k, v) if dtype is None else dtype
    return tuple(jnp.asarray(a, dtype) for a in (q, k, v))


def dot_product_attention(
    query: jax.typing.ArrayLike,
    key: jax.typing.ArrayLike,
    value: jax.typing.ArrayLike,
    bias: jax.typing.ArrayLike | None = None,
    mask: jax.typing.ArrayLike | None = None,
    broadcast_dropout: bool = True,
    dropout_rng: jax.Array | None = None,
    dropout_rate: float | jax.Array = 0.0,
    deterministic: bool | jax.Array = False,
    dtype: Any = None,
    precision: Any = None,
    module: Any = None,
    force_fp32_for_softmax: bool = False,
    einsum_dot_general: Any = None,
    qk_attn_weights_einsum: Any = None,
    attn_weights_value_einsum: Any = None,
    promote_dtype: Any = None,
    is_causal: bool = False,
    *,
    mask_bits: int = _masks.DEFAULT_BITS,
    query_chunk_size: int | None = None,
) -> jax.Array:
    """Dot-product attention with dropout on the weights, the mask regenerated, not kept.

    ``out = (softmax(q k^T / sqrt(d) + bias, masked) * keep / p) v`` per head, with
    ``keep ~ Bernoulli(p)``, ``p = 1 - dropout_rate``, drawn as :func:`dropout` draws it
    (``keep`` is ``dropout(dropout_rng, ones(w.shape), dropout_rate, True) != 0`` for the
    weights' shape ``w.shape = (batch..., heads, q_length, kv_length)``; with
    ``broadcast_dropout``, ``broadcast_dims`` is every axis but the last two). Masked
    positions get the weight ``finfo.min`` before the softmax, as in Flax (a row with no
    valid position gets uniform weights).

    A drop-in ``attention_fn`` for ``flax.linen.MultiHeadDotProductAttention`` and
    ``flax.nnx.MultiHeadAttention``: the arguments are those of Flax's
    ``dot_product_attention`` (linen's and nnx's), and with dropout off the results are
    Flax's to rounding. What differs is the memory: the queries are processed in chunks,
    and reverse mode keeps only the inputs and the mask's seed. The backward pass
    recomputes a chunk's weights and regenerates its mask, so no ``(q, k)`` array outlives
    a chunk (Flax keeps the weights, the mask and the dropped weights). The softmax is
    computed in float32 (float64 for float64 input) whatever ``force_fp32_for_softmax``
    says; the output has Flax's dtype.

    Args:
      query: ``(batch..., q_length, heads, depth)``.
      key: ``(batch..., kv_length, kv_heads, depth)``; ``heads`` is a multiple of
        ``kv_heads`` (grouped-query attention, as ``flax.nnx``).
      value: ``(batch..., kv_length, kv_heads, v_depth)``.
      bias: added to the logits; broadcastable to ``(batch..., heads, q_length,
        kv_length)``. Differentiable.
      mask: broadcastable like ``bias``; False (0) removes a position.
      broadcast_dropout: share one mask across the batch and head axes (Flax's default).
      dropout_rng: a PRNG key, needed when dropout is on.
      dropout_rate: probability of dropping a weight, in [0, 1]. A Python float takes a
        static path (0: no dropout); a traced scalar serves every rate from one compiled
        function (an invalid traced rate makes the output NaN).
      deterministic: True for no dropout (evaluation). May be traced (``lax.cond``).
      dtype: the computation's dtype (default: promoted from the inputs), as in Flax.
      precision: ``jax.lax.Precision`` of both products.
      module: a Flax module (linen or nnx) to sow the weights before dropout into, as
        Flax's attention does (``intermediates`` / ``nnx.Intermediate``,
        ``attention_weights``); None: nothing is sown.
      force_fp32_for_softmax: Flax's flag; the softmax here is always at least float32.
        With a dtype other than float32 it sets the output dtype as in Flax (the weights
        are float32 then, so the output is promoted).
      einsum_dot_general: must be None (a custom product is not supported).
      qk_attn_weights_einsum: must be None.
      attn_weights_value_einsum: must be None.
      promote_dtype: ``flax.nnx``'s ``promote_dtype`` function, or None (Flax's default
        promotion).
      is_causal: also mask every key after the query's position (``flax.nnx``).
      mask_bits: 16 or 32: the resolution of the keep probability (see :func:`dropout`).
      query_chunk_size: query rows per chunk (default: chunks of about 2**19 weights); the
        last chunk may overlap the one before it. A chunk as long as the queries is one
        pass with no loop.

    Returns:
      ``(batch..., q_length, heads, v_depth)`` in ``dtype`` (promoted with float32 when
      ``force_fp32_for_softmax`` applies, as in Flax). Rate 1 gives zeros and zero
      gradients (never NaN).

    Raises:
      ValueError: inconsistent shapes (rank, batch, depth, length, heads), a ``bias`` or
        ``mask`` that does not broadcast to the weights, a concrete ``dropout_rate``
        outside [0, 1], bad ``mask_bits`` or ``query_chunk_size``, a custom einsum, or
        weights of 2**32 elements or more with dropout on.
      TypeError: a missing or malformed ``dropout_rng`` while dropout is on, a
        non-boolean ``deterministic``, a non-floating ``query``, ``key``, ``value`` or
        ``bias``.

    Examples:
      >>> import jax, jax.numpy as jnp, dropnorm
      >>> q = k = v = jnp.ones((2, 5, 4, 8))  # (batch, length, heads, depth)
      >>> out = dropnorm.dot_product_attention(q, k, v, dropout_rate=0.1,
      ...                                      dropout_rng=jax.random.key(0))
      >>> out.shape
      (2, 5, 4, 8)
      >>> dropnorm.dot_product_attention(q, k, v, deterministic=True)[0, 0, 0, :3].tolist()
      [1.0, 1.0, 1.0]

      With Flax: ``flax.linen.MultiHeadDotProductAttention(num_heads=4, dropout_rate=0.1,
      attention_fn=dropnorm.dot_product_attention)``.

    References:
      Vaswani et al., "Attention Is All You Need", NeurIPS 2017. Srivastava et al.,
      "Dropout: A Simple Way to Prevent Neural Networks from Overfitting", JMLR 2014.
    """
    fn = _CALLER.fn
    for name, value_ in (("einsum_dot_general", einsum_dot_general),
                         ("qk_attn_weights_einsum", qk_attn_weights_einsum),
                         ("attn_weights_value_einsum", attn_weights_value_einsum)):
        _unsupported(name, value_)
    query = _checks.check_floating(query, fn, "query")
    key = _checks.check_floating(key, fn, "key")
    value = _checks.check_floating(value, fn, "value")
    _check_shapes(query, key, value)
    rate = _checks.check_rate(dropout_rate, fn, "dropout_rate")
    train = _checks.train_from_off_flag(deterministic, _CALLER, "deterministic")
    mask_bits = _masks.check_mask_bits(mask_bits, fn)
    query, key, value = _promote(query, key, value, dtype, promote_dtype)
    dtype = query.dtype
    weights_dtype = (jnp.float32 if force_fp32_for_softmax and dtype != jnp.float32
                     else dtype)
    out_dtype = jnp.promote_types(weights_dtype, dtype)

    n_q, heads = query.shape[-3], query.shape[-2]
    shape = query.shape[:-3] + (heads, n_q, key.shape[-3])  # the weights'
    if bias is not None:
        bias = _checks.check_floating(bias, fn, "bias")
        bias = _check_broadcast(bias, "bias", shape)
    if mask is not None:
        mask = jnp.asarray(mask)
        mask = _check_broadcast(mask, "mask", shape)
    if query_chunk_size is None:
        rows = max(1, _CHUNK_ELEMENTS // max(1, math.prod(shape) // n_q))
    else:
        rows = _checks.check_positive_int(query_chunk_size, fn, "query_chunk_size")
    rows = min(rows, n_q)


    def static(drop: bool) -> _Static:
        mask_shape = None
        if drop:
            mask_shape = (1,) * (len(shape) - 2) + shape[-2:] if broadcast_dropout else shape
        # without dropout the rate and bits play no part: one compiled function for all
        return _Static(n_q, rows, mask_shape, mask_bits if drop else _masks.DEFAULT_BITS,
                       rate if drop and isinstance(rate, float) else None, bool(is_causal),
                       precision, dtype, out_dtype, heads // key.shape[-2])

    q, k, v = query, key, value
    if module is not None:
        _sow(module, _weights(q, k, v, bias, mask, static(False), weights_dtype))

    if train is False or (isinstance(rate, float) and rate == 0.0):
        return _attend(q, k, v, bias, mask, None, None, static(False))
    dropout_rng = _checks.check_key(dropout_rng, fn, _CALLER.train_off, "dropout_rng")
    drop_static = static(True)
    if math.prod(drop_static.mask_shape) >= 2**32:
        raise ValueError(
            f"{fn}: the dropout mask would have {math.prod(drop_static.mask_shape)} elements "
            f"(shape {drop_static.mask_shape}), 2**32 or more, which its uint32 index cannot "
            f"address. Split the batch (e.g. jax.lax.map over it), or set "
            f"broadcast_dropout=True.")
    seed = _masks.seed_words(dropout_rng)
    dyn_rate = jnp.float32(0.0) if isinstance(rate, float) else rate

    def drop(q, k, v, bias, mask):
        return _attend(q, k, v, bias, mask, seed, dyn_rate, drop_static)

    if train is True:
        return drop(q, k, v, bias, mask)

    def keep_all(q, k, v, bias, mask):
        return _attend(q, k, v, bias, mask, None, None, static(False))

    return lax.cond(train, drop, keep_all, q, k, v, bias, mask)
