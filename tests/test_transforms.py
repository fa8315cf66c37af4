"""dropout and batch_norm under every JAX transform: jit, vmap, grad, jvp, hessian, scan, remat.

Float64 checks run inside ``jax.enable_x64(True)`` context managers, so the
setting never leaks into other tests. Tolerances: ``check_grads`` uses JAX's
float64 defaults (1e-5, central differences with step 1e-4); comparisons of the
same float32 computation under two transforms (vmap vs loop, scan vs loop,
checkpoint vs not) allow 1e-6 (a few ulps: XLA may fuse them differently).
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from helpers import TraceCounter, f64, primitive_names, random_normal
from jax.test_util import check_grads

import dropnorm

KEY = jax.random.key(0)
SAME = dict(rtol=1e-6, atol=1e-6)  # one float32 computation under two transforms


def _params_state(c, seed, dtype=jnp.float32):
    rng = np.random.default_rng(seed)
    params = dropnorm.BatchNormParams(jnp.asarray(rng.uniform(0.5, 2.0, c), dtype),
                                      jnp.asarray(rng.uniform(-1.0, 1.0, c), dtype))
    sdt = jnp.float64 if dtype == jnp.float64 else jnp.float32  # float64 tests: float64 state
    state = dropnorm.BatchNormState(jnp.asarray(rng.uniform(-1.0, 1.0, c), sdt),
                                    jnp.asarray(rng.uniform(0.5, 2.0, c), sdt),
                                    jnp.asarray(0, jnp.int32))
    return params, state


# ---------------------------------------------------------------- jit: one trace for all values


def test_dropout_jit_traced_rate_and_train_do_not_recompile():
    x = random_normal((32, 16), seed=1)
    counted = TraceCounter(lambda key, x, rate, train: dropnorm.dropout(key, x, rate, train))
    f = jax.jit(counted)
    for rate in (0.1, 0.5, 0.9, 0.0, 1.0):
        for train in (True, False):
            y = f(KEY, x, rate, train)
            want = dropnorm.dropout(KEY, x, rate, train)  # the static (Python) path
            np.testing.assert_array_equal(np.asarray(y), np.asarray(want))
    assert counted.traces == 1


def test_batch_norm_jit_traced_train_and_momentum_do_not_recompile():
    x = random_normal((16, 4), seed=2, loc=1.0, scale=2.0)
    params, state = _params_state(4, 3)
    counted = TraceCounter(
        lambda p, s, x, train, m: dropnorm.batch_norm(p, s, x, train, momentum=m))
    f = jax.jit(counted)
    for train in (True, False, True):
        for momentum in (0.9, 0.99):
            y, new = f(params, state, x * (1 + momentum), train, momentum)
            y_s, new_s = dropnorm.batch_norm(params, state, x * (1 + momentum), train,
                                             momentum=momentum)
            np.testing.assert_allclose(f64(y), f64(y_s), rtol=1e-5, atol=1e-5)  # float32
            np.testing.assert_allclose(f64(new.var), f64(new_s.var), rtol=1e-6)
            assert int(new.count) == int(new_s.count)
    assert counted.traces == 1


def test_python_values_keep_the_static_fast_path():
    x = jnp.ones((8, 4))
    # Python train=False / rate=0: no random numbers and no cond in the program.
    for rate, train in ((0.5, False), (0.0, True)):
        names = primitive_names(lambda x, r=rate, t=train: dropnorm.dropout(KEY, x, r, t), x)
        assert "cond" not in names and "random_bits" not in names, names
    # A traced train goes through one lax.cond.
    names = primitive_names(lambda x, t: dropnorm.dropout(KEY, x, 0.5, t), x, True)
    assert "cond" in names, names
    # batch_norm with Python train=False computes no batch statistics (no reduction).
    params, state = dropnorm.batch_norm_init(4)
    names = primitive_names(lambda x: dropnorm.batch_norm(params, state, x, False)[0], x)
    assert "reduce_sum" not in names, names
    names = primitive_names(lambda x: dropnorm.batch_norm(params, state, x, True)[0], x)
    assert "reduce_sum" in names, names


# ---------------------------------------------------------------- vmap over an ensemble


def test_vmap_over_an_ensemble_equals_a_loop():
    e, c = 3, 5
    members = [_params_state(c, 10 + i) for i in range(e)]
    params = jax.tree.map(lambda *a: jnp.stack(a), *[m[0] for m in members])
    state = jax.tree.map(lambda *a: jnp.stack(a), *[m[1] for m in members])
    xs = jnp.stack([random_normal((12, c), seed=20 + i, loc=i, scale=1 + i) for i in range(e)])
    keys = jax.random.split(KEY, e)

    def member(key, p, s, x, train):
        y, s = dropnorm.batch_norm(p, s, x, train, momentum=0.9)
        return dropnorm.dropout(key, y, 0.3, train), s

    for train in (True, False):
        ys, new = jax.vmap(member, in_axes=(0, 0, 0, 0, None))(keys, params, state, xs, train)
        for i in range(e):
            p_i, s_i = jax.tree.map(lambda a, i=i: a[i], (params, state))
            y_i, new_i = member(keys[i], p_i, s_i, xs[i], train)
            np.testing.assert_allclose(f64(ys[i]), f64(y_i), **SAME)
            for a, b in zip(new, new_i, strict=True):
                np.testing.assert_allclose(f64(a[i]), f64(b), **SAME)
    # Members differ (different keys, data and params): the ensemble is not one model copied.
    assert not np.allclose(f64(ys[0]), f64(ys[1]))


def test_vmap_dropout_with_keys_gives_independent_masks():
    keys = jax.random.split(KEY, 4)
    ys = jax.vmap(lambda k: dropnorm.dropout(k, jnp.ones(4096), 0.5, True))(keys)
    for i in range(4):
        np.testing.assert_array_equal(
            np.asarray(ys[i]), np.asarray(dropnorm.dropout(keys[i], jnp.ones(4096), 0.5, True)))
    assert not np.array_equal(np.asarray(ys[0]), np.asarray(ys[1]))


# ---------------------------------------------------------------- grad, jvp, hessian


def _ref_batch_norm(x, scale, bias, epsilon=1e-5):
    """A plain jnp two-pass batch norm, written here: the derivative oracle (run in float64)."""
    mean = jnp.mean(x, 0)
    var = jnp.mean(jnp.square(x - mean), 0)
    return (x - mean) / jnp.sqrt(var + epsilon) * scale + bias, mean, var


def test_batch_norm_grad_jvp_hessian_match_a_float64_reference():
    with jax.enable_x64(True):
        x = random_normal((6, 3), np.float64, seed=30, loc=1.0, scale=2.0)
        params, state = _params_state(3, 31, jnp.float64)
        w = random_normal((6, 3), np.float64, seed=32)

        def loss(x, scale, bias):
            y, new = dropnorm.batch_norm(dropnorm.BatchNormParams(scale, bias), state, x, True,
                                         momentum=0.5)
            return jnp.sum(jnp.tanh(y) * w) + jnp.sum(new.mean ** 2) + jnp.sum(new.var)

        def ref_loss(x, scale, bias):
            y, mean, var = _ref_batch_norm(x, scale, bias)
            new_mean = 0.5 * state.mean + 0.5 * mean
            new_var = 0.5 * state.var + 0.5 * var
            return jnp.sum(jnp.tanh(y) * w) + jnp.sum(new_mean ** 2) + jnp.sum(new_var)

        args = (x, params.scale, params.bias)
        # All float64 (the state too): two orders of summation, 1e-9 is ~1e6 ulps of headroom.
        tol = dict(rtol=1e-9, atol=1e-9)
        assert loss(*args).dtype == jnp.float64
        np.testing.assert_allclose(loss(*args), ref_loss(*args), **tol)
        grads = jax.jit(jax.grad(loss, (0, 1, 2)))(*args)
        for g, r in zip(grads, jax.jit(jax.grad(ref_loss, (0, 1, 2)))(*args), strict=True):
            np.testing.assert_allclose(g, r, **tol)
        tangents = (w, jnp.ones(3), jnp.full(3, 0.5))
        _, t = jax.jit(lambda a, t: jax.jvp(loss, a, t))(args, tangents)
        _, t_ref = jax.jit(lambda a, t: jax.jvp(ref_loss, a, t))(args, tangents)
        np.testing.assert_allclose(t, t_ref, **tol)
        h = jax.jit(jax.hessian(loss))(*args)
        np.testing.assert_allclose(h, jax.jit(jax.hessian(ref_loss))(*args), **tol)
        assert np.all(np.isfinite(h))


def test_dropout_grad_jvp_hessian():
    x = random_normal((50,), seed=40)
    y = dropnorm.dropout(KEY, x, 0.4, True)
    scale = np.where(np.asarray(y) != 0, np.asarray(y / x), 0.0)  # 0 or 1/p, from the forward
    kept = scale != 0
    assert 0 < kept.sum() < 50
    np.testing.assert_allclose(scale[kept], 65536 / 39322, rtol=1e-6)  # p = 39322/65536 (16 bits)
    g = jax.grad(lambda x: jnp.sum(dropnorm.dropout(KEY, x, 0.4, True)))(x)
    np.testing.assert_allclose(g, scale, rtol=1e-6)
    _, t = jax.jvp(lambda x: dropnorm.dropout(KEY, x, 0.4, True), (x,), (jnp.ones(50),))
    np.testing.assert_allclose(t, scale, rtol=1e-6)
    h = jax.jit(jax.hessian(lambda x: jnp.sum(dropnorm.dropout(KEY, x, 0.4, True) ** 2)))(x[:8])
    np.testing.assert_allclose(h, np.diag(2 * scale[:8] ** 2), rtol=1e-6)
    # Traced rate and traced train under jit: the same gradient.
    g2 = jax.jit(jax.grad(lambda x, r, t: jnp.sum(dropnorm.dropout(KEY, x, r, t))))(x, 0.4, True)
    np.testing.assert_allclose(g2, scale, rtol=1e-6)


@pytest.mark.parametrize("rate", [0.0, 0.3, 1.0])
def test_check_grads_dropout_order_2_float64(rate):
    with jax.enable_x64(True):
        x = random_normal((4, 5), np.float64, seed=50)
        traced = jax.jit(lambda x, r: dropnorm.dropout(KEY, x, r, True, broadcast_dims=(0,)))

        def static(x):  # Python rate: the static path
            return jnp.sin(dropnorm.dropout(KEY, x, rate, True)) * x

        def dynamic(x):  # traced rate and a shared mask along axis 0
            return jnp.sin(traced(x, jnp.float64(rate))) * x

        for f in (static, dynamic):
            assert f(x).dtype == jnp.float64
            check_grads(jax.jit(f), (x,), order=2, modes=("fwd", "rev"))


@pytest.mark.parametrize("train", [True, False])
def test_check_grads_batch_norm_order_2_float64(train):
    with jax.enable_x64(True):
        x = random_normal((5, 2, 3), np.float64, seed=60, loc=0.5, scale=1.5)
        params, state = _params_state(3, 61, jnp.float64)
        mask = jnp.asarray(np.random.default_rng(62).random((5, 2, 1)) > 0.3)
        _, state2 = dropnorm.batch_norm_init((2, 3), dtype=jnp.float64)

        def f(x, scale, bias):
            y, new = dropnorm.batch_norm(dropnorm.BatchNormParams(scale, bias), state, x, train,
                                         momentum=0.9)
            return jnp.tanh(y), new.mean, new.var

        def f_masked(x, scale, bias):
            y, _ = dropnorm.batch_norm(dropnorm.BatchNormParams(scale, bias), state2, x, train,
                                       mask=mask, axis=(1, 2))
            return y

        assert f(x, params.scale, params.bias)[0].dtype == jnp.float64
        check_grads(jax.jit(f), (x, params.scale, params.bias), order=2, modes=("fwd", "rev"))
        check_grads(jax.jit(f_masked), (x, params.scale[None, :].repeat(2, 0),
                               params.bias[None, :].repeat(2, 0)), order=2, modes=("fwd", "rev"))


# ---------------------------------------------------------------- scan over stacked layers, remat


def _block(h, layer):
    """Dense -> batch_norm -> relu -> dropout: one layer of the stack (a scan body)."""
    w, params, state, key = layer
    h = h @ w
    h, state = dropnorm.batch_norm(params, state, h, True, momentum=0.9)
    h = dropnorm.dropout(key, jax.nn.relu(h), 0.2, True)
    return h, state


def _stack(n_layers, width, seed):
    rng = np.random.default_rng(seed)
    ws = jnp.asarray(rng.standard_normal((n_layers, width, width)) / np.sqrt(width), jnp.float32)
    layers = [_params_state(width, seed + i) for i in range(n_layers)]
    params = jax.tree.map(lambda *a: jnp.stack(a), *[p for p, _ in layers])
    state = jax.tree.map(lambda *a: jnp.stack(a), *[s for _, s in layers])
    return ws, params, state, jax.random.split(jax.random.key(seed), n_layers)


def _looped(x, ws, params, stack):
    h, states = x, []
    for i in range(len(ws)):
        h, s = _block(h, jax.tree.map(lambda a, i=i: a[i], (ws, params, stack[2], stack[3])))
        states.append(s)
    return jnp.sum(h ** 2), jax.tree.map(lambda *a: jnp.stack(a), *states)


def test_scan_over_stacked_layers_equals_a_python_loop():
    n_layers, width = 4, 6
    stack = _stack(n_layers, width, 70)
    x = random_normal((10, width), seed=71)

    def scanned(x, ws, params):
        h, states = jax.lax.scan(_block, x, (ws, params, stack[2], stack[3]))
        return jnp.sum(h ** 2), states

    looped = functools.partial(_looped, stack=stack)

    (l_s, st_s), g_s = jax.jit(jax.value_and_grad(scanned, (0, 1, 2), has_aux=True))(
        x, *stack[:2])
    (l_l, st_l), g_l = jax.jit(jax.value_and_grad(looped, (0, 1, 2), has_aux=True))(
        x, *stack[:2])
    np.testing.assert_allclose(f64(l_s), f64(l_l), rtol=1e-5)  # float32 sum over 60 values
    # The float64 loop is the oracle for both. Gradients through 4 batch norms of 10 examples
    # amplify float32 rounding: scan and loop were measured 1.5e-4 and 2.0e-4 (relative, with a
    # 1e-3 floor) from float64, with the statistics' earlier shift as with the running mean;
    # so the two float32 programs, compiled in different orders, may differ by that much
    # (measured: 1.7e-5). Tolerances: 1e-3 against float64, 2e-4 between the two.
    with jax.enable_x64(True):
        to64 = lambda t: jax.tree.map(  # noqa: E731
            lambda a: a.astype(jnp.float64) if a.dtype == jnp.float32 else a, t)
        stack64 = to64(stack)
        (_, st_64), g_64 = jax.jit(jax.value_and_grad(
            functools.partial(_looped, stack=stack64), (0, 1, 2), has_aux=True))(
            to64(x), *stack64[:2])
    for a, b, c in zip(jax.tree.leaves((st_s, g_s)), jax.tree.leaves((st_l, g_l)),
                       jax.tree.leaves((st_64, g_64)), strict=True):
        np.testing.assert_allclose(f64(a), f64(b), rtol=2e-4, atol=2e-4)
        for ours in (a, b):
            np.testing.assert_allclose(f64(ours), f64(c), rtol=1e-3, atol=1e-3)
    assert st_s.count.tolist() == [1] * n_layers


def test_checkpoint_gives_the_same_values_and_gradients():
    stack = _stack(1, 8, 80)
    layer = jax.tree.map(lambda a: a[0], stack)
    x = random_normal((12, 8), seed=81)

    def loss(x, w, params, block):
        h, state = block(x, (w, params, layer[2], layer[3]))
        return jnp.sum(jnp.sin(h)), state

    plain = jax.value_and_grad(loss, (0, 1, 2), has_aux=True)
    outs = [jax.jit(plain, static_argnums=3)(x, layer[0], layer[1], _block)]
    for policy in (None, jax.checkpoint_policies.nothing_saveable):
        remat = jax.checkpoint(_block, policy=policy)
        outs.append(jax.jit(plain, static_argnums=3)(x, layer[0], layer[1], remat))
    for other in outs[1:]:
        for a, b in zip(jax.tree.leaves(outs[0]), jax.tree.leaves(other), strict=True):
            np.testing.assert_allclose(f64(a), f64(b), rtol=1e-5, atol=1e-6)
    # The gradient is not trivially zero.
    assert float(jnp.abs(outs[0][1][0]).max()) > 0
