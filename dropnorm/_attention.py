"""Dot-product attention with dropout on the attention weights, the mask kept by no one.

The weights ``(batch..., heads, q, k)`` are the largest activation of a transformer, and
attention dropout is applied to them. Flax draws a Bernoulli mask of that shape and
reverse mode keeps it, with the softmax's output and the dropped weights, until the
backward pass. Here the queries are processed in chunks of rows (a ``lax.scan``), each
chunk under ``jax.checkpoint``: reverse mode keeps only the inputs (queries, keys, values,
bias, mask) and the mask's 64-bit seed, and the backward pass recomputes one chunk's
weights at a time and regenerates its dropout mask from the seed (``_masks.words_at``:
the hash is counter-based, so any block of the mask computes on its own; the element
index is computed per row in 64 bits, the column added with a carry, when the mask has
more than 2**32 elements or a symbolic size). Nothing of size ``q x k`` outlives a chunk.
Forward mode (``jax.jvp``) works too: there is no custom derivative rule, only autodiff
of the forward computation.
"""

from __future__ import annotations

import functools
import math
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
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
# With a symbolic query length (jax.export) the rows per chunk cannot be chosen from it: the
# queries are padded to a multiple of this many rows (32 rows is 2**19 weights at length
# 2048, batch 2, 4 heads: the concrete default's choice there).
_SYMBOLIC_ROWS = 32
# Masks of more elements than this (or of a symbolic size) take the 64-bit element index.
_WIDE_ELEMENTS = 2**32
# The chunk loop's row indices are int32 (lax.scan, dynamic_slice).
_MAX_LENGTH = 2**31 - 1


class _Static(NamedTuple):
    n_q: int  # query rows in all (a symbolic dimension under jax.export)
    chunk: int  # query rows per chunk (n_q: one chunk, no loop); always a Python int
    padded: bool  # n_q is symbolic: pad the queries to whole chunks, then cut the output
    wide: bool  # the mask's element index needs 64 bits (over 2**32 elements, or symbolic)
    mask_shape: tuple[int, ...] | None  # the dropout mask's shape; None: no dropout
    bits: int
    rate: float | None  # a Python rate, else None (traced: the dynamic argument)
    causal: bool
    precision: Any
    dtype: Any  # the computation's dtype (Flax's): the scaled query is rounded to it
    out_dtype: Any
    reps: int  # query heads per key head (grouped-query attention)


def _u32(d) -> jax.Array:
    """A dimension (an int, or a symbolic one under jax.export) as a uint32 scalar."""
    return jnp.asarray(d, jnp.uint32)


def _mul_wide(a: jax.Array, b: jax.Array) -> tuple[jax.Array, jax.Array]:
    """The 64-bit product of uint32 ``a`` and ``b`` as ``(hi, lo)`` uint32, by 16-bit limbs."""
    m = jnp.uint32(0xFFFF)
    a0, a1, b0, b1 = a & m, a >> 16, b & m, b >> 16
    p00, p01, p10 = a0 * b0, a0 * b1, a1 * b0
    mid = (p00 >> 16) + (p01 & m) + (p10 & m)  # < 3 * 2**16: no overflow
    return a1 * b1 + (p01 >> 16) + (p10 >> 16) + (mid >> 16), (mid << 16) | (p00 & m)


def _row_starts(start, rows: int, static: _Static) -> tuple[jax.Array, jax.Array]:
    """The 64-bit flat index ``(hi, lo)`` of the first element of each of the chunk's rows
    in the mask ``static.mask_shape = lead + (n_q, n_k)``: ``(b * n_q + r) * n_k``, shaped
    ``lead + (rows, 1)``. Per row, not per weight: the products cost nothing."""
    shape = static.mask_shape
    lead, n_k = shape[:-2], shape[-1]
    lead_n = math.prod(lead)
    r = lax.iota(jnp.uint32, rows) + start.astype(jnp.uint32)
    if lead_n == 1:  # broadcast_dropout: one mask for every batch and head
        hi, lo = jnp.zeros_like(r), r
    else:
        b = lax.iota(jnp.uint32, lead_n)[:, None]
        hi, lo = _mul_wide(b, _u32(static.n_q))
        lo = lo + r
        hi = hi + (lo < r).astype(jnp.uint32)  # the carry
    top, lo = _mul_wide(lo, _u32(n_k))  # (hi, lo) * n_k, modulo 2**64
    hi = top + hi * _u32(n_k)
    return (hi.reshape(lead + (rows, 1)), lo.reshape(lead + (rows, 1)))


def _keep(seed, rate, start, rows: int, static: _Static):
    """This chunk's dropout mask: rows ``start .. start + rows`` of the full mask, exactly
    the mask ``dropout(key, ones(mask_shape), rate, True)`` would draw (same words, same bit
    of each word), so a chunk of the mask regenerates on its own."""
    shape = static.mask_shape
    lead, n_k = shape[:-2], shape[-1]
    per_word = 32 // static.bits
    if not static.wide:  # at most 2**32 elements: the element index is a uint32
        lead_n = math.prod(lead)
        r = lax.iota(jnp.uint32, rows)[:, None] + start.astype(jnp.uint32)
        c = lax.iota(jnp.uint32, n_k)[None, :]
        if lead_n == 1:
            index = (r * jnp.uint32(n_k) + c).reshape(lead + (rows, n_k))
        else:
            b = lax.iota(jnp.uint32, lead_n).reshape(lead + (1, 1))
            index = (b * jnp.uint32(static.n_q) + r) * jnp.uint32(n_k) + c
        if per_word == 1:
            u = _masks.words_at(seed, index)
        else:
            words = _masks.words_at(seed, index // jnp.uint32(per_word))
            shift = (index % jnp.uint32(per_word)) * jnp.uint32(static.bits)
            u = (words >> shift) & jnp.uint32(2**static.bits - 1)
    else:
        # The element index e = row start + c in 64 bits, (hi, lo) with a carry; the word's
        # index is e // per_word. The word's high half is the row's or one more (the carry):
        # its folded seed is computed per row, both ways, and selected per weight.
        hi, lo = _row_starts(start, rows, static)
        c = lax.iota(jnp.uint32, n_k)
        e_lo = lo + c
        carry = e_lo < c
        if per_word == 1:
            w_lo, w_hi0, w_hi1 = e_lo, hi, hi + 1
        else:  # per_word = 2 (16 bits)
            e_hi = hi + carry.astype(jnp.uint32)
            w_lo, w_hi0, w_hi1 = (e_lo >> 1) | (e_hi << 31), hi >> 1, (hi + 1) >> 1
        k0a, k1a = _masks.fold_hi(seed, w_hi0)
        k0b, k1b = _masks.fold_hi(seed, w_hi1)
        words = _masks.words_at((jnp.where(carry, k0b, k0a), jnp.where(carry, k1b, k1a)), w_lo)
        if per_word == 1:
            u = words
        else:
            shift = (e_lo & jnp.uint32(1)) * jnp.uint32(static.bits)
            u = (words >> shift) & jnp.uint32(2**static.bits - 1)
    r_ = static.rate if static.rate is not None else rate
    k = _masks.keep_threshold(r_, static.bits)
    return _masks.keep_from_bits(u, k, static.bits), _masks.inverse_keep(k, static.bits)


def _chunk(q, k, v, bias, mask, seed, rate, start, static: _Static):
    """Output rows ``start .. start + chunk`` (the whole output for one chunk)."""
    rows = static.chunk
    if static.padded or rows < static.n_q:  # the chunk's rows of q, and of a bias or mask
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
    if _symbolic(static.reps):  # query head j reads key head j // reps, as below
        k, v = (_repeat_heads(a, static.reps) for a in (k, v))
    elif static.reps > 1:  # query head j reads key head j // reps (flax.nnx's layout)
        k, v = jnp.repeat(k, static.reps, axis=-2), jnp.repeat(v, static.reps, axis=-2)
    return q, k, v


def _repeat_heads(a, reps):
    """``jnp.repeat(a, reps, axis=-2)`` for a symbolic ``reps`` (a broadcast and a reshape)."""
    shape = a.shape[:-2] + (a.shape[-2], reps, a.shape[-1])
    a = jnp.broadcast_to(a[..., None, :], shape)
    return a.reshape(shape[:-3] + (shape[-3] * reps, shape[-1]))


@functools.partial(jax.jit, static_argnums=(7,))
def _attend(query, key, value, bias, mask, seed, rate, static: _Static):
    """The attention output. A jit: an eager call compiles once per shape, not per op."""
    q, k, v = _prepare(query, key, value, static)
    n_q, rows = static.n_q, static.chunk
    if static.padded:
        # A symbolic query length: whole chunks of the queries (and of a bias or mask that
        # has rows) padded with zeros, the padding's output cut off.
        n = (n_q + rows - 1) // rows
        q = _pad_rows(q, n * rows - n_q, q.ndim - 3)
        if bias is not None and bias.shape[-2] != 1:
            bias = _pad_rows(bias, n * rows - n_q, bias.ndim - 2)
        if mask is not None and mask.shape[-2] != 1:
            mask = _pad_rows(mask, n * rows - n_q, mask.ndim - 2)

        def step(_, i):
            return None, _chunk_in_loop(q, k, v, bias, mask, seed, rate, i * rows, static)

        _, ys = lax.scan(step, None, jnp.arange(n, dtype=jnp.int32))
        ys = jnp.moveaxis(ys, 0, -4)  # (batch..., n, rows, heads, depth)
        out = ys.reshape(ys.shape[:-4] + (n * rows,) + ys.shape[-2:])[..., :n_q, :, :]
    elif rows >= n_q:
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


def _pad_rows(a, n: int, axis: int):
    """``a`` with ``n`` rows of zeros (False) appended along ``axis`` (``n`` may be symbolic)."""
    pad = [(0, 0)] * a.ndim
    pad[axis] = (0, n)
    return jnp.pad(a, pad)


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


def _symbolic(d) -> bool:
    return jax.export.is_symbolic_dim(d)


def _default_rows(shape: tuple[int, ...]) -> int:
    """Query rows per chunk: chunks of about ``_CHUNK_ELEMENTS`` weights.

    From the weights' concrete sizes only: a symbolic one (``jax.export``) counts as 1, so
    an exported program's chunks hold that many weights per batch element (for a symbolic
    batch) or per key (for a symbolic key length). A symbolic query length takes
    ``_SYMBOLIC_ROWS`` rows.
    """
    if _symbolic(shape[-2]):
        return _SYMBOLIC_ROWS
    per_row = math.prod(d for i, d in enumerate(shape) if i != len(shape) - 2
                        and not _symbolic(d))
    return max(1, _CHUNK_ELEMENTS // max(1, per_row))


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
    for name, a in (("query", q), ("key", k)):
        n = a.shape[-3]
        if not _symbolic(n) and n > _MAX_LENGTH:
            raise _shape_error(
                f"`{name}` has length {n} (axis -3 of shape {tuple(a.shape)}); the chunk "
                f"loop's row indices are int32, so lengths must be below 2**31. Split the "
                f"sequence.")
    if k.shape[-2] != v.shape[-2] or q.shape[-2] % k.shape[-2]:
        raise _shape_error(
            f"`key` and `value` must have the same number of heads (axis -2), and `query` "
            f"the same or a multiple of it (grouped-query attention); got {q.shape[-2]}, "
            f"{k.shape[-2]} and {v.shape[-2]} heads.")


def _check_broadcast(a, name: str, shape: tuple[int, ...]):
    """``a`` broadcastable to the weights' shape without growing it, at the weights' rank.

    Each axis is 1 or the weights' size; a symbolic size (``jax.export``) is the weights'
    size when it is the same expression (``l`` and ``l``), not when it only could be."""
    ok = a.ndim <= len(shape) and all(
        d == 1 or d == s for d, s in zip(tuple(a.shape)[::-1], shape[::-1], strict=False))
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

    Any size: the mask's element index is a 64-bit counter (weights of 2**32 elements and
    more, e.g. batch 8 x 32 heads x length 8192, draw :func:`dropout`'s mask too). Under
    ``jax.export`` with symbolic shapes: the rows per chunk come from the concrete sizes
    alone (a symbolic batch or key length counts as 1, so an exported program's chunk holds
    about 2**19 weights per batch element or per key); with a symbolic query length the
    queries are padded to whole chunks of 32 rows (``query_chunk_size`` rows if given) and
    the padding's output cut off; the mask is the same bits as in a jitted call.

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
      query_chunk_size: query rows per chunk (default: chunks of about 2**19 weights; see
        above for symbolic shapes); the last chunk may overlap the one before it. A chunk
        as long as the queries is one pass with no loop.

    Returns:
      ``(batch..., q_length, heads, v_depth)`` in ``dtype`` (promoted with float32 when
      ``force_fp32_for_softmax`` applies, as in Flax). Rate 1 gives zeros and zero
      gradients (never NaN).

    Raises:
      ValueError: inconsistent shapes (rank, batch, depth, length, heads), or a ``bias``
        or ``mask`` that does not broadcast to the weights (a symbolic size matches only the
        same expression: query heads ``2*h`` for key heads ``h``, not ``g``), a query or
        key length of 2**31 or more (the chunk loop's indices are int32), a concrete
        ``dropout_rate`` outside [0, 1], bad ``mask_bits`` or ``query_chunk_size``, or a
        custom einsum.
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
    if query_chunk_size is not None:
        rows = _checks.check_positive_int(query_chunk_size, fn, "query_chunk_size")
    else:
        rows = _default_rows(shape)
    padded = _symbolic(n_q)
    if not padded:
        rows = min(rows, n_q)

    def static(drop: bool) -> _Static:
        mask_shape, wide = None, False
        if drop:
            mask_shape = (1,) * (len(shape) - 2) + shape[-2:] if broadcast_dropout else shape
            size = math.prod(mask_shape)
            wide = _symbolic(size) or size > _WIDE_ELEMENTS
        # without dropout the rate and bits play no part: one compiled function for all
        return _Static(n_q, rows, padded, wide, mask_shape,
                       mask_bits if drop else _masks.DEFAULT_BITS,
                       rate if drop and isinstance(rate, float) else None, bool(is_causal),
                       precision, dtype, out_dtype, heads // key.shape[-2])

    q, k, v = query, key, value
    if module is not None:
        _sow(module, _weights(q, k, v, bias, mask, static(False), weights_dtype))

    if train is False or (isinstance(rate, float) and rate == 0.0):
        return _attend(q, k, v, bias, mask, None, None, static(False))
    dropout_rng = _checks.check_key(dropout_rng, fn, _CALLER.train_off, "dropout_rng")
    drop_static = static(True)
    seed = _masks.seed_words(dropout_rng)
    dyn_rate = jnp.float32(0.0) if isinstance(rate, float) else rate

    def drop(q, k, v, bias, mask):
        return _attend(q, k, v, bias, mask, seed, dyn_rate, drop_static)

    if train is True:
        return drop(q, k, v, bias, mask)

    def keep_all(q, k, v, bias, mask):
        return _attend(q, k, v, bias, mask, None, None, static(False))

    return lax.cond(train, drop, keep_all, q, k, v, bias, mask)
