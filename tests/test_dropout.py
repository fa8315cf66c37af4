"""dropnorm.dropout: inverted scaling, quantised keep probability, identities, rate 1, masks.

Statistical tests use fixed keys and binomial bounds at 6 standard deviations
(``helpers.binomial_bounds``): a correct sampler fails with probability < 2e-9,
while a wrong keep probability (e.g. the unquantised one, or a mask
that ignores the rate) is off by far more than that at the sizes used.
"""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from helpers import binomial_bounds, primitive_names, quantised_keep, random_normal

import dropnorm

KEY = jax.random.key(0)
N = 200_000  # elements per statistical test: 6 sd of the drop fraction is <= 0.0067


@pytest.mark.parametrize("mask_bits", [16, 32])
@pytest.mark.parametrize("rate", [0.1, 0.25, 0.5, 0.8, 0.99])
def test_drop_fraction_is_the_quantised_rate_within_binomial_bounds(rate, mask_bits):
    x = jnp.ones((N,), jnp.float32)
    y = np.asarray(dropnorm.dropout(KEY, x, rate, True, mask_bits=mask_bits))
    p = quantised_keep(rate, mask_bits)
    # Kept values are exactly 1 / p (in float32): inverted scaling with the quantised p.
    kept = y != 0
    np.testing.assert_array_equal(y[kept], np.float32(1.0 / p))
    lo, hi = binomial_bounds(N, p)
    assert lo <= kept.sum() <= hi, (kept.sum(), lo, hi)


def test_eight_bit_masks_are_refused_with_the_reason():
    # 8-bit masks were removed (issue 14: 1.3-1.7x slower than 16 bits in the forward pass,
    # and only coarser); asking for them says so and what to use, in every function.
    x = jnp.ones((4, 4))
    for fn in (lambda: dropnorm.dropout(KEY, x, 0.1, True, mask_bits=8),
               lambda: dropnorm.alpha_dropout(KEY, x, 0.1, True, mask_bits=8),
               lambda: dropnorm.drop_path(KEY, x, 0.1, True, mask_bits=8)):
        with pytest.raises(ValueError, match=r"`mask_bits`=8 is no longer offered.*16"):
            fn()
    # The default's quantisation: rate 0.1 drops 6554/65536 = 10.0006%.
    assert quantised_keep(0.1, 16) == 58982 / 65536


def test_default_is_sixteen_bits():
    x = random_normal((4096,), seed=3)
    for fn in (dropnorm.dropout, dropnorm.alpha_dropout):
        np.testing.assert_array_equal(np.asarray(fn(KEY, x, 0.3, True)),
                                      np.asarray(fn(KEY, x, 0.3, True, mask_bits=16)))
    xb = random_normal((512, 4), seed=4)
    np.testing.assert_array_equal(np.asarray(dropnorm.drop_path(KEY, xb, 0.3, True)),
                                  np.asarray(dropnorm.drop_path(KEY, xb, 0.3, True, mask_bits=16)))


@pytest.mark.parametrize("rate", [0.2, 0.5, 0.9])
def test_inverted_scaling_mean_equals_x(rate):
    # E[y] = x for a non-constant x: average over 4000 independent keys. Each y_i / x_i is
    # (1/p) * Bernoulli(p), with variance (1 - p) / p; the mean over K keys has sd
    # sqrt((1 - p) / (p K)), and we allow 6 sd per element (64 elements).
    keys = jax.random.split(jax.random.key(1), 4000)
    x = random_normal((64,), seed=1) + 3.0
    ys = jax.vmap(lambda k: dropnorm.dropout(k, x, rate, True))(keys)
    p = quantised_keep(rate, 16)
    ratio = np.asarray(ys.mean(0) / x, np.float64)
    sd = math.sqrt((1 - p) / (p * keys.shape[0]))
    assert np.max(np.abs(ratio - 1.0)) < 6 * sd, (np.max(np.abs(ratio - 1.0)), sd)
    # Overall mean: 64 * 4000 draws, sd of the pooled ratio mean sqrt((1-p)/(p * 256000)).
    assert abs(ratio.mean() - 1.0) < 6 * sd / 8


@pytest.mark.parametrize("rate", [0.3, 0.7])
def test_traced_rate_gives_the_same_mask_as_the_static_path(rate):
    x = random_normal((4096,), seed=2)
    for bits in (16,):
        static = dropnorm.dropout(KEY, x, rate, True, mask_bits=bits)
        traced = jax.jit(lambda x, r, b=bits: dropnorm.dropout(KEY, x, r, True, mask_bits=b))(
            x, rate)
        np.testing.assert_array_equal(np.asarray(static), np.asarray(traced))
    # 32 bits: the traced threshold is computed in float32, so compare statistically.
    y = jax.jit(lambda x, r: dropnorm.dropout(KEY, x, r, True, mask_bits=32))(jnp.ones(N), rate)
    lo, hi = binomial_bounds(N, 1.0 - rate)
    assert lo <= int((np.asarray(y) != 0).sum()) <= hi
    np.testing.assert_allclose(np.asarray(y)[np.asarray(y) != 0], 1.0 / (1.0 - rate), rtol=1e-6)


@pytest.mark.parametrize("dtype", [jnp.bfloat16, jnp.float16, jnp.float32])
def test_rate_zero_and_eval_return_x_unchanged(dtype):
    x = random_normal((5, 7), dtype, seed=3)
    for y in (dropnorm.dropout(KEY, x, 0.0, True), dropnorm.dropout(None, x, 0.5, False),
              dropnorm.dropout(None, x, 0.0, train=False)):
        assert y.dtype == x.dtype and y.shape == x.shape
        np.testing.assert_array_equal(np.asarray(y), np.asarray(x))
    # The same with traced rate / train: one compiled function, still exactly x.
    f = jax.jit(lambda x, r, t: dropnorm.dropout(KEY, x, r, t))
    for r, t in ((0.0, True), (0.5, False), (1.0, False)):
        y = f(x, r, jnp.asarray(t))
        assert y.dtype == x.dtype
        np.testing.assert_array_equal(np.asarray(y), np.asarray(x))


def test_static_identity_paths_draw_no_random_bits():
    # Python rate 0 or train False is the static fast path: no random numbers in the program.
    x = jnp.ones((4, 4))
    for rate, train in ((0.0, True), (0.5, False)):
        names = primitive_names(lambda x, r=rate, t=train: dropnorm.dropout(KEY, x, r, t), x)
        assert not any("random" in n or "threefry" in n for n in names), names
    names = primitive_names(lambda x: dropnorm.dropout(KEY, x, 0.5, True), x)
    assert any("random" in n or "threefry" in n for n in names), names


@pytest.mark.parametrize("mask_bits", [16, 32])
def test_rate_one_gives_zeros_and_zero_gradients_static_and_traced(mask_bits):
    x = random_normal((6, 5), seed=4)

    def loss(x, rate):
        return jnp.sum(dropnorm.dropout(KEY, x, rate, True, mask_bits=mask_bits) * x)

    # Static (Python) rate 1.
    y = dropnorm.dropout(KEY, x, 1.0, True, mask_bits=mask_bits)
    np.testing.assert_array_equal(np.asarray(y), 0.0)
    g = jax.grad(loss)(x, 1.0)
    np.testing.assert_array_equal(np.asarray(g), 0.0)
    # Traced rate 1, under jit, with the gradient with respect to the rate as well.
    y = jax.jit(lambda x, r: dropnorm.dropout(KEY, x, r, True, mask_bits=mask_bits))(x, 1.0)
    np.testing.assert_array_equal(np.asarray(y), 0.0)
    gx, gr = jax.jit(jax.grad(loss, argnums=(0, 1)))(x, jnp.float32(1.0))
    np.testing.assert_array_equal(np.asarray(gx), 0.0)
    assert np.isfinite(np.asarray(gr))
    # Forward mode too.
    _, t = jax.jvp(lambda x: dropnorm.dropout(KEY, x, jnp.float32(1.0), True), (x,), (x,))
    np.testing.assert_array_equal(np.asarray(t), 0.0)


def test_traced_invalid_rate_poisons_the_output_with_nan():
    # A traced rate cannot raise; the documented behaviour is a NaN output, not silent clipping.
    f = jax.jit(lambda r: dropnorm.dropout(KEY, jnp.ones(8), r, True))
    for r in (-0.1, 1.5, float("nan")):
        assert np.all(np.isnan(np.asarray(f(r)))), r
    assert not np.any(np.isnan(np.asarray(f(0.5))))


@pytest.mark.parametrize(("shape", "bdims"), [
    ((8, 16, 12), (1,)),
    ((8, 16, 12), (0, 2)),
    ((4, 6, 6, 32), (1, 2)),
    ((4, 6, 6, 32), (-3, -2)),
])
def test_broadcast_dims_share_one_mask(shape, bdims):
    x = jnp.ones(shape, jnp.float32)
    y = np.asarray(dropnorm.dropout(KEY, x, 0.5, True, broadcast_dims=bdims))
    axes = tuple(a % len(shape) for a in bdims)
    # Constant along the broadcast axes...
    first = np.take(y, [0], axis=axes[0])
    for a in axes:
        np.testing.assert_array_equal(y, np.broadcast_to(np.take(y, [0], axis=a), y.shape))
    # ...and still random across the others: both values appear in the shared mask.
    assert set(np.unique(first).tolist()) == {0.0, 2.0}


def test_broadcast_dims_drop_fraction_counts_mask_entries():
    # With a (1, 2048, 1)-shaped mask, the 2048 mask entries are the Bernoulli draws.
    x = jnp.ones((3, 2048, 5))
    y = np.asarray(dropnorm.dropout(KEY, x, 0.25, True, broadcast_dims=(0, 2)))
    kept = int((y[0, :, 0] != 0).sum())
    lo, hi = binomial_bounds(2048, quantised_keep(0.25, 16))
    assert lo <= kept <= hi


@pytest.mark.parametrize("dtype", [jnp.bfloat16, jnp.float16, jnp.float32, jnp.float64])
def test_dtype_is_preserved_and_kept_values_are_x_over_p(dtype):
    with jax.enable_x64(dtype == jnp.float64):
        x = random_normal((64, 33), dtype, seed=5)
        for rate in (0.3, 0.75):
            y = dropnorm.dropout(KEY, x, rate, True)
            assert y.dtype == jnp.dtype(dtype)
            p = quantised_keep(rate, 16)
            kept = np.asarray(y != 0)
            # x / p, exact in float64. The multiplier 1/p is rounded to float32 (float64 for
            # float64 x) and the product rounded to dtype: within 1 ulp of dtype (rtol = eps),
            # where for subnormal results (float16 below 6.1e-5) the ulp is the smallest
            # subnormal, the atol.
            want = np.asarray(x).astype(np.float64) / p
            eps = float(jnp.finfo(dtype).eps)
            tiny = float(jnp.finfo(dtype).smallest_subnormal)
            np.testing.assert_allclose(np.asarray(y)[kept].astype(np.float64), want[kept],
                                       rtol=eps, atol=tiny)
            assert 0 < kept.mean() < 1


def test_same_key_same_mask_different_keys_independent_masks():
    x = jnp.ones((N,))
    a = np.asarray(dropnorm.dropout(jax.random.key(7), x, 0.5, True)) != 0
    b = np.asarray(dropnorm.dropout(jax.random.key(7), x, 0.5, True)) != 0
    np.testing.assert_array_equal(a, b)
    k1, k2 = jax.random.split(jax.random.key(7))
    c = np.asarray(dropnorm.dropout(k1, x, 0.5, True)) != 0
    d = np.asarray(dropnorm.dropout(k2, x, 0.5, True)) != 0
    # Independent masks agree on p^2 + (1-p)^2 = 1/2 of the elements (binomial bounds), and
    # keeping in both happens with probability p^2 = 1/4.
    for m1, m2 in ((a, c), (c, d), (a, d)):
        lo, hi = binomial_bounds(N, 0.5)
        assert lo <= int((m1 == m2).sum()) <= hi
        lo, hi = binomial_bounds(N, 0.25)
        assert lo <= int((m1 & m2).sum()) <= hi


def test_legacy_uint32_key_is_accepted():
    x = jnp.ones((1000,))
    y = dropnorm.dropout(jax.random.PRNGKey(3), x, 0.5, True)
    assert set(np.unique(np.asarray(y)).tolist()) == {0.0, 2.0}
    np.testing.assert_array_equal(np.asarray(y),
                                  np.asarray(dropnorm.dropout(jax.random.PRNGKey(3), x, 0.5, True)))


def test_train_may_be_passed_by_keyword():
    x = jnp.ones((10,))
    np.testing.assert_array_equal(np.asarray(dropnorm.dropout(KEY, x, 0.5, train=True)),
                                  np.asarray(dropnorm.dropout(KEY, x, 0.5, True)))
    assert dropnorm.dropout(None, x, rate=0.5, train=False) is x
