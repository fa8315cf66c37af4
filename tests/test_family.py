"""The rest of the family: alpha / Gaussian dropout, drop-path, batch renormalisation, folding.

Evidence: statistics against PyTorch's own alpha dropout, float64 NumPy oracles
(batch renorm forward and its gradient with r and d held constant, folding
against a float64 torch convolution), hypothesis properties, and the shared
conventions of the dropout family (traced rate and train, rate 1, errors, dtypes).

Statistical tolerances are 6 standard errors of the estimate (a false failure
has probability ~1e-9 per check; the keys are fixed, so the tests are
deterministic anyway). Float32-against-float64 tolerances are stated where used.
"""

from __future__ import annotations

import math

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

import dropnorm

N = 200_000  # samples for the moment checks: standard error of a mean ~ 1/sqrt(N) = 0.0022
SE6 = 6.0 / math.sqrt(N)
ALPHA = 1.7580993408473766  # -SELU scale * alpha, the constant PyTorch hard-codes


def _selu_input(n=N, seed=0):
    # SELU of a standard normal pre-activation has mean ~0 and variance ~1: the fixed point
    # that alpha dropout is designed to keep.
    z = np.random.default_rng(seed).standard_normal(n).astype(np.float32)
    return np.array(jax.nn.selu(z))  # a writable copy, as torch.from_numpy wants


def _affine_parts(run):
    """(keep mask, a, b, c) of ``y = a x + b`` (kept) / ``y = c`` (dropped) from x = 0 and 1."""
    y0, y1 = run(0.0), run(1.0)
    kept = y1 != y0
    a, b, c = (y1 - y0)[kept], y0[kept], y0[~kept]
    # Each must be one constant; return it.
    for v in (a, b, c):
        assert v.size and np.ptp(v) <= 1e-6 * max(1.0, np.abs(v).max())
    return kept, float(a[0]), float(b[0]), float(c[0])


# --- alpha dropout ----------------------------------------------------------------------------


@pytest.mark.parametrize("rate", [0.1, 0.3, 0.5])
def test_alpha_dropout_keeps_mean_and_variance_like_torch(rate):
    x = _selu_input()
    y = np.asarray(dropnorm.alpha_dropout(jax.random.key(1), jnp.asarray(x), rate, True),
                   np.float64)
    torch.manual_seed(1)
    yt = torch.nn.functional.alpha_dropout(torch.from_numpy(x), rate, True).numpy()
    yt = yt.astype(np.float64)
    xm, xv = x.astype(np.float64).mean(), x.astype(np.float64).var()
    for out in (y, yt):
        # Mean and variance are kept (relative to the input's own sample moments). The
        # variance of y**2 is ~3 for near-normal data, so its standard error is ~sqrt(3/N).
        assert abs(out.mean() - xm) < SE6
        assert abs(out.var() - xv) < 6 * math.sqrt(3.0 / N)
    # ...and the two libraries' moments agree (two independent samples: sqrt(2) more room).
    assert abs(y.mean() - yt.mean()) < math.sqrt(2) * SE6
    assert abs(y.var() - yt.var()) < math.sqrt(2) * 6 * math.sqrt(3.0 / N)
    # The dropped fraction is the (quantised) rate in both.
    q = round((1 - rate) * 65536) / 65536  # the default 16-bit quantisation
    for out in (y, yt):
        dropped = np.isclose(out, out.min()).mean()  # dropped units sit at the minimum value
        assert abs(dropped - (1 - q)) < 6 * math.sqrt(q * (1 - q) / N) + abs(q - (1 - rate))


@pytest.mark.parametrize("rate", [0.125, 0.25, 0.5, 0.75])
def test_alpha_dropout_affine_constants_equal_torch(rate):
    """Rates that are multiples of 1/256 have the same keep probability in both libraries."""
    n = 4096
    ours = _affine_parts(lambda v: np.asarray(
        dropnorm.alpha_dropout(jax.random.key(2), jnp.full(n, v), rate, True)))

    def torch_run(v):
        torch.manual_seed(2)
        return torch.nn.functional.alpha_dropout(torch.full((n,), v), rate, True).numpy()

    theirs = _affine_parts(torch_run)
    # Float64 formulas: a = ((1 - p)(1 + alpha^2 p))^-1/2, b = a alpha p, c = -a alpha (1 - p).
    a = ((1 - rate) * (1 + ALPHA**2 * rate)) ** -0.5
    expected = (a, a * ALPHA * rate, -a * ALPHA * (1 - rate))
    # Float32 constants: 2 ulps of relative error.
    np.testing.assert_allclose(ours[1:], expected, rtol=3e-7)
    np.testing.assert_allclose(theirs[1:], expected, rtol=3e-7)


def test_alpha_dropout_broadcast_dims_is_feature_alpha_dropout():
    shape, rate = (64, 16, 3, 4), 0.5  # NCHW: whole channels are dropped
    ours, _, _, _ = _affine_parts(lambda v: np.asarray(dropnorm.alpha_dropout(
        jax.random.key(3), jnp.full(shape, v), rate, True, broadcast_dims=(2, 3))))

    def torch_run(v):
        torch.manual_seed(3)
        return torch.nn.functional.feature_alpha_dropout(torch.full(shape, v), rate, True).numpy()

    theirs, _, _, _ = _affine_parts(torch_run)
    for kept in (ours, theirs):
        per_channel = kept.reshape(64, 16, -1)
        assert np.all(per_channel.all(-1) | ~per_channel.any(-1))  # all or nothing per channel
        frac = per_channel[..., 0].mean()
        assert abs(frac - 0.5) < 6 * math.sqrt(0.25 / (64 * 16))
    # And the moments are kept with a standard-normal input.
    x = jax.random.normal(jax.random.key(4), (256, 64, 4, 4))
    y = dropnorm.alpha_dropout(jax.random.key(5), x, rate, True, broadcast_dims=(2, 3))
    n_groups = 256 * 64  # the noise has one draw per channel: that is the effective sample size
    assert abs(float(y.mean())) < 6 / math.sqrt(n_groups)
    assert abs(float(y.var()) - 1.0) < 6 * math.sqrt(3.0 / n_groups)


# --- Gaussian dropout and drop-path ---------------------------------------------------------


@pytest.mark.parametrize("rate", [0.1, 0.5, 0.8])
def test_gaussian_dropout_multiplier_has_mean_one_and_variance_rate_over_keep(rate):
    m = np.asarray(dropnorm.gaussian_dropout(jax.random.key(6), jnp.ones(N), rate, True),
                   np.float64)
    var = rate / (1 - rate)
    assert abs(m.mean() - 1.0) < SE6 * math.sqrt(var)
    # Normal noise: Var(s^2) = 2 var^2, so the relative standard error is sqrt(2/N).
    assert abs(m.var() / var - 1.0) < 6 * math.sqrt(2.0 / N)


def test_gaussian_dropout_broadcast_dims_shares_the_noise():
    x = jnp.ones((8, 5, 3))
    y = dropnorm.gaussian_dropout(jax.random.key(7), x, 0.5, True, broadcast_dims=(1,))
    np.testing.assert_array_equal(np.asarray(y), np.broadcast_to(np.asarray(y[:, :1]), y.shape))
    assert float(jnp.std(y[:, 0])) > 0.1


def test_drop_path_drops_whole_examples_and_scales_survivors():
    n, rate = 4096, 0.25
    x = jax.random.normal(jax.random.key(8), (n, 3, 2)) + 3.0  # no zeros in x
    y = np.asarray(dropnorm.drop_path(jax.random.key(9), x, rate, True))
    ratio = (y / np.asarray(x)).reshape(n, -1)
    keep = 192 / 256  # round(0.75 * 256) / 256, exact
    # Every example is either zero or the input scaled by exactly 1/keep.
    dropped = np.all(ratio == 0, 1)
    np.testing.assert_allclose(ratio[~dropped], 1 / keep, rtol=1e-6)  # float32 division
    assert abs(dropped.mean() - rate) < 6 * math.sqrt(rate * (1 - rate) / n)
    assert abs(y.mean() / float(x.mean()) - 1) < 0.03  # E[y] = x (6 SE over 4096 examples)
    with pytest.raises(ValueError, match="batch axis"):
        dropnorm.drop_path(jax.random.key(0), jnp.float32(1.0), 0.5, True)


# --- conventions shared by the whole dropout family -------------------------------------------

FAMILY = {
    "dropout": dropnorm.dropout,
    "alpha_dropout": dropnorm.alpha_dropout,
    "gaussian_dropout": dropnorm.gaussian_dropout,
    "drop_path": dropnorm.drop_path,
}


@pytest.mark.parametrize("name", FAMILY)
def test_traced_rate_and_train_inside_jit(name):
    fn = FAMILY[name]
    key, x = jax.random.key(10), jax.random.normal(jax.random.key(11), (32, 8))
    traced = jax.jit(lambda k, x, r, t: fn(k, x, r, t))
    for rate in (0.25, 0.5):  # multiples of 1/256: static and traced quantise identically
        expected = fn(key, x, rate, True)
        got = traced(key, x, jnp.float32(rate), jnp.bool_(True))
        # The static path computes its constants in float64 then rounds; the traced path in
        # float32: 2 ulps.
        np.testing.assert_allclose(np.asarray(got), np.asarray(expected), rtol=3e-7, atol=1e-7)
        assert not np.allclose(np.asarray(got), np.asarray(x))
    np.testing.assert_array_equal(np.asarray(traced(key, x, jnp.float32(0.5), jnp.bool_(False))),
                                  np.asarray(x))
    np.testing.assert_allclose(np.asarray(traced(key, x, jnp.float32(0.0), jnp.bool_(True))),
                               np.asarray(x), rtol=1e-7)
    assert traced._cache_size() == 1  # one compiled function for every rate and mode


@pytest.mark.parametrize("name", FAMILY)
@pytest.mark.parametrize("traced", [False, True])
def test_rate_one_gives_zeros_and_zero_gradient_not_nan(name, traced):
    fn = FAMILY[name]
    key, x = jax.random.key(12), jax.random.normal(jax.random.key(13), (16, 4))

    def f(x, rate):
        return fn(key, x, rate, True)

    rate = jnp.float32(1.0) if traced else 1.0
    run = jax.jit(f) if traced else f
    y = run(x, rate)
    np.testing.assert_array_equal(np.asarray(y), 0.0)
    g = jax.grad(lambda x: jnp.sum(f(x, rate) ** 2 + f(x, rate)))(x)
    assert np.all(np.isfinite(np.asarray(g)))
    np.testing.assert_array_equal(np.asarray(g), 0.0)


@pytest.mark.parametrize("name", FAMILY)
@pytest.mark.parametrize("bad", [-0.1, 1.5, float("nan"), True, "0.5", np.array([0.1, 0.2])])
def test_bad_rates_are_clear_errors(name, bad):
    with pytest.raises(ValueError, match=rf"{name}: `rate`"):
        FAMILY[name](jax.random.key(0), jnp.ones((4, 4)), bad, True)


@pytest.mark.parametrize("name", FAMILY)
def test_bad_traced_rate_poisons_the_output_and_other_errors(name):
    fn = FAMILY[name]
    y = jax.jit(lambda r: fn(jax.random.key(0), jnp.ones((4, 4)), r, True))(jnp.float32(1.5))
    assert np.all(np.isnan(np.asarray(y)))
    with pytest.raises(TypeError, match="floating"):
        fn(jax.random.key(0), jnp.ones((4, 4), jnp.int32), 0.5, True)
    with pytest.raises(TypeError, match="`key` is None"):
        fn(None, jnp.ones((4, 4)), 0.5, True)
    with pytest.raises(TypeError, match="`train` must be"):
        fn(jax.random.key(0), jnp.ones((4, 4)), 0.5, "yes")


@pytest.mark.parametrize("name", FAMILY)
@pytest.mark.parametrize("dtype", [jnp.bfloat16, jnp.float16, jnp.float32])
def test_dtype_is_kept(name, dtype):
    fn = FAMILY[name]
    x = jax.random.normal(jax.random.key(14), (16, 8)).astype(dtype)
    assert fn(jax.random.key(15), x, 0.3, True).dtype == dtype
    assert jax.jit(lambda r: fn(jax.random.key(15), x, r, True))(0.3).dtype == dtype
    g = jax.grad(lambda x: jnp.sum(fn(jax.random.key(15), x, 0.3, True).astype(jnp.float32)))(x)
    assert g.dtype == dtype


# --- batch renormalisation --------------------------------------------------------------------


def _bn_setup(shape=(32, 5), seed=20):
    rng = np.random.default_rng(seed)
    c = shape[-1]
    params = dropnorm.BatchNormParams(jnp.asarray(rng.random(c) + 0.5, jnp.float32),
                                      jnp.asarray(rng.standard_normal(c), jnp.float32))
    # Running statistics far from the batch's, so that r and d are not 1 and 0.
    state = dropnorm.BatchNormState(jnp.asarray(rng.standard_normal(c), jnp.float32),
                                    jnp.asarray(rng.random(c) * 8 + 0.05, jnp.float32),
                                    jnp.asarray(3, jnp.int32))
    x = (rng.standard_normal(shape) * rng.random(c) * 4 + rng.standard_normal(c) * 3)
    return params, state, x.astype(np.float32)


def _renorm_oracle(params, state, x, cot, r_max, d_max, eps=1e-5):
    """Float64 forward and backward with r and d constants (no gradient), features last."""
    x = x.astype(np.float64).reshape(-1, x.shape[-1])
    cot = cot.astype(np.float64).reshape(x.shape)
    gamma, beta = np.asarray(params.scale, np.float64), np.asarray(params.bias, np.float64)
    run_mu, run_s = np.asarray(state.mean, np.float64), np.sqrt(np.asarray(state.var) + eps)
    mu, var = x.mean(0), x.var(0)
    s = np.sqrt(var + eps)
    r = np.clip(s / run_s, 1 / r_max, r_max)
    d = np.clip((mu - run_mu) / run_s, -d_max, d_max)
    xhat = (x - mu) / s
    y = (xhat * r + d) * gamma + beta
    g = cot * gamma * r  # dL/dxhat
    dx = (g - g.mean(0) - xhat * (g * xhat).mean(0)) / s
    return y, dx, (cot * (xhat * r + d)).sum(0), cot.sum(0), (r, d)


@pytest.mark.parametrize("r_max,d_max", [(1.5, 0.5), (3.0, 5.0), (1e6, 1e6)])
def test_batch_renorm_forward_and_gradient_match_float64_oracle(r_max, d_max):
    params, state, x = _bn_setup()
    cot = np.random.default_rng(21).standard_normal(x.shape).astype(np.float32)

    def loss(params, x):
        y, _ = dropnorm.batch_renorm(params, state, x, True, r_max=r_max, d_max=d_max)
        return jnp.sum(y * cot), y

    (_, y), (gp, gx) = jax.value_and_grad(loss, argnums=(0, 1), has_aux=True)(params,
                                                                              jnp.asarray(x))
    y64, dx64, dscale64, dbias64, (r, d) = _renorm_oracle(params, state, x, cot, r_max, d_max)
    if r_max == 1.5:  # the case is meant to clip some features and not others
        assert np.any(np.isclose(r, 1.5) | np.isclose(r, 1 / 1.5)) and np.any(np.abs(d) < 0.5)
    # Float32 against float64 on values of order 1-10, gradients through the cancelling
    # backward formula: rtol 1e-4, atol 1e-4 (f32 eps 1.2e-7 times sums of 32 terms, and the
    # large-r_max case amplifies by r = std / running_std of up to ~30 here).
    np.testing.assert_allclose(np.asarray(y), y64, rtol=1e-5, atol=1e-4)
    np.testing.assert_allclose(np.asarray(gx), dx64, rtol=1e-4, atol=1e-4)
    np.testing.assert_allclose(np.asarray(gp.scale), dscale64, rtol=1e-4, atol=1e-4)
    np.testing.assert_allclose(np.asarray(gp.bias), dbias64, rtol=1e-4, atol=1e-4)
    # Had r and d carried gradient, unclipped renorm would be (x - running_mean) / running_std,
    # whose x-gradient is cot * scale / running_std: a different number, so the check bites.
    naive = cot * np.asarray(params.scale) / np.sqrt(np.asarray(state.var) + 1e-5)
    assert not np.allclose(np.asarray(gx), naive, rtol=1e-2, atol=1e-2)


def test_batch_renorm_unclipped_is_normalisation_by_running_statistics():
    params, state, x = _bn_setup(seed=22)
    y, _ = dropnorm.batch_renorm(params, state, jnp.asarray(x), True, r_max=1e6, d_max=1e6)
    oracle = ((x.astype(np.float64) - np.asarray(state.mean))
              / np.sqrt(np.asarray(state.var, np.float64) + 1e-5)
              * np.asarray(params.scale) + np.asarray(params.bias))
    # f32 against f64; the renorm path computes mean - d * std / r, rounding at |mean| ~ 5.
    np.testing.assert_allclose(np.asarray(y), oracle, rtol=1e-5, atol=1e-4)


@pytest.mark.parametrize("axis,shape", [(-1, (16, 5)), (1, (4, 5, 3, 2))])
def test_batch_renorm_r1_d0_equals_batch_norm_and_shares_its_running_stats(axis, shape):
    params, state, _ = _bn_setup()
    rng = np.random.default_rng(23)
    s_bn = s_rn = state
    for _ in range(3):
        x = jnp.asarray(rng.standard_normal(shape) * 3 + 1, jnp.float32)
        y_bn, s_bn = dropnorm.batch_norm(params, s_bn, x, True, axis=axis, momentum=0.8)
        y_rn, s_rn = dropnorm.batch_renorm(params, s_rn, x, True, axis=axis, momentum=0.8,
                                           r_max=1.0, d_max=0.0)
        # r = 1 and d = 0 exactly, so the same float32 operations run: equal up to 1 ulp.
        np.testing.assert_allclose(np.asarray(y_rn), np.asarray(y_bn), rtol=2e-7, atol=2e-7)
        for a, b in zip(s_rn, s_bn, strict=True):
            np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
    # Running statistics do not depend on the clipping bounds either.
    _, s_clip = dropnorm.batch_renorm(params, state, x, True, axis=axis, momentum=0.8)
    _, s_plain = dropnorm.batch_norm(params, state, x, True, axis=axis, momentum=0.8)
    for a, b in zip(s_clip, s_plain, strict=True):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
    # Evaluation is batch norm's evaluation, bit for bit.
    y_e, s_e = dropnorm.batch_renorm(params, state, x, False, axis=axis)
    y_b, _ = dropnorm.batch_norm(params, state, x, False, axis=axis)
    np.testing.assert_array_equal(np.asarray(y_e), np.asarray(y_b))
    assert s_e is state


def test_batch_renorm_bad_bounds_are_clear_errors():
    params, state, x = _bn_setup()
    with pytest.raises(ValueError, match="`r_max` must be >= 1"):
        dropnorm.batch_renorm(params, state, x, True, r_max=0.5)
    with pytest.raises(ValueError, match="`d_max` must be >= 0"):
        dropnorm.batch_renorm(params, state, x, True, d_max=-1.0)


# Jitted so that each shape compiles once, not op by op.
_jit_bn = jax.jit(lambda p, s, x: dropnorm.batch_norm(p, s, x, True))
_jit_renorm_r1_d0 = jax.jit(lambda p, s, x: dropnorm.batch_renorm(p, s, x, True, r_max=1.0,
                                                                  d_max=0.0))


@settings(max_examples=12, deadline=None)  # small shape ranges: compiles are reused
@given(
    batch=st.integers(2, 5),
    features=st.integers(1, 3),
    extra=st.integers(1, 2),
    seed=st.integers(0, 2**31 - 1),
)
def test_property_renorm_with_r1_d0_is_batch_norm(batch, features, extra, seed):
    rng = np.random.default_rng(seed)
    x = jnp.asarray(rng.standard_normal((batch, extra, features)) * 2 + 1, jnp.float32)
    params, state = dropnorm.batch_norm_init(features)
    state = state._replace(mean=jnp.asarray(rng.standard_normal(features), jnp.float32))
    y_bn, s_bn = _jit_bn(params, state, x)
    y_rn, s_rn = _jit_renorm_r1_d0(params, state, x)
    np.testing.assert_allclose(np.asarray(y_rn), np.asarray(y_bn), rtol=2e-7, atol=2e-7)
    np.testing.assert_array_equal(np.asarray(s_rn.var), np.asarray(s_bn.var))


# --- folding --------------------------------------------------------------------------------


def _bn_eval64(z, params, state, eps=1e-5):
    return ((z - np.asarray(state.mean, np.float64)) / np.sqrt(np.asarray(state.var) + eps)
            * np.asarray(params.scale, np.float64) + np.asarray(params.bias, np.float64))


def _random_bn(c, seed):
    rng = np.random.default_rng(seed)
    params = dropnorm.BatchNormParams(jnp.asarray(rng.random(c) + 0.5, jnp.float32),
                                      jnp.asarray(rng.standard_normal(c), jnp.float32))
    state = dropnorm.BatchNormState(jnp.asarray(rng.standard_normal(c), jnp.float32),
                                    jnp.asarray(rng.random(c) + 0.1, jnp.float32),
                                    jnp.asarray(10, jnp.int32))
    return params, state


@pytest.mark.parametrize("use_bias", [True, False])
def test_fold_dense(use_bias):
    rng = np.random.default_rng(30)
    x = rng.standard_normal((20, 12)).astype(np.float32)
    kernel = rng.standard_normal((12, 7)).astype(np.float32)
    bias = rng.standard_normal(7).astype(np.float32) if use_bias else None
    params, state = _random_bn(7, 31)
    k2, b2 = dropnorm.fold_batch_norm(kernel, bias, params, state)
    assert k2.shape == kernel.shape and b2.shape == (7,)
    folded = np.asarray(jnp.asarray(x) @ k2 + b2)
    z64 = x.astype(np.float64) @ kernel + (0.0 if bias is None else bias)
    oracle = _bn_eval64(z64, params, state)
    # The unfolded float32 layer-then-batch-norm, for the same comparison.
    z = jnp.asarray(x) @ kernel + (0.0 if bias is None else bias)
    unfolded, _ = dropnorm.batch_norm(params, state, z, False)
    # Float32 sums of 12 products of order 1, then scaled by up to ~4.5: atol 1e-4 is ~100 ulps
    # of the outputs (up to ~30); both paths sit equally close to the float64 oracle.
    for out in (folded, np.asarray(unfolded)):
        np.testing.assert_allclose(out, oracle, rtol=1e-5, atol=1e-4)


@pytest.mark.parametrize("use_bias", [True, False])
def test_fold_flax_conv_against_float64_torch_conv(use_bias):
    conv = nn.Conv(6, (3, 3), padding="VALID", use_bias=use_bias)
    x = jax.random.normal(jax.random.key(32), (2, 8, 9, 4))
    variables = conv.init(jax.random.key(33), x)
    kernel = variables["params"]["kernel"]  # (kh, kw, in, out)
    bias = variables["params"]["bias"] + 0.3 if use_bias else None
    params, state = _random_bn(6, 34)
    z = conv.apply({"params": {"kernel": kernel, **({"bias": bias} if use_bias else {})}}, x)
    unfolded, _ = dropnorm.batch_norm(params, state, z, False)

    k2, b2 = dropnorm.fold_batch_norm(kernel, bias, params, state)
    folded = nn.Conv(6, (3, 3), padding="VALID", use_bias=True).apply(
        {"params": {"kernel": k2, "bias": b2}}, x)

    # Float64 oracle: torch's conv2d in double precision (NCHW, OIHW), then batch norm.
    x64 = torch.from_numpy(np.asarray(x, np.float64)).permute(0, 3, 1, 2)
    w64 = torch.from_numpy(np.asarray(kernel, np.float64)).permute(3, 2, 0, 1)
    b64 = None if bias is None else torch.from_numpy(np.asarray(bias, np.float64))
    z64 = torch.nn.functional.conv2d(x64, w64, b64).permute(0, 2, 3, 1).numpy()
    oracle = _bn_eval64(z64, params, state)
    # Float32 sums of 36 products (|x| ~ 1, |k| ~ 0.2) scaled by up to ~4.5: atol 2e-5.
    for out in (np.asarray(folded), np.asarray(unfolded)):
        np.testing.assert_allclose(out, oracle, rtol=1e-5, atol=2e-5)
    assert np.abs(oracle).max() > 1.0


def test_fold_errors_and_dtype():
    params, state = _random_bn(3, 35)
    with pytest.raises(ValueError, match="last axis .* has size 4"):
        dropnorm.fold_batch_norm(jnp.ones((2, 4)), None, params, state)
    with pytest.raises(ValueError, match=r"`bias` must have shape \(3,\)"):
        dropnorm.fold_batch_norm(jnp.ones((2, 3)), jnp.ones(2), params, state)
    k, b = dropnorm.fold_batch_norm(jnp.ones((2, 3), jnp.bfloat16), None, params, state)
    assert k.dtype == b.dtype == jnp.bfloat16


@settings(max_examples=20, deadline=None)
@given(
    n_in=st.integers(1, 6),
    n_out=st.integers(1, 5),
    spatial=st.integers(0, 2),
    use_bias=st.booleans(),
    seed=st.integers(0, 2**31 - 1),
)
def test_property_fold_dense_or_kernel_any_rank(n_in, n_out, spatial, use_bias, seed):
    """For any (..., in, out) kernel, each output feature is scaled and shifted as BN would."""
    rng = np.random.default_rng(seed)
    kernel = rng.standard_normal((2,) * spatial + (n_in, n_out)).astype(np.float32)
    bias = rng.standard_normal(n_out).astype(np.float32) if use_bias else None
    params, state = _random_bn(n_out, seed % 1000)
    k2, b2 = dropnorm.fold_batch_norm(kernel, bias, params, state)
    a = np.asarray(params.scale, np.float64) / np.sqrt(np.asarray(state.var, np.float64) + 1e-5)
    # Folded kernel/bias in float32 against float64: a handful of roundings, rtol 1e-6.
    np.testing.assert_allclose(np.asarray(k2), kernel * a, rtol=1e-6, atol=1e-6)
    b64 = _bn_eval64(0.0 if bias is None else bias.astype(np.float64), params, state)
    np.testing.assert_allclose(np.asarray(b2), b64, rtol=1e-6, atol=1e-6)
