"""Monte-Carlo dropout (Gal & Ghahramani 2016): ``dropnorm.mc_dropout`` and the Flax one-liners.

Oracle: the mean and spread over K samples equal a float64 NumPy computation over the same
K keys, each pass evaluated on its own. Tolerance: the samples are float32 softmax
probabilities (in [0, 1], so half an ulp is at most 6e-8) and the reductions over K <= 32
add a few ulps; atol 1e-6 is ten times that and far below a wrong key or divisor (a K - 1
divisor moves the spread by 1.5% at K = 32).
"""

from __future__ import annotations

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx
from helpers import random_normal
from hypothesis import given, settings
from hypothesis import strategies as st

import dropnorm
from dropnorm import linen as dnn
from dropnorm import nnx as dnx

ATOL = 1e-6  # see the module docstring


def _forward(w1, w2, rate=0.5):
    """A pure two-layer net with dropout on: fn(key, x) -> logits."""
    def fn(key, x):
        h = jax.nn.relu(x @ w1)
        return dropnorm.dropout(key, h, rate, train=True) @ w2
    return fn


def _softmax64(z, axis=-1):
    z = np.asarray(z, np.float64)
    e = np.exp(z - z.max(axis=axis, keepdims=True))
    return e / e.sum(axis=axis, keepdims=True)


@pytest.mark.parametrize("k", [8, 32])  # K = 1: the property test below
def test_mean_and_std_equal_a_float64_oracle_over_the_same_keys(k):
    w1, w2 = random_normal((6, 16), seed=0), random_normal((16, 4), seed=1)
    x = random_normal((5, 6), seed=2)
    fn, key = _forward(w1, w2), jax.random.key(3)
    pred = dropnorm.mc_dropout(fn, key, k, x)
    # The oracle: each pass on its own (one compiled pass, called K times), with the
    # documented keys split(key, K)[i].
    one = jax.jit(fn)
    probs = np.stack([_softmax64(one(kk, x)) for kk in jax.random.split(key, k)])
    mean, std = probs.mean(0), probs.std(0)  # divisor K
    assert pred.mean.dtype == pred.std.dtype == jnp.float32
    np.testing.assert_allclose(pred.mean, mean, rtol=0, atol=ATOL)
    np.testing.assert_allclose(pred.std, std, rtol=0, atol=ATOL)
    np.testing.assert_allclose(np.asarray(pred.mean).sum(-1), 1.0, atol=ATOL)
    assert len({p.tobytes() for p in probs}) == k  # K distinct keys, K distinct samples
    if k != 8:
        return
    # Chunked passes (lax.map) and raw outputs (softmax=False) are the same computation.
    chunked = dropnorm.mc_dropout(fn, key, k, x, chunk_size=3)
    np.testing.assert_allclose(chunked.mean, pred.mean, rtol=0, atol=ATOL)
    np.testing.assert_allclose(chunked.std, pred.std, rtol=0, atol=ATOL)
    raw = dropnorm.mc_dropout(fn, key, k, x, softmax=False)
    logits = np.stack([np.asarray(one(kk, x), np.float64) for kk in jax.random.split(key, k)])
    # Logits are O(10) here: float32 rounding of their sums is ~1e-6 relative.
    np.testing.assert_allclose(raw.mean, logits.mean(0), rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(raw.std, logits.std(0), rtol=1e-5, atol=1e-5)
    # The class axis may be any axis.
    first = dropnorm.mc_dropout(lambda kk, x: fn(kk, x).T, key, k, x, axis=0)
    np.testing.assert_allclose(first.mean.T, pred.mean, rtol=0, atol=ATOL)


def test_float64_outputs_keep_float64_statistics():
    with jax.enable_x64(True):
        pred = dropnorm.mc_dropout(lambda k, x: x, jax.random.key(0), 4, jnp.ones(3, jnp.float64))
        assert pred.mean.dtype == pred.std.dtype == jnp.float64


@settings(max_examples=5, deadline=None)
@given(seed=st.integers(0, 2**16), k=st.sampled_from([3, 12]),
       shape=st.sampled_from([(1, 2), (3, 2, 5)]))
def test_property_one_sample_is_one_pass_and_a_deterministic_fn_has_no_spread(seed, k, shape):
    x = random_normal(shape, seed=seed)
    key = jax.random.key(seed)
    fn = lambda kk, x: dropnorm.dropout(kk, x, 0.3, train=True)  # noqa: E731
    one = dropnorm.mc_dropout(fn, key, 1, x)
    np.testing.assert_array_equal(one.mean, jax.nn.softmax(fn(jax.random.split(key, 1)[0], x)))
    np.testing.assert_array_equal(one.std, 0.0)
    # A function that ignores its key: the mean is its softmax, the spread 0 (to the
    # rounding of K equal float32 values summed and divided by K: a few ulps of p <= 1).
    still = dropnorm.mc_dropout(lambda kk, x: x * 2.0, key, k, x)
    np.testing.assert_allclose(still.mean, jax.nn.softmax(x * 2.0), rtol=0, atol=ATOL)
    assert float(still.std.max()) <= ATOL


def test_differentiable_under_jit():
    # (jit itself: the linen and NNX tests run mc_dropout inside jax.jit and nnx.jit.)
    w1, w2 = random_normal((6, 8), seed=0), random_normal((8, 3), seed=1)
    x = random_normal((4, 6), seed=2)
    key = jax.random.key(1)
    # The predictive NLL is differentiable through the K passes.
    g = jax.jit(jax.grad(lambda w: -jnp.log(
        dropnorm.mc_dropout(_forward(w, w2), key, 8, x).mean[:, 0]).sum()))(w1)
    assert np.all(np.isfinite(g)) and float(jnp.abs(g).sum()) > 0


# --- linen: dnn.mc_dropout_fn -------------------------------------------------------------------

class _LinenNet(nn.Module):
    """Two blocks of Dense -> BatchNorm -> relu -> Dropout, then Dense, with the flags
    written both ways Flax code writes them: as fields (``use_running_average=not train``)
    and in the call (``Dropout(rate)(x, deterministic=not train)``)."""

    lib: object
    rate: float = 0.5

    @nn.compact
    def __call__(self, x, train: bool):
        x = nn.Dense(16)(x)
        x = self.lib.BatchNorm(use_running_average=not train, momentum=0.9)(x)
        x = self.lib.Dropout(self.rate)(nn.relu(x), deterministic=not train)
        x = nn.Dense(16)(x)
        x = self.lib.BatchNorm(momentum=0.9)(x, use_running_average=not train)
        x = self.lib.Dropout(self.rate, deterministic=not train)(nn.relu(x))
        return nn.Dense(3)(x)


def _trained_linen(model, x):
    """Variables whose running statistics are not the initial ones (set by hand)."""
    variables = jax.jit(model.init, static_argnames="train")(jax.random.key(0), x, train=False)
    stats = jax.tree.map(lambda a: a * 1.7 + 0.3, variables["batch_stats"])
    return {**variables, "batch_stats": stats}


@pytest.mark.parametrize("lib", [dnn, nn], ids=["dropnorm", "flax"])
def test_linen_one_liner_turns_dropout_on_and_freezes_statistics(lib):
    x = random_normal((6, 5), seed=0)
    model, still = _LinenNet(lib), _LinenNet(lib, rate=0.0)
    variables = _trained_linen(model, x)
    fns = [dnn.mc_dropout_fn(model, variables, train=train, mutable=["batch_stats"])
           for train in (False, True)]

    @jax.jit  # one compilation for the whole test (its run time)
    def run(keys):
        samples = [jax.vmap(lambda k, f=f: f(k, x))(keys) for f in fns]
        zero_rate = dnn.mc_dropout_fn(still, variables, train=True)(keys[0], x)
        pred = dropnorm.mc_dropout(dnn.mc_dropout_fn(model, variables, train=False),
                                   jax.random.key(2), 8, x)  # the one-liner
        return samples, zero_rate, still.apply(variables, x, train=False), pred

    (off, on), zero_rate, evaluated, pred = run(jax.random.split(jax.random.key(2), 8))
    # Whatever the model's own flag, the same: dropout on, BatchNorm on running statistics,
    # and nothing updated (the mutable batch_stats come back as they were).
    for _, upd in (off, on):
        jax.tree.map(lambda a, b: np.testing.assert_array_equal(a, np.broadcast_to(b, a.shape)),
                     upd["batch_stats"], variables["batch_stats"])
    np.testing.assert_array_equal(on[0], off[0])
    ys = np.asarray(off[0])
    assert all(not np.array_equal(ys[i], ys[j]) for i in range(8) for j in range(i))
    # BatchNorm in evaluation mode: with dropout's rate at 0 the pass is the eval forward.
    np.testing.assert_allclose(zero_rate, evaluated, rtol=1e-6, atol=1e-6)
    np.testing.assert_allclose(pred.mean, jax.nn.softmax(ys, -1).mean(0), atol=ATOL)


def test_linen_dropblock_droppath_and_jit():
    class Net(nn.Module):
        @nn.compact
        def __call__(self, x, train: bool):
            h = nn.Dense(4)(x)
            h = dnn.DropBlock(0.3, 3, deterministic=not train)(h)
            h = h + dnn.DropPath(0.3, deterministic=not train)(h)
            return nn.Dense(3)(h.mean((1, 2)))

    x = random_normal((4, 8, 8, 2), seed=0)
    variables = jax.jit(Net().init, static_argnames="train")(jax.random.key(0), x, train=False)
    fn = dnn.mc_dropout_fn(Net(), variables, train=False)
    pred = jax.jit(lambda x: dropnorm.mc_dropout(fn, jax.random.key(1), 8, x))(x)
    assert float(pred.std.min()) > 0  # every example's prediction varies over the passes
    with pytest.raises(TypeError, match="`model` must be a flax.linen Module"):
        dnn.mc_dropout_fn(lambda x: x, variables)


# --- NNX: dnx.mc_dropout_fn ---------------------------------------------------------------------

class _NnxNet(nnx.Module):
    def __init__(self, lib, *, rngs, rate=0.5):
        self.lin1 = nnx.Linear(5, 16, rngs=rngs)
        self.bn = lib.BatchNorm(16, momentum=0.9, rngs=rngs)
        self.drop = lib.Dropout(rate, rngs=rngs)
        self.lin2 = nnx.Linear(16, 3, rngs=rngs)

    def __call__(self, x):
        return self.lin2(self.drop(nnx.relu(self.bn(self.lin1(x)))))


def _trained_nnx(lib, rngs, rate=0.5):
    """A model in eval mode whose running statistics are not the initial ones (set by hand)."""
    model = _NnxNet(lib, rngs=rngs, rate=rate)
    model.bn.mean[...] = jnp.linspace(-1.0, 1.0, 16)
    model.bn.var[...] = jnp.linspace(0.5, 2.0, 16)
    model.eval()
    return model


def _snapshot(model):
    return jax.tree.map(lambda a: np.asarray(jax.random.key_data(a)) if jax.dtypes.issubdtype(
        a.dtype, jax.dtypes.prng_key) else np.asarray(a), nnx.to_pure_dict(nnx.state(model)))


@pytest.mark.parametrize(("lib", "streams"), [(dnx, "default"), (nnx, "dropout")],
                         ids=["dropnorm-default-stream", "flax-dropout-stream"])
def test_nnx_one_liner_turns_dropout_on_and_leaves_the_model_alone(lib, streams):
    # nnx.Rngs(0) has only a 'default' stream, which the Dropout forks: it is reseeded too.
    rngs = nnx.Rngs(params=0, dropout=1) if streams == "dropout" else nnx.Rngs(0)
    model, still = _trained_nnx(lib, rngs), _trained_nnx(lib, nnx.Rngs(0), rate=0.0)
    before = _snapshot(model)
    x = random_normal((6, 5), seed=0)
    fn = dnx.mc_dropout_fn(model)

    @jax.jit  # one compilation for the whole test (its run time)
    def run(keys):
        pred = dropnorm.mc_dropout(dnx.mc_dropout_fn(model), jax.random.key(2), 8, x)
        return (jax.vmap(lambda k: fn(k, x))(keys), fn(keys[3], x),
                dnx.mc_dropout_fn(still)(keys[0], x), still(x), pred)

    keys = jax.random.split(jax.random.key(2), 8)
    ys, y3, zero_rate, evaluated, pred = run(keys)
    ys = np.asarray(ys)
    assert all(not np.array_equal(ys[i], ys[j]) for i in range(8) for j in range(i))
    # A pure function of the key (one pass alone vs inside the vmap: rounding, 1e-6).
    np.testing.assert_allclose(y3, ys[3], rtol=1e-6, atol=1e-6)
    # BatchNorm in evaluation mode: with the rate at 0 the pass is the eval forward.
    np.testing.assert_allclose(zero_rate, evaluated, rtol=1e-6, atol=1e-6)
    np.testing.assert_allclose(pred.mean, jax.nn.softmax(ys, -1).mean(0), atol=ATOL)
    # The model is untouched: statistics, parameters, RNG counters, flags.
    jax.tree.map(np.testing.assert_array_equal, _snapshot(model), before)
    assert model.drop.deterministic is True and model.bn.use_running_average is True
    model.train()  # whatever the model's flags: the same samples
    np.testing.assert_allclose(fn(keys[3], x), ys[3], rtol=1e-6, atol=1e-6)


def test_nnx_layers_get_distinct_keys_and_jit_works():
    class Two(nnx.Module):  # two dropout layers of one shape, built from one stream
        def __init__(self, rngs):
            self.a = dnx.Dropout(0.5, rngs=rngs)
            self.b = dnx.DropBlock(0.3, block_size=3, rngs=rngs)

        def __call__(self, x):
            return jnp.stack([self.a(x), self.b(x)])

    model = Two(nnx.Rngs(0))
    model.eval()
    x = jnp.ones((2, 8, 8, 4))
    y = dnx.mc_dropout_fn(model)(jax.random.key(0), x)
    assert float(jnp.mean(y[0] == 0)) > 0.3 and float(jnp.mean(y[1] == 0)) > 0.1
    # Under nnx.jit with the model as an argument, and the model is left as it was.
    f = nnx.jit(lambda m, x: dropnorm.mc_dropout(dnx.mc_dropout_fn(m), jax.random.key(1), 4,
                                                 x, softmax=False))
    pred = f(model, x)
    assert float(pred.std.max()) > 0 and model.a.deterministic is True
    assert int(model.a.rngs.count[...]) == 0
    # A raw uint32 key is accepted (NNX streams hold typed keys).
    dnx.mc_dropout_fn(model)(jax.random.PRNGKey(0), x)
    with pytest.raises(TypeError, match="`model` must be a flax.nnx Module"):
        dnx.mc_dropout_fn(nn.Dense(3))


# --- Errors -------------------------------------------------------------------------------------

_FN = _forward(jnp.ones((3, 4)), jnp.ones((4, 2)))
_X = jnp.ones((2, 3))


@pytest.mark.parametrize(("call", "exc", "words"), [
    (lambda: dropnorm.mc_dropout(_FN, jax.random.key(0), 0, _X), ValueError,
     ["`num_samples` must be at least 1", "got 0"]),
    (lambda: dropnorm.mc_dropout(_FN, jax.random.key(0), -3, _X), ValueError, ["got -3"]),
    (lambda: dropnorm.mc_dropout(_FN, jax.random.key(0), 8.0, _X), TypeError,
     ["`num_samples` must be a positive int", "got 8.0", "Pass int(8.0)"]),
    (lambda: dropnorm.mc_dropout(_FN, jax.random.key(0), True, _X), TypeError,
     ["`num_samples` must be a positive int", "got True"]),
    (lambda: dropnorm.mc_dropout(_FN, jax.random.key(0), "8", _X), TypeError, ["got '8'"]),
    (lambda: jax.jit(lambda k: dropnorm.mc_dropout(_FN, jax.random.key(0), k, _X))(8),
     TypeError, ["`num_samples` must be a Python int", "traced"]),
    (lambda: dropnorm.mc_dropout(_FN, jax.random.key(0), 4, _X, chunk_size=0), ValueError,
     ["`chunk_size` must be at least 1"]),
    (lambda: dropnorm.mc_dropout(_FN, None, 4, _X), TypeError, ["`key` is None"]),
    (lambda: dropnorm.mc_dropout(_FN, jnp.ones(2), 4, _X), TypeError, ["`key` must be a JAX"]),
    (lambda: dropnorm.mc_dropout(jax.random.key(0), _FN, 4, _X), TypeError,
     ["`fn` must be a function", "swapped"]),
    (lambda: dropnorm.mc_dropout(lambda k, x: (_FN(k, x), 0), jax.random.key(0), 4, _X),
     TypeError, ["`fn` must return one floating array", "got tuple"]),
    (lambda: dropnorm.mc_dropout(lambda k, x: jnp.argmax(_FN(k, x), -1), jax.random.key(0), 4,
                                 _X), TypeError, ["got an array of dtype int32"]),
    (lambda: dropnorm.mc_dropout(_FN, jax.random.key(0), 4, _X, axis=2), ValueError,
     ["`axis`=2 is out of range"]),
    (lambda: dropnorm.mc_dropout(lambda k, x: _FN(k, x).sum(), jax.random.key(0), 4, _X),
     ValueError, ["returns a scalar", "softmax=False"]),
])
def test_errors_name_the_argument(call, exc, words):
    with pytest.raises(exc) as info:
        call()
    msg = str(info.value)
    assert msg.startswith("mc_dropout: "), msg
    for word in words:
        assert word in msg, (word, msg)
