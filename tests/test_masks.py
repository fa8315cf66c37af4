"""Statistical tests of the keep-masks in ``dropnorm._masks``.

The masks cut 32-bit words into 8- or 16-bit uniform integers, so one word feeds
several elements, and the words come from a keyed counter hash seeded by
threefry rather than from threefry itself. These tests check what that must not
break: uniform words (every bit position, every 16-bit value, pairs of bytes),
no correlation between words at power-of-two distances (the counter's structure)
or between words of neighbouring keys, words beyond 2**32 (the 64-bit counter's
high half) uniform and new, the drop fraction (within binomial bounds
of the *quantised* rate), uniformity of the cut integers, no correlation between
neighbours or between the elements that share one random word, and the exact
quantised keep probability that makes ``E[y] = x``. Keys are fixed, so every
test is deterministic; the bounds are six standard deviations (a correct sampler
falls outside with probability < 2e-9), while each bug they guard against moves
the statistic by far more.
"""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from helpers import binomial_bounds, optimised_jit, quantised_keep

import dropnorm
from dropnorm import _masks

N = 1 << 20  # elements per statistical sample: ~1 MB of uint8, a few ms to draw
Z = 6.0  # standard deviations allowed by every bound below


def _corr(a: np.ndarray, b: np.ndarray) -> float:
    a = a.astype(np.float64) - a.mean()
    b = b.astype(np.float64) - b.mean()
    return float((a * b).sum() / math.sqrt((a * a).sum() * (b * b).sum()))


def _corr_bound(n: int) -> float:
    # The sample correlation of n independent pairs has standard deviation ~ 1 / sqrt(n).
    return Z / math.sqrt(n)


def _bit_counts(words: np.ndarray) -> np.ndarray:
    """(32,) int64: how many of the uint32 ``words`` have each bit set (bit 0 first)."""
    octets = np.ascontiguousarray(words, dtype="<u4").view(np.uint8).reshape(-1, 4)
    return np.unpackbits(octets, axis=1, bitorder="little").sum(0, dtype=np.int64)


def _bit_corr(n: int, ones_a, ones_b, ones_both) -> np.ndarray:
    """The sample (Pearson) correlation of two 0/1 vectors of length ``n`` from counts: of
    ones in each and of positions where both are 1; exactly ``_corr`` of the two vectors
    (for bits, the sum of squares is the count of ones), without forming them."""
    a, b, ab = (np.asarray(v, np.float64) for v in (ones_a, ones_b, ones_both))
    return (n * ab - a * b) / np.sqrt((n * a - a * a) * (n * b - b * b))


def _bit_planes(words: np.ndarray) -> np.ndarray:
    """(n, 32) float64 array of the words' bits."""
    w = words.astype(np.uint64)
    return ((w[:, None] >> np.arange(32, dtype=np.uint64)) & np.uint64(1)).astype(np.float64)


def _chi2_z(values: np.ndarray, cells: int) -> float:
    """Chi-square statistic of uniform ``values`` in ``range(cells)``, in standard deviations."""
    counts = np.bincount(values, minlength=cells)
    expected = len(values) / cells
    chi2 = float(((counts - expected) ** 2 / expected).sum())
    return (chi2 - (cells - 1)) / math.sqrt(2 * (cells - 1))


def test_every_bit_of_the_words_is_fair():
    frequency = _bit_counts(np.asarray(_masks.random_words(jax.random.key(21), N))) / N
    sd = 0.5 / math.sqrt(N)
    assert np.all(np.abs(frequency - 0.5) < Z * sd), frequency


@pytest.fixture(scope="module")
def words_22():
    """Key 22's first N words, drawn once for the lags below."""
    return np.asarray(_masks.random_words(jax.random.key(22), N))


@pytest.mark.parametrize("lag", [1, 2, 3, 4, 8, 64, 1024, 1 << 16])
def test_no_correlation_between_words_at_power_of_two_distances(lag, words_22):
    # Word i hashes the counter i ^ k0: counters 2**j apart differ in few bits, so these
    # lags are where a weak mixing function would leave a trace. Every bit position: the
    # correlation of bit b of word i with bit b of word i + lag.
    early, late = words_22[:-lag], words_22[lag:]
    r = _bit_corr(N - lag, _bit_counts(early), _bit_counts(late), _bit_counts(early & late))
    assert np.all(np.abs(r) < _corr_bound(N - lag)), (lag, r)


def test_sixteen_bit_values_and_byte_pairs_are_uniform():
    n = 1 << 24  # 256 expected per cell of 65536
    # 2**24 values: one optimised compile per width (helpers.optimised_jit; the bits are the
    # same at every optimisation level), 0.1 s each instead of 0.5-0.9 s at the suite's O0.
    draw = optimised_jit(lambda key, bits: _masks.uniform_bits(key, (n,), bits),
                         static_argnums=1)
    u16 = np.asarray(draw(jax.random.key(23), 16)).astype(np.int64)
    assert abs(_chi2_z(u16, 1 << 16)) < Z
    u8 = np.asarray(draw(jax.random.key(24), 8)).astype(np.int64)
    assert abs(_chi2_z(u8[0::2] * 256 + u8[1::2], 1 << 16)) < Z  # pairs within a word
    assert abs(_chi2_z(u8[3:-1:4] * 256 + u8[4::4], 1 << 16)) < Z  # pairs across two words


@pytest.mark.parametrize("keys", ["fold_in", "seeds"])
def test_words_of_neighbouring_keys_are_uncorrelated(keys):
    if keys == "fold_in":
        base = jax.random.key(25)
        k1, k2 = jax.random.fold_in(base, 0), jax.random.fold_in(base, 1)
    else:
        k1, k2 = jax.random.key(0), jax.random.key(1)
    a = np.asarray(_masks.random_words(k1, N))
    b = np.asarray(_masks.random_words(k2, N))
    picked = np.arange(0, 32, 5)  # bit i of key 1's words against bit j of key 2's
    ones_a, ones_b = _bit_counts(a), _bit_counts(b)
    for i in picked:
        # every bit of a word is set where bit i of key 1's word is: both = b's bits there
        only_where_a_i = np.where((a >> np.uint32(i)) & np.uint32(1), b, np.uint32(0))
        r = _bit_corr(N, ones_a[i], ones_b[picked], _bit_counts(only_where_a_i)[picked])
        assert np.all(np.abs(r) < _corr_bound(N)), (i, r)


# ------------------------------------------------------------------ the 64-bit counter


def _split(index: np.ndarray) -> tuple[jax.Array, jax.Array]:
    """64-bit word indices (uint64) as the hash's ``(lo, hi)`` uint32 halves."""
    index = np.asarray(index, np.uint64)
    return (jnp.asarray((index & np.uint64(0xFFFFFFFF)).astype(np.uint32)),
            jnp.asarray((index >> np.uint64(32)).astype(np.uint32)))


def _words(seed, index: np.ndarray) -> np.ndarray:
    lo, hi = _split(index)
    return np.asarray(_words_at(seed, lo, hi))


_words_at = jax.jit(_masks.words_at)
W = 1 << 16  # words per window


@pytest.mark.parametrize("start", [2**32 - 2**15, 2**33, 3 * 2**32 + 12345, 2**40 + 7])
def test_words_beyond_2_32_are_uniform_and_not_the_first_words_again(start):
    # A window of 2**16 words at 64-bit indices (across the high half's step from 0 to 1 for
    # the first), drawn through words_at as dropout's 2-D layout and attention do.
    seed = _masks.seed_words(jax.random.key(41))
    index = np.arange(W, dtype=np.uint64) + np.uint64(start)
    words = _words(seed, index)
    bits = _bit_planes(words)
    assert np.all(np.abs(bits.mean(0) - 0.5) < Z * 0.5 / math.sqrt(W)), bits.mean(0)
    top = (words >> 24).astype(np.int64)  # the top byte: 256 cells of 256 expected
    assert abs(_chi2_z(top, 256)) < Z
    for lag in (1, 2, 4, 4096):  # the 2-D layout's row length is 4096 words
        for b in range(0, 32, 5):
            assert abs(_corr(bits[:-lag, b], bits[lag:, b])) < _corr_bound(W - lag), (lag, b)
    # not the words of the high half 0 at the same low half (a counter that dropped the
    # high half would repeat them): at most a chance coincidence, and uncorrelated
    high = (index >> np.uint64(32)) != 0
    first = _words(seed, index[high] & np.uint64(0xFFFFFFFF))
    assert (words[high] == first).sum() <= 1  # P(any equal pair) ~ 2**16 / 2**32
    first_bits = _bit_planes(first)
    for b in range(0, 32, 5):
        assert abs(_corr(bits[high, b], first_bits[:, b])) < _corr_bound(len(first)), b


@pytest.mark.parametrize(("h1", "h2"), [(0, 1), (1, 2), (0, 2**20)])
def test_high_halves_are_uncorrelated_where_their_first_rounds_coincide(h1, h2):
    # The high half is folded into the seed: word(h, lo) = g(f(lo ^ k0 ^ A(h)) + k1 + B(h)).
    # At lo2 = lo ^ A(h1) ^ A(h2) the two first rounds see the same input, and the words
    # differ only through B(h1) - B(h2) before g: the related pair a weak g would betray.
    seed = _masks.seed_words(jax.random.key(42))
    a_mix = jax.jit(lambda h: _masks._mix(h, *_masks._A))
    delta = int(a_mix(jnp.uint32(h1)) ^ a_mix(jnp.uint32(h2)))
    n = N // 4
    lo = jnp.asarray(np.random.default_rng(0).integers(0, 2**32, n, dtype=np.uint64)
                     .astype(np.uint32))
    picked = np.arange(0, 32, 3)  # 11 bit positions of each word: 121 pairs
    a = _bit_planes(np.asarray(_words_at(seed, lo, jnp.uint32(h1))))[:, picked]
    b = _bit_planes(np.asarray(_words_at(seed, lo ^ jnp.uint32(delta), jnp.uint32(h2))))
    b = b[:, picked]
    a, b = a - a.mean(0), b - b.mean(0)
    corr = (a.T @ b) / np.sqrt(np.outer((a * a).sum(0), (b * b).sum(0)))
    assert np.abs(corr).max() < _corr_bound(n), np.abs(corr).max()


def test_a_high_half_of_zero_is_the_32_bit_counter():
    # A(0) = B(0) = 0: masks below 2**32 words are those of the 32-bit counter (no breaking
    # change); an explicit zero high half gives the same words as none.
    seed = _masks.seed_words(jax.random.key(43))
    lo = jnp.arange(1000, dtype=jnp.uint32) * jnp.uint32(4099)
    np.testing.assert_array_equal(np.asarray(_words_at(seed, lo, jnp.uint32(0))),
                                  np.asarray(jax.jit(_masks.words_at)(seed, lo)))
    assert _masks.fold_hi(seed, jnp.uint32(0))[0] == seed[0]
    assert _masks.fold_hi(seed, jnp.uint32(0))[1] == seed[1]


def test_the_2d_layout_gives_the_1d_layouts_words():
    seed = _masks.seed_words(jax.random.key(44))
    n = 3 * 4096 + 11  # whole rows and a partial one
    grid = jax.jit(lambda s, r: _masks.grid_words(s, 0, r))
    two_d = np.asarray(grid(seed, jnp.arange(4, dtype=jnp.uint32))).reshape(-1)[:n]
    np.testing.assert_array_equal(two_d, np.asarray(_masks.hashed_words(seed, n)))
    # Rows around indices 2**32 and 2**33 (rows 2**20 and 2**21): the layout's (hi, lo)
    # arithmetic against 64-bit indices computed in NumPy.
    for row in (2**20 - 2, 2**21 - 1):
        rows = np.arange(row, row + 3, dtype=np.uint64)
        got = np.asarray(grid(seed, jnp.asarray(rows.astype(np.uint32)))).reshape(-1)
        index = (rows[:, None] * np.uint64(4096) + np.arange(4096, dtype=np.uint64)).ravel()
        np.testing.assert_array_equal(got, _words(seed, index))
    # The 3-D layout beyond 2**44 words: blocks of 2**32 words, a high half per block.
    block = jax.jit(lambda s, h, r: _masks.grid_words(s, h, r))
    got = np.asarray(block(seed, jnp.uint32(5), jnp.arange(2, dtype=jnp.uint32))).reshape(-1)
    np.testing.assert_array_equal(got, _words(seed, np.arange(8192, dtype=np.uint64)
                                              + np.uint64(5 * 2**32)))


@pytest.mark.parametrize("bits", [16, 32])
def test_masks_of_more_than_2_32_words_trace_and_lower(bits):
    # 2**33 + 2**19 elements (32 GiB of float32): traced and lowered, not run. No switch to
    # another generator and no error: the hash's 2-D layout, whose program is small.
    x = jax.ShapeDtypeStruct((2**17, 2**16 + 4), jnp.float32)

    def f(x):
        return dropnorm.dropout(jax.random.key(0), x, 0.1, True, mask_bits=bits)

    assert jax.eval_shape(f, x) == x
    text = jax.jit(jax.grad(lambda x: f(x).sum())).lower(x).as_text()
    assert "rng_bit_generator" not in text and "threefry" not in text.replace(
        "threefry2x32", "")  # threefry only derives the seed: one call, of 2 words
    assert text.count("threefry2x32") <= 2, text.count("threefry2x32")
    # beyond 2**44 words, the 3-D layout
    assert jax.eval_shape(lambda: _masks.random_words(jax.random.key(0), 2**45 + 3)).shape == (
        2**45 + 3,)


@pytest.mark.parametrize("bits", [16, 32])
@pytest.mark.parametrize("rate", [0.05, 0.1, 0.3, 0.5, 0.9])
def test_drop_fraction_within_binomial_bounds(rate, bits):
    k = _masks.keep_threshold(rate, bits)
    keep = np.asarray(_masks.keep_mask(jax.random.key(11), (N,), k, bits))
    p_drop = 1.0 - quantised_keep(rate, bits)
    lo, hi = binomial_bounds(N, p_drop, Z)
    dropped = N - int(keep.sum())
    assert lo <= dropped <= hi, (rate, bits, dropped, lo, hi)


@pytest.mark.parametrize("bits", [8, 16])
def test_cut_integers_are_uniform_at_every_position_within_a_word(bits):
    per_word = 32 // bits
    u = np.asarray(_masks.uniform_bits(jax.random.key(3), (N,), bits)).astype(np.int64)
    assert u.dtype == np.int64 and u.min() >= 0 and u.max() < 2**bits
    bins = 256
    for pos in range(per_word):
        # Top 8 bits of each value, at one position within the word: chi-square with 255
        # degrees of freedom (mean 255, sd sqrt(510)).
        counts = np.bincount(u[pos::per_word] >> (bits - 8), minlength=bins)
        expected = len(u[pos::per_word]) / bins
        chi2 = float(((counts - expected) ** 2 / expected).sum())
        assert chi2 < (bins - 1) + Z * math.sqrt(2 * (bins - 1)), (pos, chi2)


@pytest.mark.parametrize("bits", [8, 16])
def test_no_correlation_between_values_that_share_a_random_word(bits):
    per_word = 32 // bits
    u = np.asarray(_masks.uniform_bits(jax.random.key(4), (N,), bits)).reshape(-1, per_word)
    bound = _corr_bound(u.shape[0])
    for a in range(per_word):
        for b in range(a + 1, per_word):
            assert abs(_corr(u[:, a], u[:, b])) < bound, (a, b)
    # and between the same position in neighbouring words
    assert abs(_corr(u[:-1, 0], u[1:, 0])) < _corr_bound(u.shape[0] - 1)


@pytest.mark.parametrize("bits", [16, 32])
@pytest.mark.parametrize("rate", [0.1, 0.5])
def test_no_correlation_between_neighbouring_mask_elements(rate, bits):
    keep = np.asarray(
        _masks.keep_mask(jax.random.key(7), (N,), _masks.keep_threshold(rate, bits), bits))
    # Lags 1-3 fall inside one 32-bit word for 8 bits, lag 1 for 16 bits; 4-8 cross words.
    for lag in range(1, 9):
        r = _corr(keep[:-lag], keep[lag:])
        assert abs(r) < _corr_bound(N - lag), (lag, r)


def test_no_correlation_along_the_rows_and_columns_of_a_2d_mask():
    keep = np.asarray(_masks.keep_mask(jax.random.key(8), (1024, 1024),
                                       _masks.keep_threshold(0.3, 8), 8))
    n = keep[:-1].size
    assert abs(_corr(keep[:-1], keep[1:])) < _corr_bound(n)  # vertical neighbours
    assert abs(_corr(keep[:, :-1], keep[:, 1:])) < _corr_bound(n)  # horizontal neighbours


def test_masks_from_split_keys_are_uncorrelated():
    k1, k2 = jax.random.split(jax.random.key(9))
    kk = _masks.keep_threshold(0.5, 8)
    a = np.asarray(_masks.keep_mask(k1, (N,), kk, 8))
    b = np.asarray(_masks.keep_mask(k2, (N,), kk, 8))
    assert abs(_corr(a, b)) < _corr_bound(N)


@pytest.mark.parametrize("bits", [16, 32])
@pytest.mark.parametrize("rate", [0.1, 0.25, 1 / 3, 0.7])
def test_keep_probability_and_scale_are_exact_so_expectation_is_x(rate, bits):
    k = _masks.keep_threshold(rate, bits)
    p = k / 2**bits
    assert p == quantised_keep(rate, bits)
    assert abs(p - (1 - rate)) <= 2.0 ** -(bits + 1)  # rounding to the nearest multiple
    scale = _masks.inverse_keep(k, bits)
    assert abs(scale * p - 1.0) < 1e-15  # exact up to float64 rounding
    # The layer itself: every kept value of dropout(ones) is float32(1 / p), so E[y] = 1
    # exactly, and the sample mean lies within the binomial bounds around 1.
    y = np.asarray(dropnorm.dropout(jax.random.key(1), jnp.ones((N,)), rate, True,
                                    mask_bits=bits))
    kept = y[y != 0]
    assert np.all(kept == np.float32(1.0 / p))
    lo, hi = binomial_bounds(N, p, Z)
    assert lo / N / p <= y.astype(np.float64).mean() <= hi / N / p


@pytest.mark.parametrize("bits", [16])
@pytest.mark.parametrize("rate", [0.1, 0.25, 1 / 3, 0.7])
def test_nominal_scale_would_fail_the_exactness_check(rate, bits):
    # The kept-value check above can fail: where the rate is not a multiple of 2**-bits,
    # scaling by 1 / (1 - rate) instead of 1 / p gives a different float32 (for 16
    # bits; with 32 bits the two agree to float32 precision, which is the point of 32 bits).
    p = quantised_keep(rate, bits)
    if p != 1 - rate:
        assert np.float32(1.0 / p) != np.float32(1.0 / (1.0 - rate))
    else:
        assert rate == 0.25  # exactly representable: nothing to quantise


@pytest.mark.parametrize("bits", [16, 32])
@pytest.mark.parametrize("rate", [0.0, 0.1, 0.5, 1.0])
def test_traced_rate_gives_the_same_mask_as_a_python_rate(rate, bits):
    key = jax.random.key(2)
    static = _masks.keep_mask(key, (4096,), _masks.keep_threshold(rate, bits), bits)
    traced = jax.jit(lambda r: _masks.keep_mask(key, (4096,), _masks.keep_threshold(r, bits),
                                                bits))(jnp.float32(rate))
    np.testing.assert_array_equal(np.asarray(static), np.asarray(traced))
    if rate == 0.0:
        assert bool(traced.all())  # k = 2**bits keeps everything, also for 32 bits
    if rate == 1.0:
        assert not bool(traced.any())


@pytest.mark.parametrize("bits", [8, 16])
def test_shift_cut_bits_equal_the_little_endian_bitcast(bits):
    # uniform_bits cuts each word by shifts (fast on XLA CPU); the values must be those of
    # cutting the words by a bitcast to uint8/uint16 on this (little-endian) machine, so masks
    # are the same as before the change (and as documented).
    key, n = jax.random.key(31), 1001
    words = _masks.random_words(key, _masks.n_words((n,), bits))
    narrow = {8: jnp.uint8, 16: jnp.uint16}[bits]
    want = np.asarray(jax.lax.bitcast_convert_type(words, narrow)).reshape(-1)[:n]
    got = np.asarray(_masks.uniform_bits(key, (n,), bits))
    assert got.dtype == np.uint32 and got.max() < 2**bits
    np.testing.assert_array_equal(got, want.astype(np.uint32))
