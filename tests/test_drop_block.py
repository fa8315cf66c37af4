"""DropBlock (Ghiasi, Lin & Le 2018): dropped fraction, block shape, scaling, conventions.

Statistical tests use fixed keys and binomial bounds at 6 standard deviations
(``helpers.binomial_bounds``). Elements of one feature map are correlated (a dropped
seed drops a whole block), so the counts that are binomial are those of ONE interior
position across independent feature maps (examples x channels), or of dropped seeds.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from helpers import binomial_bounds, random_normal
from hypothesis import given, settings
from hypothesis import strategies as st

import dropnorm


def _drop_prob(rate, b, bits=16):
    """The exact interior drop probability 1 - (k / 2**bits)**(b*b) (float64)."""
    k = round((1 - rate) ** (1 / (b * b)) * 2**bits)
    return 1.0 - (k / 2**bits) ** (b * b)


@pytest.mark.parametrize("rate", [0.05, 0.2, 0.5])
@pytest.mark.parametrize("block_size", [1, 3, 7])
def test_interior_drop_fraction_is_the_rate_within_binomial_bounds(rate, block_size):
    # One interior position (16, 16) of 4096 independent 32x32 maps (1024 examples x 4
    # channels): each is dropped with probability 1 - (k / 2**16)**(b*b), which is `rate`
    # to within 1e-3 (the 16-bit resolution of the seed probability, raised to b*b).
    x = jnp.ones((1024, 32, 32, 4))
    y = dropnorm.drop_block(jax.random.key(block_size), x, rate, True, block_size=block_size)
    p = _drop_prob(rate, block_size)
    assert abs(p - rate) < 1e-3
    n_dropped = int(jnp.sum(y[:, 16, 16, :] == 0))
    lo, hi = binomial_bounds(4096, p)
    assert lo <= n_dropped <= hi, (n_dropped, lo, hi)
    # Survivors are scaled by exactly 1 / (1 - p): E[y] = x in the interior.
    kept = np.unique(np.asarray(y[y != 0]))
    np.testing.assert_allclose(kept, 1.0 / (1.0 - p), rtol=1e-6)


@settings(max_examples=10, deadline=None)
@given(seed=st.integers(0, 2**16), block_size=st.sampled_from([2, 3, 5]),
       rate=st.sampled_from([0.02, 0.1, 0.3]))
def test_dropped_regions_are_unions_of_whole_blocks(seed, block_size, rate):
    # Every dropped element lies in a block_size x block_size window that is dropped whole
    # (windows reaching past the border count as dropped outside): the dropped set equals
    # its morphological opening by the block.
    x = jnp.ones((4, 20, 17, 3))
    y = dropnorm.drop_block(jax.random.key(seed), x, rate, True, block_size=block_size)
    dropped = np.asarray(y == 0)
    b = block_size
    pad = np.pad(dropped, ((0, 0), (b, b), (b, b), (0, 0)), constant_values=True)
    h, w = pad.shape[1:3]
    # erosion: the windows [i, i + b) x [j, j + b) that are dropped whole
    whole = np.ones((4, h - b + 1, w - b + 1, 3), bool)
    for di in range(b):
        for dj in range(b):
            whole &= pad[:, di:di + h - b + 1, dj:dj + w - b + 1]
    covered = np.zeros_like(pad)
    for di in range(b):
        for dj in range(b):
            covered[:, di:di + h - b + 1, dj:dj + w - b + 1] |= whole
    np.testing.assert_array_equal(covered[:, b:-b, b:-b], dropped)
    assert dropped.any() or rate < 0.05  # something was dropped to look at


def test_blocks_have_the_block_size():
    # At a low rate blocks rarely overlap: a lone dropped region away from the borders is
    # exactly block_size x block_size (its bounding box and its area).
    x = jnp.ones((256, 40, 40, 1))
    y = np.asarray(dropnorm.drop_block(jax.random.key(3), x, 0.02, True, block_size=5) == 0)
    from scipy import ndimage

    sizes = []
    for m in y[..., 0]:
        labels, n = ndimage.label(m)
        for sl in ndimage.find_objects(labels):
            r, c = sl
            if r.start > 0 and c.start > 0 and r.stop < 40 and c.stop < 40:
                sizes.append((r.stop - r.start, c.stop - c.start))
    assert len(sizes) > 100
    assert sum(s == (5, 5) for s in sizes) / len(sizes) > 0.8  # the rest: two overlapping


def test_shared_channels_and_nchw():
    x = jnp.ones((8, 3, 24, 24))  # NCHW
    y = dropnorm.drop_block(jax.random.key(0), x, 0.3, True, block_size=3, spatial_axes=(2, 3),
                            channel_axis=1, share_channels=True)
    assert bool(jnp.all(y == y[:, :1]))  # one mask for every channel of an example
    assert float(jnp.mean(y == 0)) > 0.1
    per_channel = dropnorm.drop_block(jax.random.key(0), x, 0.3, True, block_size=3,
                                      spatial_axes=(2, 3), channel_axis=1)
    assert not bool(jnp.all(per_channel == per_channel[:, :1]))


def test_expectation_is_x_in_the_interior():
    # E[y] = x away from the borders: the mean over 2000 keys of y / x at interior positions.
    x = random_normal((1, 16, 16, 1), np.float32, 1, 1.0) + 3.0
    f = jax.jit(jax.vmap(lambda k: dropnorm.drop_block(k, x, 0.3, True, block_size=3)))
    ys = f(jax.random.split(jax.random.key(0), 2000))
    ratio = np.asarray(ys[:, 0, 4:12, 4:12, 0] / x[0, 4:12, 4:12, 0])
    # Each position: 2000 draws of {0, 1/(1-p)}, std of the mean sqrt(p/(1-p)/2000) ~ 0.015;
    # 6 sigma for the worst of 64 positions.
    np.testing.assert_allclose(ratio.mean(0), 1.0, atol=0.09)
    assert abs(ratio.mean() - 1.0) < 0.02


def test_conventions_of_the_family():
    x = random_normal((4, 12, 12, 2), np.float32, 0)
    key = jax.random.key(1)
    kw = dict(block_size=3)
    np.testing.assert_array_equal(dropnorm.drop_block(key, x, 0.0, True, **kw), x)
    np.testing.assert_array_equal(dropnorm.drop_block(None, x, 0.5, False, **kw), x)
    # A traced rate and a traced train flag give the static results: the same mask, and
    # the scale 1 / p computed in float32 (traced) or float64 then rounded (static), so
    # equal to a few ulps.
    f = jax.jit(lambda r, t: dropnorm.drop_block(key, x, r, t, **kw))
    static = dropnorm.drop_block(key, x, 0.3, True, **kw)
    np.testing.assert_array_equal(f(0.3, True) == 0, static == 0)
    np.testing.assert_allclose(f(0.3, True), static, rtol=1e-6)
    np.testing.assert_array_equal(f(0.3, False), x)
    # Rate 1: zeros and zero gradients (never NaN), static and traced.
    loss = jax.value_and_grad(lambda x, r: jnp.sum(dropnorm.drop_block(key, x, r, True, **kw)
                                                   ** 2))
    for y, g in (loss(x, 1.0), jax.jit(loss)(x, jnp.float32(1.0))):  # static, traced
        assert float(y) == 0.0 and bool(jnp.all(g == 0))
    # The gradient is the mask times the scale (regenerated in the backward pass).
    w = random_normal(x.shape, np.float32, 2)
    y = dropnorm.drop_block(key, x, 0.3, True, **kw)
    g = jax.grad(lambda x: jnp.sum(dropnorm.drop_block(key, x, 0.3, True, **kw) * w))(x)
    np.testing.assert_allclose(g, w * (y / x), rtol=1e-5)
    # bf16 in, bf16 out; nothing per element is kept for the backward pass.
    assert dropnorm.drop_block(key, x.astype(jnp.bfloat16), 0.3, True, **kw).dtype == jnp.bfloat16
    _, vjp = jax.vjp(lambda x: dropnorm.drop_block(key, x, 0.3, True, **kw), x)
    assert sum(a.nbytes for a in jax.tree.leaves(vjp)) < 256


@pytest.mark.parametrize(("kw", "exc", "fragment"), [
    (dict(block_size=13), ValueError, "larger than the feature map: axis 1 has size 12"),
    (dict(block_size=0), ValueError, "`block_size` must be a positive int"),
    (dict(block_size=(3,)), ValueError, "a tuple of 2 positive ints"),
    (dict(block_size=3, spatial_axes=(1, 3), channel_axis=3), ValueError, "`channel_axis`=3"),
    (dict(block_size=3, spatial_axes=(1, 5)), ValueError, "`spatial_axes`"),
    (dict(block_size=3, channel_axis=None, share_channels=True), ValueError, "channel_axis"),
])
def test_bad_arguments_are_named(kw, exc, fragment):
    x = jnp.ones((2, 12, 12, 3))
    for run in (lambda x: dropnorm.drop_block(jax.random.key(0), x, 0.1, True, **kw),
                jax.jit(lambda x: dropnorm.drop_block(jax.random.key(0), x, 0.1, True, **kw))):
        with pytest.raises(exc, match=None) as info:
            run(x)
        assert fragment in str(info.value), str(info.value)
        assert str(info.value).startswith("drop_block:")
    with pytest.raises(ValueError, match="`rate`"):
        dropnorm.drop_block(jax.random.key(0), x, 1.5, True, block_size=3)
