"""Bad input gets a clear error, raised when the function is traced.

Each case runs three ways: eagerly, under ``jax.jit`` with ``x`` traced, and under
``jax.eval_shape`` (which only traces, computing nothing), so every error is
known to be raised at trace time. Each asserts the exception type AND that the
message names the argument and the value received.
"""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import dropnorm

KEY = jax.random.key(0)
X = jnp.ones((4, 3))


def _raises_at_trace(fn, x, exc, *fragments):
    """``fn(x)`` raises ``exc`` eagerly, under jit and under eval_shape; the message has all
    ``fragments``."""
    for run in (fn, jax.jit(fn), lambda x: jax.eval_shape(fn, x)):
        with pytest.raises(exc) as info:
            run(x)
        msg = str(info.value)
        for fragment in fragments:
            assert fragment in msg, (fragment, msg)


DROPOUTS = [dropnorm.dropout, dropnorm.alpha_dropout, dropnorm.gaussian_dropout,
            dropnorm.drop_path]


# ---------------------------------------------------------------- rate


@pytest.mark.parametrize("fn", DROPOUTS, ids=lambda f: f.__name__)
@pytest.mark.parametrize(("rate", "shown"), [
    (-0.1, "-0.1"), (1.5, "1.5"), (float("nan"), "nan"), (np.float32(2.0), "2.0"),
    (jnp.asarray(-1.0), "-1."), (3, "3"), (-1e-9, "-1e-09"),
])
@pytest.mark.parametrize("train", [True, False])
def test_rate_out_of_range_or_nan(fn, rate, shown, train):
    # Checked even when not training: a bad rate is a bug whatever the mode (flax#5497).
    _raises_at_trace(lambda x: fn(KEY, x, rate, train), X, ValueError, "`rate`", shown)


def test_a_keep_probability_is_named_apart_from_the_argument():
    # The fix names the argument and a keep probability by different letters: Equinox's
    # argument is itself called p, where "pass p=1 - p" read as nonsense.
    with pytest.raises(ValueError, match=r"keep probability k, pass `?rate`?=1 - k"):
        dropnorm.dropout(KEY, X, 1.5, True)


@pytest.mark.parametrize("rate", ["0.5", None, [0.5], jnp.array([0.1, 0.2]), True, np.True_,
                                  jnp.asarray(True), 0.5 + 0j, np.complex64(0.5)])
def test_rate_of_the_wrong_kind(rate):
    _raises_at_trace(lambda x: dropnorm.dropout(KEY, x, rate, True), X, ValueError, "`rate`")


def test_traced_rate_must_be_a_real_scalar():
    f = jax.jit(lambda x, r: dropnorm.dropout(KEY, x, r, True))
    with pytest.raises(ValueError, match="`rate`.*shape \\(2,\\)"):
        f(X, jnp.array([0.1, 0.2]))


def test_valid_edge_rates_do_not_raise():
    for rate in (0.0, 1.0, 0, 1, np.float32(0.5), jnp.asarray(0.25)):
        dropnorm.dropout(KEY, X, rate, True)


# ---------------------------------------------------------------- key


@pytest.mark.parametrize(("key", "shown"), [
    (0, "got 0"),
    (1.5, "got 1.5"),
    ("seed", "'seed'"),
    (np.zeros(3, np.uint32), "shape (3,) and dtype uint32"),
    (jnp.zeros(2, jnp.float32), "shape (2,) and dtype float32"),
    (jnp.zeros(2, jnp.int32), "shape (2,) and dtype int32"),
    (jax.random.split(KEY, 2), "shape (2,)"),
    (None, "None"),
])
@pytest.mark.parametrize("fn", DROPOUTS, ids=lambda f: f.__name__)
def test_bad_key_while_training(fn, key, shown):
    _raises_at_trace(lambda x: fn(key, x, 0.5, True), X, TypeError, "`key`", shown)


def test_none_key_with_a_traced_train_flag():
    # A traced flag may be True at run time, so a key is needed.
    f = jax.jit(lambda x, t: dropnorm.dropout(None, x, 0.5, t))
    with pytest.raises(TypeError, match="`key` is None"):
        f(X, True)


def test_none_key_is_fine_in_eval_and_at_rate_zero():
    assert dropnorm.dropout(None, X, 0.5, False) is X
    assert dropnorm.dropout(None, X, 0.0, True) is X


# ---------------------------------------------------------------- train, x, dropout extras


@pytest.mark.parametrize(("train", "shown"), [("yes", "'yes'"), (1, "1"), (None, "None"),
                                              (jnp.ones(2, bool), "shape (2,)"),
                                              (jnp.asarray(1.0), "dtype float32")])
def test_bad_train_flag(train, shown):
    _raises_at_trace(lambda x: dropnorm.dropout(KEY, x, 0.5, train), X, TypeError, "`train`",
                     shown)
    params, state = dropnorm.batch_norm_init(3)
    _raises_at_trace(lambda x: dropnorm.batch_norm(params, state, x, train), X, TypeError,
                     "`train`", shown)


def test_integer_x():
    xi = jnp.ones((4, 3), jnp.int32)
    _raises_at_trace(lambda x: dropnorm.dropout(KEY, x, 0.5, True), xi, TypeError, "`x`",
                     "int32")
    params, state = dropnorm.batch_norm_init(3)
    _raises_at_trace(lambda x: dropnorm.batch_norm(params, state, x, True), xi, TypeError,
                     "`x`", "int32")


@pytest.mark.parametrize(("bdims", "shown"), [((2,), "(2,)"), ((-3,), "(-3,)"),
                                              ((0, 0), "(0, 0)"), (None, "None"), (2, "2"),
                                              ((0.5,), "(0.5,)"), ("01", "'01'")])
def test_bad_broadcast_dims(bdims, shown):
    _raises_at_trace(lambda x: dropnorm.dropout(KEY, x, 0.5, True, broadcast_dims=bdims), X,
                     ValueError, "`broadcast_dims`", shown)


@pytest.mark.parametrize("bits", [0, 4, 7, 8, 64, "8"])
def test_bad_mask_bits(bits):
    _raises_at_trace(lambda x: dropnorm.dropout(KEY, x, 0.5, True, mask_bits=bits), X,
                     ValueError, "`mask_bits`", repr(bits))


# ---------------------------------------------------------------- batch_norm


@pytest.mark.parametrize("train", [True, False])
def test_feature_count_mismatch_names_both_numbers(train):
    params, state = dropnorm.batch_norm_init(5)
    _raises_at_trace(lambda x: dropnorm.batch_norm(params, state, x, train), X, ValueError,
                     "3 features", "5 features", "`state.mean`")
    # Params and state disagree with x separately: the params are named too.
    p4, _ = dropnorm.batch_norm_init(4)
    _, s3 = dropnorm.batch_norm_init(3)
    _raises_at_trace(lambda x: dropnorm.batch_norm(p4, s3, x, train), X, ValueError,
                     "3 features", "4 features", "`params.scale`")
    # With axis=0 the (4, 3) input has 4 features: the message gives the axis.
    _raises_at_trace(lambda x: dropnorm.batch_norm(None, s3, x, train, axis=0), X, ValueError,
                     "4 features", "3 features", "axis 0")


@pytest.mark.parametrize(("momentum", "shown"), [(-0.1, "-0.1"), (1.5, "1.5"),
                                                 (float("nan"), "nan"), ("high", "'high'"),
                                                 ("0.9", "'0.9'"), (True, "True"),
                                                 (0.9 + 0j, "0.9"), ([0.9], "[0.9]")])
@pytest.mark.parametrize("train", [True, False])
def test_momentum_outside_unit_interval(momentum, shown, train):
    params, state = dropnorm.batch_norm_init(3)
    _raises_at_trace(lambda x: dropnorm.batch_norm(params, state, x, train, momentum=momentum),
                     X, ValueError, "`momentum`", shown, "PyTorch")


@pytest.mark.parametrize(("epsilon", "shown"), [(-1e-5, "-1e-05"), (float("nan"), "nan"),
                                                (-math.inf, "-inf"), ("1e-5", "'1e-5'"),
                                                (None, "None"), (True, "True")])
@pytest.mark.parametrize("train", [True, False])
def test_negative_epsilon(epsilon, shown, train):
    params, state = dropnorm.batch_norm_init(3)
    _raises_at_trace(lambda x: dropnorm.batch_norm(params, state, x, train, epsilon=epsilon),
                     X, ValueError, "`epsilon`", shown)


def test_valid_edge_momentum_and_epsilon_do_not_raise():
    params, state = dropnorm.batch_norm_init(3)
    for momentum in (0.0, 1.0, None, 1, np.float32(0.9), jnp.asarray(0.9)):
        dropnorm.batch_norm(params, state, X * jnp.arange(4.0)[:, None], True, momentum=momentum)
    for epsilon in (0.0, 0, 1e-3, np.float32(1e-5), jnp.asarray(1e-5)):
        dropnorm.batch_norm(params, state, X * jnp.arange(4.0)[:, None], True, epsilon=epsilon)


@pytest.mark.parametrize(("axis", "shown"), [(2, "2"), (-3, "-3"), ((0, 5), "(0, 5)"),
                                             ((1, -1), "(1, -1)"), (1.0, "1.0"), ("c", "'c'")])
@pytest.mark.parametrize("train", [True, False])
def test_axis_out_of_range(axis, shown, train):
    params, state = dropnorm.batch_norm_init(3)
    _raises_at_trace(lambda x: dropnorm.batch_norm(params, state, x, train, axis=axis), X,
                     ValueError, "`axis`", shown)


@pytest.mark.parametrize(("shape", "axis"), [((1, 3), -1), ((1, 1, 3), -1), ((1, 3, 4), (1, 2))])
def test_training_with_one_value_per_feature_says_the_batch_is_too_small(shape, axis):
    fshape = tuple(shape[a] for a in ((axis,) if isinstance(axis, int) else axis))
    params, state = dropnorm.batch_norm_init(fshape if len(fshape) > 1 else fshape[0])
    x = jnp.ones(shape)
    _raises_at_trace(lambda x: dropnorm.batch_norm(params, state, x, True, axis=axis), x,
                     ValueError, "batch is too small", str(shape))
    # Evaluation needs no batch statistics: the same input is fine there.
    y, _ = dropnorm.batch_norm(params, state, x, False, axis=axis)
    assert y.shape == shape


def test_ghost_batches_of_one_value_are_too_small():
    params, state = dropnorm.batch_norm_init(3)
    _raises_at_trace(
        lambda x: dropnorm.batch_norm(params, state, x, True, virtual_batch_size=1), X,
        ValueError, "`virtual_batch_size`=1")
    _raises_at_trace(
        lambda x: dropnorm.batch_norm(params, state, x, True, virtual_batch_size=3), X,
        ValueError, "`virtual_batch_size`=3", "batch of 4")


@pytest.mark.parametrize(("x_shape", "mask_shape"), [((4, 5), (3,)), ((4, 3), (4, 2)),
                                                    ((4, 3), (5, 3)), ((4, 3), (4, 3, 1)),
                                                    ((4, 3), (2, 1))])
def test_mask_that_does_not_broadcast(x_shape, mask_shape):
    params, state = dropnorm.batch_norm_init(x_shape[-1])
    mask = jnp.ones(mask_shape, bool)
    _raises_at_trace(lambda x: dropnorm.batch_norm(params, state, x, True, mask=mask),
                     jnp.ones(x_shape), ValueError, "`mask`", str(mask_shape), str(x_shape))


def test_bad_batch_norm_init():
    for n, shown in ((0, "0"), (-2, "-2"), (2.0, "2.0"), ("3", "'3'"), (True, "True")):
        with pytest.raises(ValueError, match="`num_features`") as info:
            dropnorm.batch_norm_init(n)
        assert shown in str(info.value)


def test_broadcast_dims_may_be_an_int_or_a_list():
    x = jnp.ones((4, 6))
    want = np.asarray(dropnorm.dropout(KEY, x, 0.5, True, broadcast_dims=(1,)))
    for bdims in (1, [1], -1, (-1,)):
        np.testing.assert_array_equal(
            np.asarray(dropnorm.dropout(KEY, x, 0.5, True, broadcast_dims=bdims)), want)


# ---------------------------------------------------------------- traced hyper-parameters
# A traced value cannot raise at trace time: its shape and dtype are checked when traced, and
# an invalid value poisons what it touches with NaN (never silently clipped), like a traced rate.


def _bn_xs():
    return jnp.arange(12.0).reshape(4, 3) ** 1.5


@pytest.mark.parametrize("name", ["momentum", "epsilon"])
def test_traced_momentum_and_epsilon_must_be_real_scalars(name):
    params, state = dropnorm.batch_norm_init(3)
    f = jax.jit(lambda x, v: dropnorm.batch_norm(params, state, x, True, **{name: v}))
    with pytest.raises(ValueError, match=f"`{name}`.*shape \\(2,\\)"):
        f(_bn_xs(), jnp.array([0.5, 0.9]))
    with pytest.raises(ValueError, match=f"`{name}`.*dtype bool"):
        f(_bn_xs(), jnp.asarray(True))


def test_traced_invalid_momentum_poisons_the_running_statistics():
    params, state = dropnorm.batch_norm_init(3)
    f = jax.jit(lambda m: dropnorm.batch_norm(params, state, _bn_xs(), True, momentum=m))
    for m in (-0.1, 1.5, float("nan")):
        y, new = f(m)
        assert np.all(np.isnan(np.asarray(new.mean))) and np.all(np.isnan(np.asarray(new.var)))
        assert not np.any(np.isnan(np.asarray(y))), m  # the batch statistics do not use it
    for m in (0.0, 0.9, 1.0):  # the valid range, edges included, equals the static path
        y, new = f(m)
        y_s, new_s = dropnorm.batch_norm(params, state, _bn_xs(), True, momentum=m)
        np.testing.assert_allclose(new.mean, new_s.mean, rtol=1e-6)
        np.testing.assert_allclose(new.var, new_s.var, rtol=1e-6)


@pytest.mark.parametrize("train", [True, False])
def test_traced_negative_epsilon_poisons_the_output(train):
    params, state = dropnorm.batch_norm_init(3)
    f = jax.jit(lambda e: dropnorm.batch_norm(params, state, _bn_xs(), train, epsilon=e)[0])
    for e in (-1e-5, float("nan")):
        assert np.all(np.isnan(np.asarray(f(e)))), e
    np.testing.assert_allclose(f(1e-3), dropnorm.batch_norm(params, state, _bn_xs(), train,
                                                             epsilon=1e-3)[0], rtol=1e-6)


def test_batch_renorm_bounds_checked_concrete_and_poisoned_traced():
    params, state = dropnorm.batch_norm_init(3)
    for kw, shown in (({"r_max": 0.5}, "0.5"), ({"d_max": -1.0}, "-1.0"),
                      ({"r_max": "3"}, "'3'"), ({"d_max": float("nan")}, "nan")):
        name = next(iter(kw))
        _raises_at_trace(lambda x, kw=kw: dropnorm.batch_renorm(params, state, x, True, **kw),
                         _bn_xs(), ValueError, f"`{name}`", shown)
    f = jax.jit(lambda r, d: dropnorm.batch_renorm(params, state, _bn_xs(), True, r_max=r,
                                                   d_max=d)[0])
    for r, d in ((0.5, 1.0), (2.0, -1.0), (float("nan"), 1.0)):
        assert np.all(np.isnan(np.asarray(f(r, d)))), (r, d)
    np.testing.assert_allclose(f(2.0, 1.0), dropnorm.batch_renorm(
        params, state, _bn_xs(), True, r_max=2.0, d_max=1.0)[0], rtol=1e-6)


# ---------------------------------------------------------------- keys of every generator


@pytest.mark.parametrize("impl", ["threefry2x32", "rbg", "unsafe_rbg"])
def test_typed_keys_of_every_implementation_are_accepted(impl):
    key = jax.random.key(3, impl=impl)
    y = dropnorm.dropout(key, jnp.ones((64, 64)), 0.5, True)
    kept = float(jnp.mean(y != 0))
    # 4096 Bernoulli(1/2) draws: the kept fraction is within 0.5 +- 5 sigma (sigma = 0.0078).
    assert abs(kept - 0.5) < 0.04
    np.testing.assert_array_equal(y, dropnorm.dropout(key, jnp.ones((64, 64)), 0.5, True))


@pytest.mark.parametrize("impl", ["rbg", "unsafe_rbg"])
def test_legacy_raw_keys_follow_the_default_implementation(impl):
    # Under jax_default_prng_impl='rbg' a legacy PRNGKey(seed) is uint32[4] (lm1b's train_step
    # uses them); it was rejected as "not a key". A uint32[2] key is then not of the default
    # shape and gets an error that says so.
    previous = jax.config.jax_default_prng_impl
    jax.config.update("jax_default_prng_impl", impl)
    try:
        key = jax.random.PRNGKey(0)
        assert key.shape == (4,)
        y = jax.jit(lambda k, x: dropnorm.dropout(k, x, 0.5, True))(key, jnp.ones((8, 8)))
        assert set(np.unique(np.asarray(y)).tolist()) <= {0.0, 2.0}
        with pytest.raises(TypeError, match=r"default PRNG implementation .* shape \(4,\)"):
            dropnorm.dropout(jnp.zeros((2,), jnp.uint32), jnp.ones(3), 0.5, True)
    finally:
        jax.config.update("jax_default_prng_impl", previous)
    with pytest.raises(TypeError, match=r"shape \(2,\)"):  # and back: (4,) is now wrong
        dropnorm.dropout(jnp.zeros((4,), jnp.uint32), jnp.ones(3), 0.5, True)


# ---------------------------------------------------------------- swapped arguments


@pytest.mark.parametrize("fn", DROPOUTS, ids=lambda f: f.__name__)
@pytest.mark.parametrize("key", [jax.random.key(0), jax.random.PRNGKey(0)],
                         ids=["typed", "raw"])
def test_swapped_key_and_x_are_named(fn, key):
    # It said "x must have a floating dtype; got key<fry>. Cast it first": a wrong fix.
    _raises_at_trace(lambda x: fn(x, key, 0.5, True), X, TypeError, "swapped",
                     "key comes first")


def test_swapped_params_and_state_are_named():
    # It raised AttributeError: 'BatchNormParams' object has no attribute 'mean'.
    params, state = dropnorm.batch_norm_init(3)
    for train in (True, False):
        _raises_at_trace(lambda x, t=train: dropnorm.batch_norm(state, params, x, t), X,
                         TypeError, "swapped", "`params` is a BatchNormState",
                         "batch_norm(params, state, x, train)")
        _raises_at_trace(lambda x, t=train: dropnorm.batch_renorm(state, params, x, t), X,
                         TypeError, "swapped", "batch_renorm(params, state, x, train)")
    _raises_at_trace(lambda x: dropnorm.batch_norm(params, {"mean": 0}, x, True), X,
                     TypeError, "`state` must be a BatchNormState", "dict")


# ---------------------------------------------------------------- errors in the caller's terms


def test_errors_speak_the_callers_terms():
    from dropnorm._batch_norm import batch_norm_as
    from dropnorm._checks import Caller
    from dropnorm._dropout import random_map_as

    caller = Caller("dropnorm.linen.BatchNorm", "use_running_average=True", state_hint="rebuild")
    params, state = dropnorm.batch_norm_init(3)
    with pytest.raises(ValueError) as info:
        batch_norm_as(caller, params, state, jnp.ones((1, 3)), True)
    msg = str(info.value)
    assert msg.startswith("dropnorm.linen.BatchNorm:") and "use_running_average=True" in msg
    assert "train=False" not in msg
    with pytest.raises(ValueError, match="Check `axis`, or rebuild"):
        batch_norm_as(caller, params, state, jnp.ones((4, 5)), True)
    drop = Caller("dropnorm.linen.Dropout", "deterministic=True", x_name="inputs")
    with pytest.raises(TypeError, match=r"^dropnorm.linen.Dropout: `inputs` must have a floating"):
        random_map_as(drop, "dropout", KEY, jnp.ones(3, jnp.int32), 0.5, True)
    with pytest.raises(TypeError, match="or pass deterministic=True"):
        random_map_as(drop, "dropout", None, jnp.ones(3), 0.5, True)


def test_flax_small_batch_normalises_one_value_per_feature_to_the_bias():
    # Flax's modules accept one value per feature in training (nnx.scan over a batch of 1):
    # mean = the value, variance 0, output = bias; the running statistics move towards it.
    from dropnorm._batch_norm import batch_norm_as
    from dropnorm._checks import Caller

    params = dropnorm.BatchNormParams(jnp.array([2.0, 3.0]), jnp.array([0.5, -1.0]))
    _, state = dropnorm.batch_norm_init(2)
    x = jnp.array([[4.0, -7.0]])
    y, new = batch_norm_as(Caller("M", flax_small_batch=True), params, state, x, True,
                           momentum=0.9)
    np.testing.assert_array_equal(y, [[0.5, -1.0]])
    np.testing.assert_allclose(new.mean, [0.4, -0.7], rtol=1e-6)
    np.testing.assert_allclose(new.var, [0.9, 0.9], rtol=1e-6)
    with pytest.raises(ValueError, match="too small"):  # the pure API keeps its error
        dropnorm.batch_norm(params, state, x, True)
