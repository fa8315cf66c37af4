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
from helpers import binomial_bounds, optimised_jit, random_normal
from hypothesis import given, settings
from hypothesis import strategies as st

import dropnorm


def _drop_prob(rate, b, bits=16):
    """The exact interior drop probability 1 - (k / 2**bits)**(b*b) (float64)."""
    k = round((1 - rate) ** (1 / (b * b)) * 2**bits)
    return 1.0 - (k / 2**bits) ** (b * b)


# One compile per block size (the rate is traced), optimised: 4M elements per call.
_large_drop_block = optimised_jit(
    lambda key, x, rate, b: dropnorm.drop_block(key, x, rate, True, block_size=b),
    static_argnums=3)


@pytest.mark.parametrize("rate", [0.05, 0.2, 0.5])
@pytest.mark.parametrize("block_size", [1, 3, 7])
def test_interior_drop_fraction_is_the_rate_within_binomial_bounds(rate, block_size):
    # One interior position (16, 16) of 4096 independent 32x32 maps (1024 examples x 4
    # channels): each is dropped with probability 1 - (k / 2**16)**(b*b), which is `rate`
    # to within 1e-3 (the 16-bit resolution of the seed probability, raised to b*b).
    x = jnp.ones((1024, 32, 32, 4))
    y = np.asarray(_large_drop_block(jax.random.key(block_size), x, rate, block_size))
    p = _drop_prob(rate, block_size)
    assert abs(p - rate) < 1e-3
    n_dropped = int(np.sum(y[:, 16, 16, :] == 0))
    lo, hi = binomial_bounds(4096, p)
    assert lo <= n_dropped <= hi, (n_dropped, lo, hi)
    # Survivors are scaled by exactly 1 / (1 - p): E[y] = x in the interior.
    kept = np.unique(y[y != 0])
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


def test_shared_channels_drop_fraction_is_the_rate_within_binomial_bounds():
    # share_channels: one mask per example, so the binomial count is one interior position
    # over the 2048 examples (every channel agrees).
    x = jnp.ones((2048, 24, 24, 3))
    y = dropnorm.drop_block(jax.random.key(11), x, 0.3, True, block_size=5, share_channels=True)
    dropped = np.asarray(y[:, 12, 12, :] == 0)
    assert (dropped == dropped[:, :1]).all()
    lo, hi = binomial_bounds(2048, _drop_prob(0.3, 5))
    assert lo <= int(dropped[:, 0].sum()) <= hi


# --- Parity with timm's DropBlock2d (Ghiasi et al. 2018), read from timm/layers/drop.py --------
#
# timm is not a dependency; its algorithm is re-implemented here in float64 NumPy from its
# source and documentation. Its default (``fast=True``) path: a Bernoulli(gamma) seed at
# every position of every (example, channel) map, ``max_pool2d(seeds, block_size, stride=1,
# padding=block_size // 2)`` (each seed drops the block centred on it, clipped at the
# borders), survivors times ``numel / kept`` (the kept fraction of the whole batch), and
# ``gamma = rate / block_size**2 * H W / ((H - block_size + 1) (W - block_size + 1))``.
# dropnorm keeps the seed model and the block layout, and differs in two documented ways:
# gamma is exact (``1 - (1 - rate)**(1 / B)``: the interior fraction is ``rate``, overlaps
# included) and the scale is the expected ``1 / (1 - rate)`` instead of the realised one.


def _timm_blocks(seeds, b):
    """timm's dilation in float64 NumPy: ``max_pool2d(seeds, b, 1, b // 2)`` on (N, H, W)."""
    n, h, w = seeds.shape
    pad = np.pad(seeds.astype(np.float64), ((0, 0), (b // 2, b // 2), (b // 2, b // 2)))
    out = np.zeros((n, h + 2 * (b // 2) - b + 1, w + 2 * (b // 2) - b + 1))
    for di in range(b):
        for dj in range(b):
            out = np.maximum(out, pad[:, di:di + out.shape[1], dj:dj + out.shape[2]])
    return out


def _timm_gamma(rate, b, h, w):
    return rate / b**2 * (h * w) / ((h - b + 1) * (w - b + 1))


def _seed_counts(h, w, b):
    """How many seed positions' blocks cover each element (dropnorm's layout, float64)."""
    lo, hi = (b - 1) // 2, b // 2  # a seed at s drops [s - b // 2, s + (b - 1) // 2]

    def along(n):
        j = np.arange(n)
        return np.minimum(j + hi, n - 1) - np.maximum(j - lo, 0) + 1

    return np.outer(along(h), along(w)).astype(np.float64)


@pytest.mark.parametrize("b", [1, 3, 5, 7])
def test_block_layout_is_timms_max_pool(b):
    # The same seeds give the same dropped blocks: dropnorm's window (lax.reduce_window) and
    # timm's max_pool2d, in the float64 re-implementation and in torch itself.
    import torch

    from dropnorm._dropout import _blocks

    rng = np.random.default_rng(b)
    seeds = rng.random((6, 11, 14)) < 0.04
    ours = np.asarray(_blocks(jnp.asarray(seeds)[..., None], (1, b, b, 1)))[..., 0]
    theirs = _timm_blocks(seeds, b)
    pooled = torch.nn.functional.max_pool2d(torch.from_numpy(seeds[:, None].astype(np.float64)),
                                            b, stride=1, padding=b // 2)[:, 0].numpy()
    np.testing.assert_array_equal(theirs, pooled)
    np.testing.assert_array_equal(ours, theirs == 1.0)


def test_per_position_drop_probability_is_timms_seed_model_with_the_exact_gamma():
    # Each element is dropped when any of the n_ij seeds whose blocks cover it is: with
    # independent seeds of drop probability gamma, P(drop) = 1 - (1 - gamma)**n_ij, n_ij = b*b
    # in the interior and fewer at the borders (timm's fast path, the same formula with its
    # gamma). Checked position by position over 4096 maps with 6-sigma binomial bounds.
    rate, b, h, w = 0.3, 5, 12, 12
    keep_seed = round((1 - rate) ** (1 / b**2) * 2**16) / 2**16  # quantised: dropnorm's q
    p = 1.0 - keep_seed ** _seed_counts(h, w, b)
    x = jnp.ones((1024, h, w, 4))
    y = dropnorm.drop_block(jax.random.key(21), x, rate, True, block_size=b)
    counts = np.asarray(jnp.sum(y == 0, axis=(0, 3)))  # over 4096 independent maps
    for (i, j), c in np.ndenumerate(counts):
        lo, hi = binomial_bounds(4096, p[i, j])
        assert lo <= c <= hi, ((i, j), c, 4096 * p[i, j])
    assert abs(p[6, 6] - rate) < 1e-3 and p[0, 0] < 0.15  # interior: rate; corner: 9 seeds
    # timm's gamma with the same seed model drops more of the interior (its area ratio
    # HW / ((H - b + 1)(W - b + 1)) = 144 / 64 targets the whole map, seeds restricted to
    # valid positions): the documented difference, not a defect of either.
    g = _timm_gamma(rate, b, h, w)
    assert 1 - (1 - g) ** (b * b) > 1.5 * rate


def test_rescaling_equals_timms_batch_normalisation_in_the_interior():
    # timm scales survivors by numel / kept, the realised kept fraction of the batch;
    # dropnorm by the expected 1 / (1 - rate). On the interior (where both aim at E[y] = x)
    # the realised factor of dropnorm's own mask agrees with the fixed one to within its
    # sampling error: kept ~ Binomial-like over 4096 maps x 64 positions, and blocks make
    # neighbours correlated, so the bound is 6 sigma of a binomial over the 4096 maps only.
    rate, b = 0.2, 3
    x = jnp.ones((1024, 16, 16, 4))
    y = np.asarray(dropnorm.drop_block(jax.random.key(4), x, rate, True, block_size=b))
    interior = y[:, 4:12, 4:12, :]
    realised = interior.size / np.count_nonzero(interior)  # timm's normalize_scale
    expected = 1.0 / (1.0 - _drop_prob(rate, b))
    survivors = np.unique(interior[interior != 0])
    np.testing.assert_allclose(survivors, expected, rtol=1e-6)
    sd_keep = np.sqrt(rate * (1 - rate) / 4096)
    assert abs(1 / realised - 1 / expected) < 6 * sd_keep


# --- The Flax modules -------------------------------------------------------------------------


def _maps(shape=(4, 12, 12, 3), seed=0):
    return random_normal(shape, np.float32, seed)


def test_linen_module_is_the_pure_function():
    import flax.linen as nn

    from dropnorm import linen as dnn

    x, key = _maps(), jax.random.key(5)
    kw = dict(block_size=3, spatial_axes=(1, 2), channel_axis=-1)
    layer = dnn.DropBlock(0.3, **kw)
    # A key passed to the call is used as it is (positional, as Flax's Dropout's).
    np.testing.assert_array_equal(layer.apply({}, x, False, key),
                                  dropnorm.drop_block(key, x, 0.3, True, **kw))
    shared = dnn.DropBlock(0.3, 3, share_channels=True).apply({}, x, False, key)
    np.testing.assert_array_equal(
        shared, dropnorm.drop_block(key, x, 0.3, True, block_size=3, share_channels=True))

    # Otherwise one key from make_rng('dropout'), the one a layer at that path draws.
    class Probe(nn.Module):
        @nn.compact
        def __call__(self):
            return jax.random.key_data(self.make_rng("dropout"))

    rngs = {"dropout": jax.random.key(9)}
    drawn = jax.random.wrap_key_data(Probe().apply({}, rngs=rngs))
    np.testing.assert_array_equal(layer.apply({}, x, deterministic=False, rngs=rngs),
                                  dropnorm.drop_block(drawn, x, 0.3, True, **kw))
    # deterministic (field or call) and rate 0 are the identity and need no RNG.
    np.testing.assert_array_equal(dnn.DropBlock(0.3, 3, deterministic=True).apply({}, x), x)
    np.testing.assert_array_equal(layer.apply({}, x, deterministic=True), x)
    np.testing.assert_array_equal(dnn.DropBlock(0.0, 3).apply({}, x, False), x)
    with pytest.raises(Exception, match="dropout"):  # a training call needs the stream
        layer.apply({}, x, False)


def test_nnx_module_is_the_pure_function_and_switches_like_dropout():
    from flax import nnx

    from dropnorm import nnx as dnx

    x = _maps()
    m = dnx.DropBlock(0.3, block_size=(3, 5), rngs=nnx.Rngs(dropout=2))
    assert isinstance(m, nnx.Dropout)
    key = nnx.clone(m).rngs()  # the key the next call draws
    np.testing.assert_array_equal(m(x), dropnorm.drop_block(key, x, 0.3, True,
                                                            block_size=(3, 5)))
    assert int(m.rngs.count[...]) == 1  # one key per training call
    k = jax.random.key(3)
    np.testing.assert_array_equal(m(x, rngs=k), dropnorm.drop_block(k, x, 0.3, True,
                                                                    block_size=(3, 5)))
    np.testing.assert_array_equal(m(x, deterministic=True), x)
    np.testing.assert_array_equal(dnx.DropBlock(0.0, block_size=3)(x), x)  # no RNG needed
    # Selected by class as Flax's own dropout: eval(), set_attributes, nnx.view, view_info.
    m.eval()
    np.testing.assert_array_equal(m(x), x)
    m.set_attributes(nnx.Dropout, deterministic=False)
    assert m.deterministic is False
    view = nnx.view(m, only=nnx.Dropout, deterministic=True)
    assert view.deterministic is True and m.deterministic is False
    assert "deterministic: bool | None = None" in nnx.view_info(m)


def test_modules_under_jit_fresh_masks_and_traced_rate():
    from flax import nnx

    from dropnorm import linen as dnn
    from dropnorm import nnx as dnx

    x = jnp.ones((2, 16, 16, 2))
    m = dnx.DropBlock(0.3, block_size=3, rngs=nnx.Rngs(dropout=0))
    f = nnx.jit(lambda m, x: m(x))
    masks = [np.asarray(f(m, x) == 0) for _ in range(3)]
    assert masks[0].any() and not np.array_equal(masks[0], masks[1])  # the stream moves on
    assert int(m.rngs.count[...]) == 3
    # linen under jax.jit, with the rate and the flag traced: the static results.
    rngs = {"dropout": jax.random.key(1)}
    g = jax.jit(lambda r, det: dnn.DropBlock(r, 3).apply({}, x, det, rngs=rngs))
    static = dnn.DropBlock(0.3, 3).apply({}, x, False, rngs=rngs)
    np.testing.assert_array_equal(g(jnp.float32(0.3), jnp.asarray(False)) == 0, static == 0)
    np.testing.assert_allclose(g(jnp.float32(0.3), jnp.asarray(False)), static, rtol=1e-6)
    np.testing.assert_array_equal(g(jnp.float32(0.3), jnp.asarray(True)), x)
    np.testing.assert_array_equal(g(jnp.float32(1.0), jnp.asarray(False)), 0 * x)


def test_linen_model_init_apply_and_gradients():
    import flax.linen as nn

    from dropnorm import linen as dnn

    class ConvNet(nn.Module):
        @nn.compact
        def __call__(self, x, train: bool):
            x = nn.relu(nn.Dense(4)(x))  # per position: a 1x1 convolution
            x = dnn.DropBlock(0.2, 3, deterministic=not train)(x)
            return nn.Dense(2)(x.mean((1, 2)))

    x = _maps((4, 10, 10, 1))
    model = ConvNet()
    # jitted: one compilation each instead of many small eager ones (the test's run time)
    init = jax.jit(model.init, static_argnames="train")
    apply = jax.jit(model.apply, static_argnames="train")
    variables = init(jax.random.key(0), x, train=False)  # no dropout RNG needed
    y_eval = apply(variables, x, train=False)
    y1 = apply(variables, x, train=True, rngs={"dropout": jax.random.key(1)})
    y2 = apply(variables, x, train=True, rngs={"dropout": jax.random.key(2)})
    assert not np.allclose(y1, y_eval) and not np.allclose(y1, y2)

    def loss(params):
        out = model.apply({"params": params}, x, train=True, rngs={"dropout": jax.random.key(1)})
        return jnp.sum(out**2)

    g = jax.jit(jax.grad(loss))(variables["params"])
    assert all(np.all(np.isfinite(a)) for a in jax.tree.leaves(g))
    assert float(jnp.abs(g["Dense_0"]["kernel"]).sum()) > 0


_MODULE_ERRORS = [
    # (module, call, words the message must contain)
    ("linen", lambda dnn, dnx, x: dnn.DropBlock(0.1, 13).apply({}, x, False, jax.random.key(0)),
     ["`block_size`=13 is larger than the feature map", "(inputs.shape=(2, 12, 12, 3))"]),
    ("linen", lambda dnn, dnx, x: dnn.DropBlock(0.1, 13).apply({}, x, True),  # in eval too
     ["`block_size`=13 is larger than the feature map"]),
    ("linen", lambda dnn, dnx, x: dnn.DropBlock(0.1, 3, spatial_axes=(1, 5)).apply(
        {}, x, False, jax.random.key(0)), ["`spatial_axes`"]),
    ("linen", lambda dnn, dnx, x: dnn.DropBlock(1.5, 3).apply({}, x, False, jax.random.key(0)),
     ["`rate`"]),
    ("linen", lambda dnn, dnx, x: dnn.DropBlock(0.1, 3).apply(
        {}, jnp.ones((2, 12, 12, 3), jnp.int32), False, jax.random.key(0)), ["`inputs`"]),
    ("linen", lambda dnn, dnx, x: dnn.DropBlock(0.1, 3).apply({}, jax.random.key(0), False, x),
     ["swapped", "`rng`"]),
    ("nnx", lambda dnn, dnx, x: dnx.DropBlock(0.1, block_size=13)(x, rngs=jax.random.key(0)),
     ["`block_size`=13 is larger than the feature map", "(inputs.shape=(2, 12, 12, 3))"]),
    ("nnx", lambda dnn, dnx, x: dnx.DropBlock(0.1, block_size=13, deterministic=True)(x),
     ["`block_size`=13 is larger than the feature map"]),
    ("nnx", lambda dnn, dnx, x: dnx.DropBlock(0.1, block_size=0)(x, rngs=jax.random.key(0)),
     ["`block_size` must be a positive int"]),
    ("nnx", lambda dnn, dnx, x: dnx.DropBlock(0.1, block_size=3, channel_axis=None,
                                              share_channels=True)(x, rngs=jax.random.key(0)),
     ["`share_channels`=True needs a `channel_axis`"]),
    ("nnx", lambda dnn, dnx, x: dnx.DropBlock(0.1, block_size=3)(jax.random.key(0), rngs=x),
     ["swapped", "`rngs`"]),
]


@pytest.mark.parametrize("case", _MODULE_ERRORS, ids=[f"{c[0]}-{i}" for i, c in
                                                      enumerate(_MODULE_ERRORS)])
def test_module_errors_name_the_module_and_its_arguments(case):
    from dropnorm import linen as dnn
    from dropnorm import nnx as dnx

    api, call, words = case
    with pytest.raises((ValueError, TypeError)) as info:
        call(dnn, dnx, jnp.ones((2, 12, 12, 3)))
    msg = str(info.value)
    assert msg.startswith(f"dropnorm.{api}.DropBlock: "), msg
    for word in words:
        assert word in msg, (word, msg)
    # Nothing in the pure API's terms: the modules have no `train`, `key` or `x`.
    assert "train=" not in msg and "`train`" not in msg and "`key`" not in msg, msg
    assert "`x`" not in msg and "x.shape" not in msg.replace("inputs.shape", ""), msg
