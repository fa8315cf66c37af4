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

