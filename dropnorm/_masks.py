"""Keep-masks from a PRNG key, with exact quantised keep probabilities.

JAX's default generator (threefry) spends one full hash on every 32-bit word
it returns, and ``jax.random.bernoulli`` draws one word per element. Here one
32-bit word feeds ``32 // bits`` elements: with ``bits=8`` a quarter of the
hashes, which is what makes dropout several times cheaper on CPU.

An element is kept when its ``bits``-bit uniform integer ``u`` satisfies
``u < k``, where ``k = round((1 - rate) * 2**bits)``. The keep probability is
therefore exactly ``k / 2**bits``, and kept values are scaled by ``2**bits / k``
so that ``E[y] = x`` holds exactly. The drop rate actually used is ``rate``
rounded to a multiple of ``2**-bits`` (1/256 for 8 bits, 1/65536 for 16 bits;
32 bits is the full-precision option, where the float32 rate sets the
resolution).
"""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
from jax import lax

MASK_BITS = (8, 16, 32)
_UINT = {8: jnp.uint8, 16: jnp.uint16, 32: jnp.uint32}


def uniform_bits(key: jax.Array, shape: tuple[int, ...], bits: int) -> jax.Array:
    """Uniform unsigned integers of ``bits`` bits, shape ``shape``, cut from 32-bit draws."""
    if bits == 32:
        return jax.random.bits(key, shape, jnp.uint32)
    n = math.prod(shape)
    per_word = 32 // bits
    words = jax.random.bits(key, (-(-n // per_word),), jnp.uint32)
    parts = lax.bitcast_convert_type(words, _UINT[bits])  # (words, per_word)
    return parts.reshape(-1)[:n].reshape(shape)


def keep_threshold(rate: float | jax.Array, bits: int):
    """``k = round((1 - rate) * 2**bits)``: a Python int for a Python rate, else float32."""
    if isinstance(rate, float):
        return int(round((1.0 - rate) * 2**bits))
    return jnp.round((1.0 - rate) * jnp.float32(2**bits))


def keep_mask(key: jax.Array, shape: tuple[int, ...], k, bits: int) -> jax.Array:
    """Boolean mask, True with probability exactly ``k / 2**bits``."""
    u = uniform_bits(key, shape, bits)
    if isinstance(k, int):
        if k >= 2**bits:
            return jnp.ones(shape, bool)
        return u < jnp.asarray(k, u.dtype)
    if bits == 32:
        # k may equal 2**32, which uint32 cannot hold: compare in two parts.
        k_lo = jnp.minimum(k, 2.0**32 - 256).astype(jnp.uint32)
        return (u < k_lo) | (k >= 2.0**32)
    return u.astype(jnp.uint32) < k.astype(jnp.uint32)


def inverse_keep(k, bits: int):
    """``2**bits / k``, and 0 where nothing is kept (so rate 1 gives zeros, never inf * 0)."""
    if isinstance(k, int):
        return 0.0 if k == 0 else 2.0**bits / k
    return jnp.where(k > 0, jnp.float32(2.0**bits) / jnp.maximum(k, 1.0), 0.0)


_BIT_WEIGHTS = (1, 2, 4, 8, 16, 32, 64, 128)


def pack_bits(keep: jax.Array) -> jax.Array:
    """A boolean mask packed 8 elements to a byte: uint8 of shape ``(ceil(size / 8),)``.

    This is what reverse mode keeps for the backward pass of dropout (1 bit per
    element): cheaper to store than a bool mask (8 bits) and, on CPU, cheaper to
    read back than to regenerate the mask from the key (see BENCHMARKS.md).
    """
    flat = keep.reshape(-1)
    pad = -flat.size % 8
    if pad:
        flat = jnp.concatenate([flat, jnp.zeros((pad,), bool)])
    bits = flat.reshape(-1, 8).astype(jnp.uint8) * jnp.asarray(_BIT_WEIGHTS, jnp.uint8)
    return jnp.sum(bits, axis=1, dtype=jnp.uint8)  # distinct powers of two: the sum is an OR


def unpack_bits(packed: jax.Array, shape: tuple[int, ...]) -> jax.Array:
    """The inverse of :func:`pack_bits`: the boolean mask of shape ``shape``."""
    bits = (packed[:, None] & jnp.asarray(_BIT_WEIGHTS, jnp.uint8)) != 0
    return bits.reshape(-1)[: math.prod(shape)].reshape(shape)
