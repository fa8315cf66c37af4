"""dropnorm.equinox: a float64 oracle, parity with Equinox 0.13's BatchNorm(mode="batch") and
Dropout where Equinox is right, Equinox usage patterns run against both Equinox's layers and
ours, the documented differences where Equinox is wrong, errors in the layers' own terms,
and a quick run of ``examples/equinox_cnn.py``.

Equinox's conventions, read from equinox/nn/_batch_norm.py and _dropout.py (0.13.8): the
layer sees one example ``(channels, *spatial)`` inside ``jax.vmap(..., axis_name=...)``;
``mode="batch"`` normalises by the batch mean and the *biased* variance (``mean((y -
mean)**2)``, pmean over the axis) and keeps ``hidden = momentum * hidden + (1 - momentum) *
batch`` from (0, 1); its inference divides the hidden statistics by ``1 - momentum**count``.
Its docstring's "unbiased variance" is that zero-debiasing, not Bessel's n - 1.
"""

from __future__ import annotations

import importlib
import io
import os
import sys
import warnings

import equinox as eqx
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

import dropnorm
import dropnorm.equinox as dqx

EXAMPLES = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "examples")
EPS = 1e-5
MOMENTUM = 0.9


def _per_example(layer, **kw):
    """Equinox's convention: ``layer(x, state)`` vmapped over the examples of a batch."""
    return jax.vmap(layer, axis_name="batch", in_axes=(0, None), out_axes=(0, None), **kw)


def _eqx_bn(size, mode="batch", **kw):
    return eqx.nn.make_with_state(eqx.nn.BatchNorm)(size, "batch", momentum=MOMENTUM,
                                                     mode=mode, **kw)


def _our_bn(size, axis_name="batch", **kw):
    return eqx.nn.make_with_state(dqx.BatchNorm)(size, axis_name, momentum=MOMENTUM, **kw)


@eqx.filter_jit
def _steps(bn, state, xs, inference=None):
    """Per-example training calls on each batch of ``xs``: (outputs, states after each)."""
    ys, stats = [], []
    for x in xs:
        y, state = _per_example(lambda x, s: bn(x, s, inference=inference))(x, state)
        ys.append(y)
        if bn.batch_state_index is not None:  # not Equinox's ema mode
            stats.append((*state.get(bn.batch_state_index), state.get(bn.batch_counter)))
    stats = jax.tree.map(lambda *a: jnp.stack(a), *stats) if stats else None
    return jnp.stack(ys), stats, state


def _batches(mean=3.0, std=2.0, shape=(3, 16, 3, 8), seed=0, scales=(1.0, 0.5, 2.0)):
    """Three batches of 16 examples of 3 channels (std times ``scales``) of length 8."""
    rng = np.random.default_rng(seed)
    scale = np.array(scales)[None, None, :, None]
    return (mean + std * scale * rng.standard_normal(shape)).astype(np.float32)


def _oracle(xs, momentum=MOMENTUM, eps=EPS):
    """float64: per batch, outputs by the batch's mean and biased variance (over examples and
    length), and the running (mean, var) from (0, 1) after each batch."""
    ys, means, vars_ = [], [], []
    mean, var = np.zeros(xs.shape[2]), np.ones(xs.shape[2])
    for x in xs.astype(np.float64):
        m, v = x.mean((0, 2)), x.var((0, 2))  # np.var: divide by n (biased)
        ys.append((x - m[:, None]) / np.sqrt(v[:, None] + eps))
        mean, var = momentum * mean + (1 - momentum) * m, momentum * var + (1 - momentum) * v
        means.append(mean)
        vars_.append(var)
    return np.stack(ys), np.stack(means), np.stack(vars_)


# --- 1. A float64 oracle ----------------------------------------------------------------------

@pytest.fixture(scope="module")
def three_steps():
    """Three per-example training steps of our layer and of Equinox's mode="batch" one."""
    xs = _batches()
    return xs, {"ours": _steps(*_our_bn(3), xs), "equinox": _steps(*_eqx_bn(3), xs)}


def test_training_matches_the_float64_oracle(three_steps):
    xs, runs = three_steps
    y, (mean, var, count), _ = runs["ours"]
    y_o, mean_o, var_o = _oracle(xs)
    # float32 statistics of values of size ~10: the outputs to 1e-5, the running statistics
    # to a few float32 ulps (relative 1e-6).
    np.testing.assert_allclose(y, y_o, atol=1e-5)
    np.testing.assert_allclose(mean, mean_o, rtol=1e-6, atol=1e-6)
    np.testing.assert_allclose(var, var_o, rtol=1e-6)
    assert count.tolist() == [1, 2, 3]


def test_exact_at_a_large_mean_where_equinoxs_statistics_are_not():
    xs = _batches(mean=1e4, std=1.0, scales=(1.0, 1.0, 1.0))  # three_steps' shapes: no compile
    y_o = _oracle(xs)[0][0]
    ours = np.asarray(_steps(*_our_bn(3), xs)[0][0])
    theirs = np.asarray(_steps(*_eqx_bn(3), xs)[0][0])
    # Ours: exact statistics, so the only error is the float32 batch mean, rounded to half an
    # ulp at 1e4 (4.9e-4), divided by the std (1). Equinox's jnp.mean of the values
    # loses more (9.8e-4 on these data; 1.2e-3 measured on others).
    assert np.abs(ours - y_o).max() < 4.9e-4
    assert np.abs(theirs - y_o).max() > 2 * np.abs(ours - y_o).max()


# --- 2. Both batch conventions give the numbers of dropnorm.batch_norm on the whole batch -------

@pytest.fixture(scope="module")
def whole_batch():
    x = _batches(shape=(1, 8, 3, 5))[0]
    params, state = dropnorm.batch_norm_init(3)
    return x, dropnorm.batch_norm(params, state, x, True, axis=1, momentum=MOMENTUM)


def test_per_example_and_batched_calls_are_batch_norm_on_the_whole_batch(whole_batch):
    x, (y_ref, ref) = whole_batch
    bn, state = _our_bn(3)
    y, new = _per_example(bn)(x, state)
    # One vmapped example per call: the statistics are combined across the axis instead of
    # summed in one reduction, so they may differ by float32 rounding (1e-6 at values ~10).
    np.testing.assert_allclose(y, y_ref, atol=1e-6)
    np.testing.assert_allclose(new.get(bn.batch_state_index), (ref.mean, ref.var), rtol=1e-6)
    batched, state = _our_bn(3, axis_name=None)
    y_b, new_b = batched(x, state)  # a leading batch axis, no vmap: the same call exactly
    np.testing.assert_array_equal(y_b, y_ref)
    np.testing.assert_array_equal(new_b.get(batched.batch_state_index)[1], ref.var)
    assert int(new_b.get(batched.batch_counter)) == int(ref.count) == 1
    plain, state = _our_bn(3, axis_name=None, channelwise_affine=False)  # no weight, no bias
    assert plain.weight is None and plain.bias is None
    np.testing.assert_array_equal(plain(x, state)[0], y_ref)  # = weight 1, bias 0


@jax.jit
def _both_conventions(x):
    per, state = _our_bn(x.shape[1])
    whole, whole_state = _our_bn(x.shape[1], axis_name=None)
    return _per_example(per)(x, state), whole(x, whole_state)


@settings(max_examples=3, deadline=None)
@given(batch=st.integers(2, 5), channels=st.integers(1, 3),
       spatial=st.lists(st.integers(1, 3), max_size=2), seed=st.integers(0, 2**16))
def test_property_per_example_equals_batched(batch, channels, spatial, seed):
    x = np.random.default_rng(seed).normal(2.0, 3.0, (batch, channels, *spatial)).astype(
        np.float32)
    (y, s), (y_b, s_b) = _both_conventions(x)
    per, whole = _our_bn(channels)[0], _our_bn(channels, axis_name=None)[0]
    # float32 rounding of two summation orders of values ~10: 1e-5 absolute.
    np.testing.assert_allclose(y, y_b, atol=1e-5)
    np.testing.assert_allclose(s.get(per.batch_state_index), s_b.get(whole.batch_state_index),
                               rtol=1e-5, atol=1e-6)


@jax.jit
def _masked_and_grouped(x, mask):
    """Per-example calls with a padding mask, and with two groups of four examples."""
    bn, state = _our_bn(3)
    masked = jax.vmap(lambda x, m: bn(x, state, mask=m), axis_name="batch",
                      out_axes=(0, None))(x, mask)
    grouped_bn, state = _our_bn(3, axis_index_groups=[[0, 1, 2, 3], [4, 5, 6, 7]])
    # Each group has its own statistics, so each example maps out its group's state.
    grouped = jax.vmap(grouped_bn, axis_name="batch", in_axes=(0, None), out_axes=(0, 0))(
        x, state)
    params, init = dropnorm.batch_norm_init(3)
    refs = [dropnorm.batch_norm(params, init, x, True, axis=1, momentum=MOMENTUM, mask=mask)]
    refs += [dropnorm.batch_norm(params, init, h, True, axis=1, momentum=MOMENTUM)
             for h in (x[:4], x[4:])]
    return (masked[0], masked[1].get(bn.batch_state_index)), (
        grouped[0], grouped[1].get(grouped_bn.batch_state_index)), refs


def test_padding_mask_and_axis_index_groups_pass_through():
    x = _batches(shape=(1, 8, 3, 5))[0]
    lengths = np.array([5, 5, 4, 3, 5, 2, 5, 1])
    mask = np.arange(5)[None, None, :] < lengths[:, None, None]  # (8, 1, 5): padded ends
    (y, (_, var)), (y_g, (mean_g, _)), refs = _masked_and_grouped(x, mask)
    # Masked counts differ per example (and groups are combined apart), so the statistics
    # combine with weights: float32 rounding up to 5e-6 at values ~10.
    np.testing.assert_allclose(y, refs[0][0], atol=1e-5)
    np.testing.assert_allclose(var, refs[0][1].var, rtol=1e-6)
    for half, (y_ref, ref) in zip((slice(0, 4), slice(4, 8)), refs[1:], strict=True):
        np.testing.assert_allclose(y_g[half], y_ref, atol=1e-5)
        np.testing.assert_allclose(mean_g[half], np.broadcast_to(ref.mean, (4, 3)), rtol=1e-6,
                                   atol=1e-7)


# --- 3. Parity with eqx.nn.BatchNorm(mode="batch") where Equinox is right ---------------------

def test_training_output_and_running_statistics_match_equinox_batch_mode(three_steps):
    _, runs = three_steps
    (y, stats, _), (y_e, stats_e, _) = runs["ours"], runs["equinox"]
    # Equinox's two-pass float32 statistics and ours round differently: 1e-5 on outputs ~1.
    np.testing.assert_allclose(y, y_e, atol=1e-5)
    # Its hidden statistics are our running statistics: the same average of the batch mean
    # and the biased variance from (0, 1), to float32 rounding; the same step counter.
    for ours, theirs in zip(stats, stats_e, strict=True):
        np.testing.assert_allclose(ours, theirs, rtol=1e-6, atol=1e-6)


def test_inference_uses_the_running_statistics_as_they_are_not_equinoxs_debiased_ones(
        three_steps):
    xs, runs = three_steps
    _, (mean, var, _), state = runs["ours"]
    bn = eqx.nn.inference_mode(_our_bn(3)[0])
    x = xs[0][0]
    y, same = bn(x, state)  # one example, no vmap
    # The running statistics as they are (Flax's and PyTorch's rule; the oracle's values).
    np.testing.assert_allclose(y, (x - mean[-1][:, None]) / np.sqrt(var[-1][:, None] + EPS),
                               atol=1e-5)
    assert same is state
    # Equinox divides its statistics by 1 - momentum**count: right for a mean started at 0,
    # but a variance started at 1 then holds momentum**count / (1 - momentum**count) too much
    # (2.7 after three steps at momentum 0.9; 99 after one at its default 0.99).
    ebn, estate = _eqx_bn(3)[0], runs["equinox"][2]
    y_e, _ = eqx.nn.inference_mode(ebn)(x, estate)
    debias = 1 - MOMENTUM**3
    e_mean, e_var = (np.asarray(a) / debias for a in estate.get(ebn.batch_state_index))
    np.testing.assert_allclose(y_e, (x - e_mean[:, None]) / np.sqrt(e_var[:, None] + EPS),
                               atol=1e-5)
    # A debiased average of the three batch variances (float64, from the data) is lower by
    # that much.
    weights = (1 - MOMENTUM) * MOMENTUM ** np.arange(2, -1, -1) / debias
    debiased = np.einsum("b,bc->c", weights, xs.astype(np.float64).var(axis=(1, 3)))
    np.testing.assert_allclose(e_var - debiased, MOMENTUM**3 / debias, rtol=1e-5)


def test_bfloat16_input_gives_equinoxs_output_dtype():
    x = jnp.asarray(_batches(shape=(1, 4, 3, 2))[0], jnp.bfloat16)
    for bn, state in (_our_bn(3), _eqx_bn(3)):
        y, state = _per_example(bn)(x, state)
        assert y.dtype == jnp.float32  # promoted by the float32 weight, in training...
        assert eqx.nn.inference_mode(bn)(x[0], state)[0].dtype == jnp.float32  # ...and in inference


# --- 4. Where Equinox's BatchNorm is wrong: ema mode, empty initial statistics --------------

def test_equinox_ema_mode_normalises_training_batches_by_running_averages():
    xs = _batches()
    xs[1:] += 5.0  # the second batch moves: ema mode normalises it by a blend with the first
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # eqx ema mode: no warning when given, but be safe
        ebn, estate = _eqx_bn(3, mode="ema")
    y_e = np.asarray(_steps(ebn, estate, xs)[0][1])
    y = np.asarray(_steps(*_our_bn(3), xs)[0][1])
    # Ours: each channel of a training batch has mean 0 (to float32 rounding).
    assert np.abs(y.mean((0, 2))).max() < 1e-5
    assert np.abs(y_e.mean((0, 2))).max() > 1.0
    with pytest.raises(ValueError, match=r"`mode`='ema'.*equinox#659"):
        dqx.BatchNorm(3, "batch", mode="ema")


def test_an_untrained_model_in_inference_is_nearly_the_identity():
    x = _batches(shape=(1, 1, 3, 5))[0][0]
    bn, state = _our_bn(3, inference=True)
    y, _ = bn(x, state)
    np.testing.assert_allclose(y, x / np.sqrt(1 + EPS), rtol=1e-6)  # mean 0, variance 1
    # Equinox's ema mode starts from empty buffers: 1 / sqrt(eps) = 316 times x (equinox#955).
    ebn, estate = _eqx_bn(3, mode="ema", inference=True)
    y_e, _ = ebn(x, estate)
    np.testing.assert_allclose(y_e / x, 1 / np.sqrt(EPS), rtol=1e-4)


# --- 5. Dropout: parity with eqx.nn.Dropout -------------------------------------------------

@pytest.mark.parametrize("cls", [eqx.nn.Dropout, dqx.Dropout], ids=["equinox", "dropnorm"])
def test_dropout_follows_equinoxs_rules(cls):
    x = jnp.arange(1.0, 100_001.0)
    assert cls(0.5, inference=True)(x) is x  # no key needed in inference...
    assert cls(0.0)(x) is x  # ...or at p = 0
    assert cls(0.5)(x, key=None, inference=True) is x
    y = np.asarray(cls(0.5)(x, key=jax.random.key(0)))
    kept = y != 0
    np.testing.assert_allclose(y[kept], 2 * np.asarray(x)[kept], rtol=1e-6)  # scaled by 1 / q
    # The fraction dropped: binomial, 4 standard deviations of 1e5 draws at p = 0.5 is 0.0063.
    assert abs(1 - kept.mean() - 0.5) < 0.0063
    assert eqx.nn.inference_mode(cls(0.5)).inference is True


def test_dropout_takes_a_traced_inference_flag_where_equinoxs_cannot():
    x, key = jnp.ones(64), jax.random.key(0)
    fn = jax.jit(lambda inference: dqx.Dropout(0.5)(x, key=key, inference=inference))
    assert bool(jnp.all(fn(jnp.bool_(True)) == x))
    assert bool(jnp.any(fn(jnp.bool_(False)) == 0))
    with pytest.raises(jax.errors.TracerBoolConversionError):
        jax.jit(lambda inference: eqx.nn.Dropout(0.5)(x, key=key, inference=inference))(
            jnp.bool_(True))


@jax.jit
def _family(x, keys, normal):
    return (jax.vmap(lambda x, k: dqx.DropPath(0.5)(x, key=k))(x, keys),
            jax.vmap(lambda x, k: dqx.DropBlock(0.3, 3)(x, key=k))(x, keys),
            dqx.AlphaDropout(0.2)(normal, key=keys[1]))


def test_the_family_are_equinox_dropouts():
    for layer in (dqx.AlphaDropout(0.2), dqx.DropPath(0.5), dqx.DropBlock(0.2, 3)):
        assert isinstance(layer, eqx.nn.Dropout)
        assert eqx.nn.inference_mode(layer).inference is True
    keys = jax.random.split(jax.random.key(0), 64)
    x = jnp.ones((64, 4, 6))  # 64 examples of 4 channels of length 6, one key each
    path, block, alpha = (np.asarray(a) for a in _family(
        x, keys, jax.random.normal(jax.random.key(1), (100_000,))))
    per_example = path.reshape(64, -1)
    assert np.all(per_example.min(1) == per_example.max(1))  # whole examples dropped
    assert 10 < int(np.sum(per_example[:, 0] == 0)) < 54  # binomial(64, 0.5): 7 sd around 32
    # Two values: dropped, and kept scaled by 1 / (1 - p) (to the quantised keep probability).
    assert block.min() == 0 and np.allclose(block[block != 0], 1 / 0.7, rtol=1e-3)
    # SELU's fixed point: mean 0 and std 1 to the sampling error of 1e5 draws (about 0.01).
    assert abs(alpha.mean()) < 0.02 and abs(alpha.std() - 1) < 0.02


def test_rate_one_gives_zero_gradients_where_equinoxs_are_nan():
    x, key = jnp.ones(4), jax.random.key(0)

    def grad(layer):
        return np.asarray(jax.grad(lambda x: layer(x, key=key).sum())(x))

    assert np.all(grad(dqx.Dropout(1.0)) == 0)
    assert np.all(np.isnan(grad(eqx.nn.Dropout(1.0))))  # x / 0 behind the mask


# --- 6. Equinox usage patterns, run against Equinox's layers and ours ----------------------

LIBS = {
    "equinox": lambda: (eqx.nn.BatchNorm(8, "batch", momentum=MOMENTUM, mode="batch"),
                        eqx.nn.Dropout(0.2)),
    "dropnorm": lambda: (dqx.BatchNorm(8, "batch", momentum=MOMENTUM), dqx.Dropout(0.2)),
}


class Net(eqx.Module):
    lin1: eqx.nn.Linear
    bn: eqx.nn.BatchNorm
    drop: eqx.nn.Dropout
    lin2: eqx.nn.Linear

    def __init__(self, lib, key):
        k1, k2 = jax.random.split(key)
        self.lin1 = eqx.nn.Linear(4, 8, key=k1)
        self.bn, self.drop = LIBS[lib]()
        self.lin2 = eqx.nn.Linear(8, 2, key=k2)

    def __call__(self, x, state, *, key=None):
        h, state = self.bn(self.lin1(x), state)
        return self.lin2(self.drop(jax.nn.relu(h), key=key)), state


def _loss(model, state, x, y, key):
    keys = jax.random.split(key, x.shape[0])  # one dropout key per example
    out, state = jax.vmap(lambda x, k: model(x, state, key=k), axis_name="batch",
                          out_axes=(0, None))(x, keys)
    return optax.softmax_cross_entropy_with_integer_labels(out, y).mean(), state


TX = optax.adam(5e-2)


def _make(lib, key):
    model, state = eqx.nn.make_with_state(Net)(lib, key)
    return model, state, TX.init(eqx.filter(model, eqx.is_inexact_array))


def _make_ensemble(lib, keys):
    # Eagerly: the two libraries' Linear layers share the initialisers' compiled kernels.
    return eqx.filter_vmap(lambda k: _make(lib, k))(keys)


@eqx.filter_jit
@eqx.filter_vmap(in_axes=(eqx.if_array(0), 0, 0, None, None, 0))
def _train_step(model, state, opt_state, x, y, key):
    """The usual Equinox step (filter_value_and_grad, optax), over an ensemble's members."""
    (loss, state), grads = eqx.filter_value_and_grad(_loss, has_aux=True)(model, state, x, y,
                                                                          key)
    updates, opt_state = TX.update(grads, opt_state, eqx.filter(model, eqx.is_inexact_array))
    return eqx.apply_updates(model, updates), state, opt_state, loss


@eqx.filter_jit
@eqx.filter_vmap(in_axes=(eqx.if_array(0), 0, None))
def _evaluate(model, state, x):
    """Inference on a batch: no key, no vmap axis name, the state returned as given."""
    return jax.vmap(lambda x: model(x, state), out_axes=(0, None))(x)


def _member(tree, i):
    """Member ``i`` of an ensemble (a model, a state) made under filter_vmap."""
    return jax.tree.map(lambda a: a[i] if eqx.is_array(a) else a, tree)


def _data():
    x = jax.random.normal(jax.random.key(1), (32, 4))
    return x, (x[:, 0] + x[:, 1] > 0).astype(jnp.int32)


@pytest.fixture(scope="module")
def trained():
    """Per library: an ensemble of two Nets made with make_with_state under filter_vmap
    (filter_jit), trained 8 steps together; its initial models; its losses."""
    out = {}
    x, y = _data()
    for lib in LIBS:
        model, state, opt_state = _make_ensemble(lib, jax.random.split(jax.random.key(0), 2))
        initial, losses = model, []
        for step in range(8):
            model, state, opt_state, loss = _train_step(
                model, state, opt_state, x, y, jax.random.split(jax.random.key(10 + step), 2))
            losses.append(np.asarray(loss))
        out[lib] = model, state, initial, np.stack(losses)
    return out


@pytest.mark.parametrize("lib", list(LIBS))
def test_make_with_state_and_a_filter_jit_training_step_with_optax(lib, trained):
    model, state, _, losses = trained[lib]
    assert isinstance(model.bn, eqx.nn.BatchNorm) and isinstance(model.drop, eqx.nn.Dropout)
    assert np.all(losses[-1] < losses[0] - 0.1), losses  # a separable problem: the loss falls
    assert state.get(model.bn.batch_counter).tolist() == [8, 8]
    # inference_mode switches both layers; inference needs no key and no vmap axis name.
    infer = eqx.nn.inference_mode(model)
    assert infer.bn.inference is True and infer.drop.inference is True
    x, y = _data()
    out, same = _evaluate(infer, state, x)
    acc = np.mean(np.asarray(out.argmax(-1)) == np.asarray(y), axis=1)
    assert np.all(acc > 0.7), acc  # chance is 0.5
    assert bool(eqx.tree_equal(same, state))


@pytest.mark.parametrize("lib", list(LIBS))
def test_filter_vmap_over_an_ensemble(lib, trained):
    model, state, initial, _ = trained[lib]
    # Every member has its own initial parameters, and keeps its own parameters and running
    # statistics.
    lin1, lin1_start = model.lin1.weight, initial.lin1.weight
    assert lin1.shape == (2, 8, 4) and not np.allclose(lin1_start[0], lin1_start[1])
    assert not np.allclose(lin1[0] - lin1_start[0], lin1[1] - lin1_start[1])
    mean = state.get(model.bn.batch_state_index)[0]
    assert mean.shape == (2, 8) and not np.allclose(mean[0], mean[1])


@pytest.mark.parametrize("lib", list(LIBS))
def test_tree_serialise_leaves_round_trip(lib, trained):
    model, state, initial, _ = trained[lib]
    like = _member((initial, state), 1)  # another member's values, the same structure
    model, state = _member((model, state), 0)
    f = io.BytesIO()
    eqx.tree_serialise_leaves(f, (model, state))
    f.seek(0)
    loaded = eqx.tree_deserialise_leaves(f, like)
    assert not bool(eqx.tree_equal(like, (model, state)))
    assert bool(eqx.tree_equal(loaded, (model, state)))


def test_an_equinox_batch_mode_checkpoint_loads_into_ours(trained):
    model, state = _member(trained["equinox"][:2], 0)
    f = io.BytesIO()
    eqx.tree_serialise_leaves(f, (model, state))
    f.seek(0)
    like = _member((trained["dropnorm"][2], trained["dropnorm"][1]), 1)
    ours, our_state = eqx.tree_deserialise_leaves(f, like)
    assert isinstance(ours.bn, dqx.BatchNorm)
    np.testing.assert_array_equal(ours.lin1.weight, model.lin1.weight)
    np.testing.assert_array_equal(ours.bn.weight, model.bn.weight)
    for a, b in zip(our_state.get(ours.bn.batch_state_index),
                    state.get(model.bn.batch_state_index), strict=True):
        np.testing.assert_array_equal(a, b)


def test_device_put_of_a_whole_model(trained):
    # Equinox's axis_name is a pytree leaf, and a string is no array (equinox#1074).
    with pytest.raises(TypeError, match="not a valid JAX type"):
        jax.device_put(_member(trained["equinox"][0], 0))
    model, state = _member(trained["dropnorm"][:2], 0)
    put = jax.device_put(model, jax.devices()[1])
    assert put.bn.axis_name == "batch"
    assert put.bn.weight.devices() == {jax.devices()[1]}
    x, y = _data()
    # The put model's flags and rate are now arrays (traced under jit): it still trains.
    loss, new = eqx.filter_jit(_loss)(jax.device_put(model, jax.devices()[0]), state, x, y,
                                      jax.random.key(0))
    assert np.isfinite(float(loss)) and int(new.get(model.bn.batch_counter)) == 9


def test_in_an_equinox_sequential():
    # Sequential calls a StatefulLayer with the state (and a layer with a key).
    seq, state = eqx.nn.make_with_state(eqx.nn.Sequential)([
        dqx.BatchNorm(3, "batch"), eqx.nn.Lambda(jax.nn.relu), dqx.Dropout(0.0)])
    x = _batches(shape=(1, 8, 3, 5))[0]
    y, state = _per_example(seq)(x, state)
    assert y.shape == x.shape and float(y.min()) == 0.0
    assert isinstance(seq.layers[0], eqx.nn.StatefulLayer)
    assert int(state.get(seq.layers[0].batch_counter)) == 1


# --- 7. Errors in the caller's terms ---------------------------------------------------------

def _raises(fn, exc, *words):
    with pytest.raises(exc) as info:
        fn()
    for word in words:
        assert word in str(info.value), str(info.value)


def test_errors_name_the_layers_arguments():
    x = jnp.ones((3, 5))
    bn, state = _our_bn(3)
    _raises(lambda: dqx.Dropout(0.5)(x), TypeError, "`key`", "inference=True")
    _raises(lambda: bn(x, state), NameError, "`axis_name`='batch'", "jax.vmap(",
            "axis_name=None")
    _raises(lambda: _per_example(bn)(jnp.ones((8, 4, 5)), state), ValueError, "input_size=3")
    _raises(lambda: bn(jnp.ones((8, 3, 5)), state), ValueError, "leading batch axis",
            "axis_name=None")
    _raises(lambda: _our_bn(3, axis_name=None)[0](x, state), ValueError, "(batch, 3, ...)")
    _raises(lambda: dqx.Dropout(1.5), ValueError, "`p`")
    _raises(lambda: dqx.Dropout(0.5)(x, key=jax.random.key(0), inference="yes"), TypeError,
            "`inference`")
    _raises(lambda: dqx.BatchNorm(3, "batch", eps=-1.0), ValueError, "`eps`")
    _raises(lambda: dqx.BatchNorm(0, "batch"), ValueError, "`input_size`")
    _raises(lambda: dqx.BatchNorm(3, "batch", momentum=1.5), ValueError, "`momentum`")
    _raises(lambda: dqx.BatchNorm(3, {"a": 1}), TypeError, "`axis_name`")
    _raises(lambda: dqx.BatchNorm(3, None, axis_index_groups=[[0]]), ValueError,
            "`axis_index_groups`")
    _raises(lambda: dqx.BatchNorm(3, "batch", mode="fast"), ValueError, "`mode`")
    _raises(lambda: bn(x.astype(jnp.int32), state, inference=True), TypeError, "`x`")
    _raises(lambda: dqx.DropBlock(0.2, 9)(x, key=jax.random.key(0)), ValueError, "block_size")
    # Equinox's own: a RuntimeError for the key; JAX's NameError for the axis.
    _raises(lambda: eqx.nn.Dropout(0.5)(x), RuntimeError, "requires a key")
    _raises(lambda: _eqx_bn(3)[0](x, _eqx_bn(3)[1]), NameError, "batch")


def test_import_without_equinox_says_how_to_install_it(monkeypatch):
    monkeypatch.setitem(sys.modules, "equinox", None)  # as if Equinox were not installed
    monkeypatch.delitem(sys.modules, "dropnorm.equinox")  # imported afresh, then restored
    with pytest.raises(ImportError, match=r'pip install "dropnorm\[equinox\]"') as info:
        importlib.import_module("dropnorm.equinox")
    assert type(info.value) is ImportError and "needs Equinox" in str(info.value)


# --- 8. The example, quick ------------------------------------------------------------------

def test_the_equinox_cnn_example_trains_quickly(capsys):
    sys.path.insert(0, EXAMPLES)
    import equinox_cnn

    results = equinox_cnn.main(["--quick", "--variants", "dropnorm"])
    # 30 steps of the study's CNN on 500 sequences: above chance (0.1), deterministic.
    assert results["dropnorm"].shape == (1,) and results["dropnorm"][0] > 0.2
    out = capsys.readouterr().out
    assert "| dropnorm | " in out and "1 seeds, 30 steps each." in out
