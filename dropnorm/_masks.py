"""Keep-masks from a PRNG key, with exact quantised keep probabilities.

JAX's default generator (threefry) spends a 20-round hash on every pair of
32-bit words, and ``jax.random.bernoulli`` draws one word per element: on CPU
the random numbers cost several times the memory traffic of the layer. Here
threefry only derives a 64-bit seed from the key; the words are a keyed counter
hash (two xorshift-multiply bijections of the word's index, a few integer
operations per word), and one 32-bit word feeds ``32 // bits`` elements. Both
changes together make dropout memory-bound (BENCHMARKS.md).

The word's index is a 64-bit counter: its low half ``lo`` goes through the hash, its
high half ``hi`` is folded into the seed by two more bijections with ``A(0) = B(0) = 0``
(:func:`words_at`), so one generator serves every size, and the first 2**32 words are
those of the 32-bit counter that came before. Masks are a contract: the same key gives
the same mask on every release, platform and sharding (integer arithmetic only), and
``tests/test_golden_masks.py`` pins them (docs/guides/conventions.md).

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
pairs, correlations at power-of-two distances, between neighbouring keys and across the
index's high half.
"""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
from jax import lax

MASK_BITS = (16, 32)  # offered to users (8 bits was removed: slower than 16, only coarser)
DEFAULT_BITS = 16  # every dropout-family function and module defaults to this (BENCHMARKS.md)
# A(hi) and B(hi), the high half of the word's index folded into the seed (fold_hi): two
# more of hash-prospector's low-bias 2-round constants (exact biases 0.1649 and 0.1654), not f's or
# g's. Changing them changes every mask beyond 2**32 words (tests/test_golden_masks.py).
_A = (0x604BAA5D, 0x43D6CE97, 15)
_B = (0xA812D533, 0xB278E4AD, 17)
_COLUMN_BITS = 12  # the 2-D layout's rows hold 2**12 words (grid_words)
_COLUMNS = 2**_COLUMN_BITS


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


def _is_zero(hi) -> bool:
    return isinstance(hi, int) and hi == 0


def fold_hi(seed, hi) -> tuple[jax.Array, jax.Array]:
    """The seed of the words whose index has the high half ``hi``: ``(k0 ^ A(hi), k1 + B(hi))``.

    ``A`` and ``B`` are xorshift-multiply bijections of uint32 (hash-prospector's
    ``[16 604baa5d 15 43d6ce97 15]`` and ``[16 a812d533 15 b278e4ad 17]``, neither of them
    ``f`` or ``g``); both map 0 to 0, so ``hi = 0`` leaves the seed as it is.
    """
    hi = jnp.asarray(hi, jnp.uint32)
    return (seed[0] ^ _mix(hi, *_A), seed[1] + _mix(hi, *_B))


def words_at(seed, i: jax.Array, hi=0) -> jax.Array:
    """The words of :func:`hashed_words` at the 64-bit indices ``hi * 2**32 + i``.

    ``word = g(f(i ^ k0 ^ A(hi)) + k1 + B(hi))``: the high half of the index is folded into
    the seed (:func:`fold_hi`), so the words at ``hi = 0`` are ``g(f(i ^ k0) + k1)``, the
    same program as before 64-bit indices. ``i`` (uint32) and ``hi`` (uint32, or the Python
    int 0) broadcast against each other; computing ``A`` and ``B`` on a per-row ``hi`` costs
    nothing per word. Any block of a mask regenerates on its own from its indices
    (``dot_product_attention``'s query chunks). ``seed`` may also be a pair ``(k0, k1)`` of
    arrays that broadcast against ``i`` (a seed already folded per element).
    """
    if not _is_zero(hi):
        seed = fold_hi(seed, hi)
    h = _mix(i ^ seed[0], 0x7FEB352D, 0x846CA68B, 16)
    return _mix(h + seed[1], 0x21F0AAAD, 0xD35A2D97, 15)


def grid_words(seed, hi: jax.Array, r: jax.Array) -> jax.Array:
    """The words of rows ``r`` of the 2-D layout: shape ``broadcast(hi, r).shape + (C,)``.

    Row ``r`` (uint32) of the layout ``(R, C)``, ``C = 2**12``, holds the words at the
    64-bit indices ``hi * 2**32 + r * C + c``: ``(hi + (r >> 20), (r << 12) | c)``. The
    high half is a per-row array, so folding it into the seed costs nothing per word.
    """
    c = lax.iota(jnp.uint32, _COLUMNS)
    hi = jnp.asarray(hi, jnp.uint32) + (r >> (32 - _COLUMN_BITS))
    lo = (r << _COLUMN_BITS)[..., None] | c
    return words_at(seed, lo, hi[..., None])


def hashed_words(seed: jax.Array, n) -> jax.Array:
    """``n`` uint32 words from a seed of :func:`seed_words`: word ``i`` at the index ``i``.

    ``n`` is an int or a symbolic dimension (``jax.export``). Three layouts of the index,
    every one giving the same word for the same index: a 1-D uint32 iota for a concrete
    ``n <= 2**32`` (the index's high half is 0: the program of the 32-bit counter); the 2-D
    layout of :func:`grid_words`, ``(ceil(n / 2**12), 2**12)``, flattened and cut to ``n``,
    for more words or for a symbolic ``n`` (whose size is not known when the program is
    built); and ``(ceil(n / 2**32), 2**20, 2**12)`` beyond 2**44 words, where the 2-D
    layout's uint32 row index would wrap. With a symbolic ``n`` the 2-D layout addresses
    2**44 words (2**45 elements of a 16-bit mask, 128 TiB of float32); beyond that its row
    index would wrap, which an exported program cannot check when it is built.
    """
    if not jax.export.is_symbolic_dim(n) and n <= 2**32:
        return words_at(seed, lax.iota(jnp.uint32, n))
    if not jax.export.is_symbolic_dim(n) and n > 2**(32 + _COLUMN_BITS):
        blocks = -(-n // 2**32)
        hi = lax.broadcasted_iota(jnp.uint32, (blocks, 1), 0)
        r = lax.broadcasted_iota(jnp.uint32, (1, 2**(32 - _COLUMN_BITS)), 1)
    else:
        hi, r = 0, lax.iota(jnp.uint32, (n + _COLUMNS - 1) // _COLUMNS)
    return grid_words(seed, hi, r).reshape(-1)[:n]


def random_words(key: jax.Array, n) -> jax.Array:
    """``n`` uniform uint32 words from ``key``: a keyed hash of the word's 64-bit index.

    ``jax.random.bits`` (threefry) derives a 64-bit seed ``(k0, k1)`` from the key; word
    ``i = hi * 2**32 + lo`` is ``g(f(lo ^ k0 ^ A(hi)) + k1 + B(hi))`` with ``f``, ``g``,
    ``A`` and ``B`` xorshift-multiply bijections of uint32 and ``A(0) = B(0) = 0``
    (:func:`words_at`). Counter-based like threefry (any word computes on its own, so
    sharded and vmapped calls work unchanged), but a few integer operations per word
    instead of threefry's 20 rounds: on CPU, 8.4M words take 3.3 ms against 57 ms
    (BENCHMARKS.md, run 8, table "random words"), and inside dropout the words are never
    written to memory. One generator for every size: the index is 64 bits. Not
    cryptographic, and not needed to be: ``tests/test_masks.py`` checks uniformity,
    neighbour and shared-word independence, independence across keys and across the
    index's high half; ``tests/test_golden_masks.py`` pins the words.
    """
    return hashed_words(seed_words(key), n)


def n_words(shape: tuple[int, ...], bits: int):
    """The number of 32-bit words of a ``bits``-bit mask of ``shape`` (symbolic dims too)."""
    per_word = 32 // bits
    return (math.prod(shape) + per_word - 1) // per_word


def uniform_bits(key: jax.Array, shape: tuple[int, ...], bits: int,
                 seeded: bool = False) -> jax.Array:
    """Uniform ``bits``-bit integers (held in uint32), shape ``shape``, cut from 32-bit words.

    Element ``j`` of word ``w`` is ``(w >> (bits * j)) & (2**bits - 1)``: the same values
    as ``bitcast_convert_type`` to uint16 on a little-endian machine, cut by shifts and
    compared in 32-bit lanes. (``bits=8`` works here too, for the tests of the word
    layout, but is not offered: :func:`check_mask_bits`.)

    ``seeded``: ``key`` is already a seed of :func:`seed_words`. ``shape`` may hold
    symbolic dimensions (``jax.export``).
    """
    n = math.prod(shape)
    words = hashed_words(key if seeded else seed_words(key), n_words(shape, bits))
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

