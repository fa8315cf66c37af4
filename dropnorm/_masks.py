"""Keep-masks from a PRNG key, with exact quantised keep probabilities.

JAX's default generator (threefry) spends a 20-round hash on every pair of
32-bit words, and ``jax.random.bernoulli`` draws one word per element: on CPU
the random numbers cost several times the memory traffic of the layer. Here
threefry only derives a 64-bit seed from the key; the words are a keyed counter
hash (two xorshift-multiply bijections of the word's index, a few integer
operations per word), and one 32-bit word feeds ``32 // bits`` elements. Both
changes together make dropout memory-bound (BENCHMARKS.md).

An element is kept when its ``bits``-bit uniform integer ``u`` satisfies
``u < k``, where ``k = round((1 - rate) * 2**bits)``. The keep probability is
therefore exactly ``k / 2**bits``, and kept values are scaled by ``2**bits / k``
so that ``E[y] = x`` holds exactly. The drop rate actually used is ``rate``
rounded to a multiple of ``2**-bits`` (1/65536 for 16 bits, the default;
32 bits is the full-precision option, where the float32 rate sets the
resolution).

The hash (constants from Wellons' hash-prospector, chosen there for low avalanche
bias) is not cryptographic; a dropout mask needs uniform, independent bits, and
``tests/test_masks.py`` checks those: every bit position, every 16-bit value, byte
pairs, correlations at power-of-two distances and between neighbouring keys.
"""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
from jax import lax

MASK_BITS = (16, 32)  # offered to users (8 bits was removed: slower than 16, only coarser)
DEFAULT_BITS = 16  # every dropout-family function and module defaults to this (BENCHMARKS.md)
_MAX_HASH_WORDS = 2**32  # the word index is a uint32


def _mix(h: jax.Array, m1: int, m2: int, s3: int) -> jax.Array:
    """A bijection of uint32 with near-ideal avalanche (xorshift-multiply, hash-prospector)."""
    h = h ^ (h >> 16)
    h = h * jnp.uint32(m1)
    h = h ^ (h >> 15)
    h = h * jnp.uint32(m2)
    return h ^ (h >> s3)


def check_mask_bits(mask_bits, fn: str, name: str = "mask_bits") -> int:
    """``mask_bits`` if it is one of :data:`MASK_BITS`, else a ValueError naming it."""
    if isinstance(mask_bits, (int, float)) and not isinstance(mask_bits, bool) and mask_bits == 8:
        raise ValueError(
            f"{fn}: `{name}`=8 is no longer offered: 8-bit masks were 1.3-1.7x slower than "
            f"the default 16 bits in the forward pass on CPU (BENCHMARKS.md, run 9) and only "
            f"coarser (a rate resolution of 1/256). Use 16 (the default, resolution 1/65536) "
            f"or 32."
        )
    if isinstance(mask_bits, bool) or mask_bits not in MASK_BITS:
        raise ValueError(f"{fn}: `{name}` must be one of {MASK_BITS} (16 is the default); got "
                         f"{mask_bits!r}.")
    return int(mask_bits)


def seed_words(key: jax.Array) -> jax.Array:
    """The 64-bit seed ``(k0, k1)`` of the hash, as two uint32: threefry's only work."""
    return jax.random.bits(key, (2,), jnp.uint32)


def hashed_words(seed: jax.Array, n: int) -> jax.Array:
    """``n`` uint32 words from a seed of :func:`seed_words`: ``g(f(i ^ k0) + k1)``."""
    return words_at(seed, lax.iota(jnp.uint32, n))


def words_at(seed: jax.Array, i: jax.Array) -> jax.Array:
    """The words of :func:`hashed_words` at the uint32 indices ``i`` (any shape): a block
    of a mask regenerates on its own (``dot_product_attention``'s query chunks)."""
    h = _mix(i ^ seed[0], 0x7FEB352D, 0x846CA68B, 16)
    return _mix(h + seed[1], 0x21F0AAAD, 0xD35A2D97, 15)


def uses_hash(n_words: int) -> bool:
    """Whether ``n_words`` words come from the hash (else threefry: the index would wrap)."""
    return n_words <= _MAX_HASH_WORDS


def random_words(key: jax.Array, n: int) -> jax.Array:
    """``n`` uniform uint32 words from ``key``: a keyed hash of the word's index.

    ``jax.random.bits`` (threefry) derives a 64-bit seed ``(k0, k1)`` from the key;
    word ``i`` is ``g(f(i ^ k0) + k1)`` with ``f`` and ``g`` two xorshift-multiply
    bijections of uint32. Counter-based like threefry (any word computes on its own,
    so sharded and vmapped calls work unchanged), but a few integer operations per
    word instead of threefry's 20 rounds: on CPU, 8.4M words take 3.3 ms against
    57 ms (BENCHMARKS.md, run 8, table "random words"), and inside dropout the words
    are never written to memory. Not cryptographic, and not needed to be: ``tests/test_masks.py``
    checks uniformity, neighbour and shared-word independence, and independence
    across keys. Beyond 2**32 words the index would wrap, so threefry takes over.
    """
    if not uses_hash(n):
        return jax.random.bits(key, (n,), jnp.uint32)
    return hashed_words(seed_words(key), n)


def n_words(shape: tuple[int, ...], bits: int) -> int:
    return -(-math.prod(shape) // (32 // bits))


def uniform_bits(key: jax.Array, shape: tuple[int, ...], bits: int,
                 seeded: bool = False) -> jax.Array:
    """Uniform ``bits``-bit integers (held in uint32), shape ``shape``, cut from 32-bit words.

    Element ``j`` of word ``w`` is ``(w >> (bits * j)) & (2**bits - 1)``: the same values
    as ``bitcast_convert_type`` to uint16 on a little-endian machine, cut by shifts and
    compared in 32-bit lanes. (``bits=8`` works here too, for the tests of the word
    layout, but is not offered: :func:`check_mask_bits`.)

    ``seeded``: ``key`` is already a seed of :func:`seed_words` (the hash's words).
    """
    n = math.prod(shape)
    words_n = n_words(shape, bits)
    words = hashed_words(key, words_n) if seeded else random_words(key, words_n)
    if bits == 32:
        return words.reshape(shape)
    per_word = 32 // bits
    shifts = lax.iota(jnp.uint32, per_word) * jnp.uint32(bits)
    parts = (words[:, None] >> shifts) & jnp.uint32(2**bits - 1)  # (words, per_word)
    return parts.reshape(-1)[:n].reshape(shape)


def keep_threshold(rate: float | jax.Array, bits: int):
    """``k = round((1 - rate) * 2**bits)``: a Python int for a Python rate, else float32."""
    if isinstance(rate, float):
        return int(round((1.0 - rate) * 2**bits))
    return jnp.round((1.0 - rate) * jnp.float32(2**bits))


def keep_mask(key: jax.Array, shape: tuple[int, ...], k, bits: int,
              seeded: bool = False) -> jax.Array:
    """Boolean mask, True with probability exactly ``k / 2**bits``."""
    return keep_from_bits(uniform_bits(key, shape, bits, seeded), k, bits)


def keep_from_bits(u: jax.Array, k, bits: int) -> jax.Array:
    """``u < k``: uniform ``bits``-bit integers ``u`` against :func:`keep_threshold`'s ``k``."""
    shape = u.shape
    if isinstance(k, int):
        if k >= 2**bits:
            return jnp.ones(shape, bool)
        return u < jnp.asarray(k, jnp.uint32)
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

