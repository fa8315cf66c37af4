"""Parity of dropnorm.nnx with flax.nnx: state, outputs, statistics, RNG streams, transforms.

Tolerances. dropnorm's variance is the shifted one, Flax's default is
``E[x^2] - E[x]^2``; on inputs with |mean| ~ std ~ 1 both are accurate to a few
float32 ulps and the outputs (|y| <~ 5) agree to ~1e-6, so float32 comparisons
use rtol = atol = 1e-5. With ``dtype=bfloat16`` Flax computes the evaluation
formula in bfloat16 (statistics and parameters cast to it) while dropnorm
computes in float32 and casts once, so Flax's output carries a few bfloat16
roundings (2**-9 relative each; |y| <~ 5): rtol = 2**-6, atol = 2**-5.
"""

import itertools

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx

import dropnorm
from dropnorm import nnx as dnx

F32_TOL = {"rtol": 1e-5, "atol": 1e-5}
BF16_TOL = {"rtol": 2**-6, "atol": 2**-5}


def _close(a, b, tol=F32_TOL):
    np.testing.assert_allclose(np.asarray(a, np.float32), np.asarray(b, np.float32), **tol)


def _spec(module, *filters):
    state = nnx.state(module, *filters)
    return jax.tree.map(lambda v: (type(v).__name__, v.shape, v.dtype), state,
                        is_leaf=lambda v: isinstance(v, nnx.Variable))


def _perturb(module, key):
    """Move scale/bias/statistics away from 1/0 so every term is exercised."""
    for path, var in nnx.iter_graph(module):
        if isinstance(var, (nnx.Param, nnx.BatchStat)) and var[...].dtype != jnp.int32:
            key, sub = jax.random.split(key)
            v = var[...].astype(jnp.float32) + 0.3 * jax.random.normal(sub, var[...].shape)
            if path[-1] == "var":
                v = jnp.abs(v) + 0.5
            var[...] = v.astype(var[...].dtype)


# --- BatchNorm parity grid --------------------------------------------------------------

_SHAPE = (8, 3, 4)
GRID = [
    # axis, use_scale, use_bias, momentum, epsilon, use_mask, x_dtype, dtype, param_dtype
    *[(ax, s, b, 0.9, 1e-5, False, jnp.float32, None, jnp.float32)
      for ax, (s, b) in itertools.product((-1, 1), itertools.product((True, False), repeat=2))],
    *[(ax, True, True, m, e, mk, jnp.float32, None, jnp.float32)
      for ax, m, e, mk in itertools.product((-1, 1), (0.99, 0.5), (1e-5, 1e-2), (False, True))],
    *[(-1, True, True, 0.9, 1e-5, mk, xd, d, pd)
      for mk, (xd, d, pd) in itertools.product((False, True), [
          (jnp.float32, None, jnp.bfloat16), (jnp.bfloat16, None, jnp.float32),
          (jnp.bfloat16, None, jnp.bfloat16), (jnp.float32, jnp.bfloat16, jnp.float32),
          (jnp.bfloat16, jnp.float32, jnp.bfloat16), (jnp.bfloat16, jnp.bfloat16, jnp.bfloat16)])],
]


@pytest.mark.parametrize("case", GRID, ids=str)
def test_batch_norm_matches_flax(case):
    axis, use_scale, use_bias, momentum, epsilon, use_mask, x_dtype, dtype, param_dtype = case
    kx, km, kv = jax.random.split(jax.random.key(0), 3)
    x = (1.5 * jax.random.normal(kx, _SHAPE) + 0.5).astype(x_dtype)
    mask = jax.random.bernoulli(km, 0.7, _SHAPE) if use_mask else None
    kw = dict(axis=axis, use_scale=use_scale, use_bias=use_bias, momentum=momentum,
              epsilon=epsilon, dtype=dtype, param_dtype=param_dtype)
    n = x.shape[axis]
    theirs = nnx.BatchNorm(n, **kw, rngs=nnx.Rngs(0))
    ours = dnx.BatchNorm(n, **kw, rngs=nnx.Rngs(0))
    assert _spec(ours) == _spec(theirs)  # same variables, types, names, shapes, dtypes
    _perturb(theirs, kv)
    nnx.update(ours, nnx.state(theirs))
    tol = BF16_TOL if jnp.bfloat16 in (x_dtype, dtype) and dtype != jnp.float32 else F32_TOL

    y_t, y_o = theirs(x, mask=mask), ours(x, mask=mask)  # training (the default)
    assert y_o.dtype == y_t.dtype and y_o.shape == y_t.shape
    _close(y_o, y_t, tol)
    assert _spec(ours) == _spec(theirs)
    jax.tree.map(_close, nnx.to_pure_dict(nnx.state(ours)), nnx.to_pure_dict(nnx.state(theirs)))

    theirs.eval()
    ours.eval()
    assert ours.use_running_average is True
    y_t, y_o = theirs(x, mask=mask), ours(x, mask=mask)
    assert y_o.dtype == y_t.dtype
    _close(y_o, y_t, tol)


def test_constructor_signatures_match_flax():
    import inspect

    for ours, theirs, extra in ((dnx.BatchNorm, nnx.BatchNorm, {"virtual_batch_size"}),
                                (dnx.BatchRenorm, nnx.BatchNorm, {"r_max", "d_max"}),
                                (dnx.Dropout, nnx.Dropout, {"mask_bits"})):
        p_t = inspect.signature(theirs.__init__).parameters
        # Written out (no **kwargs), and shown for the class itself (help, IDEs).
        p_o = inspect.signature(ours).parameters
        assert list(p_o) == list(inspect.signature(ours.__init__).parameters)[1:]
        assert all(p.kind != inspect.Parameter.VAR_KEYWORD for p in p_o.values())
        for name, p in p_t.items():
            if name == "self":
                continue
            assert name in p_o, name
            assert p_o[name].kind == p.kind, name
            if p.default is not inspect.Parameter.empty and not callable(p.default):
                assert p_o[name].default == p.default, name
        assert set(p_o) - set(p_t) == extra
    for ours, theirs in ((dnx.BatchNorm, nnx.BatchNorm), (dnx.Dropout, nnx.Dropout)):
        assert (list(inspect.signature(ours.__call__).parameters)
                == list(inspect.signature(theirs.__call__).parameters))


def test_traced_use_running_average_and_momentum_none():
    x = jax.random.normal(jax.random.key(0), (8, 3))
    bn = dnx.BatchNorm(3, momentum=0.5, rngs=nnx.Rngs(0))
    ref = nnx.clone(bn)

    @nnx.jit
    def f(m, flag):
        return m(x, use_running_average=flag)

    y = f(bn, jnp.asarray(False))
    _close(y, ref(x))
    _close(bn.mean[...], ref.mean[...])
    y = f(bn, jnp.asarray(True))
    _close(y, ref(x, use_running_average=True))
    _close(bn.mean[...], ref.mean[...])  # unchanged by the evaluation call
    # momentum=None: cumulative average with a count BatchStat.
    cum = dnx.BatchNorm(3, momentum=None, rngs=nnx.Rngs(0))
    for i in range(3):
        cum(x + i)
    assert int(cum.count[...]) == 3
    _close(cum.mean[...], np.asarray(x).mean(0) + 1.0)


def test_tuple_feature_axes_and_ghost_batches():
    x = jax.random.normal(jax.random.key(0), (8, 3, 4))
    bn = dnx.BatchNorm((3, 4), axis=(1, 2), rngs=nnx.Rngs(0))
    y = bn(x)
    xn = np.asarray(x, np.float64)
    _close(y, (xn - xn.mean(0)) / np.sqrt(xn.var(0) + 1e-5))
    gb = dnx.BatchNorm(4, virtual_batch_size=4, rngs=nnx.Rngs(0))
    y = gb(x)
    xc = xn.reshape(2, 12, 4)
    ref = (xc - xc.mean(1, keepdims=True)) / np.sqrt(xc.var(1, keepdims=True) + 1e-5)
    _close(y, ref.reshape(x.shape))
    with pytest.raises(ValueError, match="num_features"):
        dnx.BatchNorm(0, rngs=nnx.Rngs(0))
    with pytest.raises(ValueError, match=r"has 4 features along axis -1.*num_features=3"):
        dnx.BatchNorm(3, rngs=nnx.Rngs(0))(x)
    with pytest.raises(TypeError, match="use_running_average"):
        dnx.BatchNorm(4, use_running_average="no", rngs=nnx.Rngs(0))(x)


def test_axis_name_across_devices():
    from jax.sharding import Mesh, PartitionSpec

    mesh = Mesh(np.array(jax.devices()[:8]), ("d",))
    x = jax.random.normal(jax.random.key(0), (32, 3)) * 2 + 1  # 4 examples on each of 8 devices
    outs = []
    for lib in (nnx, dnx):
        graphdef, state = nnx.split(lib.BatchNorm(3, axis_name="d", momentum=0.0,
                                                  rngs=nnx.Rngs(0)))

        def f(state, x, graphdef=graphdef):
            m = nnx.merge(graphdef, state)
            return m(x), m.mean[...][None], m.var[...][None]

        outs.append(jax.shard_map(f, mesh=mesh, in_specs=(PartitionSpec(), PartitionSpec("d")),
                                  out_specs=PartitionSpec("d"))(state, x))
    for a, b in zip(*outs, strict=True):
        _close(a, b)
    _close(outs[1][1][0], np.asarray(x).mean(0))  # global statistics


def test_per_example_vmap_with_axis_name():
    # BatchNorm inside a per-example nnx.vmap: statistics over the mapped axis, like Flax.
    x = jax.random.normal(jax.random.key(0), (8, 3)) * 2 + 1
    outs = []
    for lib in (nnx, dnx):
        bn = lib.BatchNorm(3, axis_name="batch", momentum=0.0, rngs=nnx.Rngs(0))
        y = nnx.vmap(lambda m, x: m(x), in_axes=(None, 0), axis_name="batch")(bn, x)
        outs.append((y, bn.mean[...], bn.var[...]))
    for a, b in zip(*outs, strict=True):
        _close(a, b)
    _close(outs[1][1], np.asarray(x).mean(0))


def test_batch_renorm_takes_a_batch_norm_state():
    x = jax.random.normal(jax.random.key(0), (8, 3))
    theirs = nnx.BatchNorm(3, rngs=nnx.Rngs(0))
    _perturb(theirs, jax.random.key(1))
    ours = dnx.BatchRenorm(3, r_max=1.0, d_max=0.0, rngs=nnx.Rngs(0))
    nnx.update(ours, nnx.state(theirs))
    _close(ours(x), theirs(x))  # r_max=1, d_max=0: batch norm
    _close(ours.var[...], theirs.var[...])


# --- Dropout ---------------------------------------------------------------------------

def test_dropout_state_and_rng_use_match_flax():
    x = jax.random.normal(jax.random.key(0), (4, 5))
    theirs = nnx.Dropout(0.5, rngs=nnx.Rngs(dropout=3))
    ours = dnx.Dropout(0.5, rngs=nnx.Rngs(dropout=3))
    assert _spec(ours) == _spec(theirs)
    data = lambda t: jax.tree.map(  # noqa: E731
        lambda a: jax.random.key_data(a) if jax.dtypes.issubdtype(a.dtype, jax.dtypes.prng_key)
        else a, nnx.to_pure_dict(nnx.state(t)))
    jax.tree.map(np.testing.assert_array_equal, data(ours), data(theirs))  # same stream

    def count(m):
        return int(m.rngs.count[...])

    for det in (True, False, False, True, False):
        key = nnx.clone(ours).rngs()  # the key the next call draws from the stream
        y_o = ours(x, deterministic=det)
        theirs(x, deterministic=det)
        assert count(ours) == count(theirs)  # the same number of keys drawn
        ref = x if det else dropnorm.dropout(key, x, 0.5, True)
        np.testing.assert_array_equal(y_o, ref)
    # Rate 0 and 1 draw no key, like Flax; a call-time key or stream overrides the stored one.
    for rate in (0.0, 1.0):
        d = dnx.Dropout(rate, rngs=nnx.Rngs(dropout=0))
        y = d(x)
        np.testing.assert_array_equal(y, x if rate == 0 else nnx.Dropout(rate)(x))
        assert count(d) == 0
    k = jax.random.key(4)
    np.testing.assert_array_equal(dnx.Dropout(0.5)(x, rngs=k), dropnorm.dropout(k, x, 0.5, True))
    r = nnx.Rngs(dropout=4)
    k = nnx.clone(r).dropout()
    np.testing.assert_array_equal(dnx.Dropout(0.5)(x, rngs=r), dropnorm.dropout(k, x, 0.5, True))
    with pytest.raises(ValueError, match="rngs"):
        dnx.Dropout(0.5)(x)


def test_dropout_fresh_mask_per_call_under_jit():
    drop = dnx.Dropout(0.5, broadcast_dims=(0,), rngs=nnx.Rngs(dropout=0))
    x = jnp.ones((3, 64))

    @nnx.jit
    def f(m, x):
        return m(x)

    masks = [np.asarray(f(drop, x)) for _ in range(3)]
    for m in masks:
        assert (m == m[:1]).all()  # broadcast along axis 0
    assert not np.array_equal(masks[0], masks[1]) and not np.array_equal(masks[1], masks[2])
    assert int(drop.rngs.count[...]) == 3


def test_dropout_vmap_with_split_rngs_gives_each_member_its_mask():
    drop = dnx.Dropout(0.5, rngs=nnx.Rngs(dropout=0))
    x = jnp.ones((4, 64))

    @nnx.split_rngs(splits=4)
    @nnx.vmap(in_axes=(nnx.StateAxes({nnx.RngState: 0, ...: None}), 0))
    def f(m, x):
        return m(x)

    y = np.asarray(f(drop, x))
    assert all(not np.array_equal(y[i], y[j]) for i in range(4) for j in range(i))
    assert not np.array_equal(y, np.asarray(f(drop, x)))  # and fresh ones on the next call


def test_dropout_traced_rate_and_deterministic():
    x = jax.random.normal(jax.random.key(0), (16, 8))
    k = jax.random.key(1)

    @jax.jit
    def f(rate, det):
        return dnx.Dropout(rate)(x, deterministic=det, rngs=k)

    for rate in (0.0, 0.3, 1.0):
        np.testing.assert_array_equal(f(jnp.float32(rate), jnp.asarray(False)),
                                      dnx.Dropout(rate)(x, rngs=k))
    np.testing.assert_array_equal(f(jnp.float32(0.3), jnp.asarray(True)), x)
    with pytest.raises(jax.errors.TracerBoolConversionError):  # Flax cannot
        jax.jit(lambda r: nnx.Dropout(r)(x, rngs=k))(0.3)


@pytest.mark.parametrize("cls,fn", [(dnx.AlphaDropout, dropnorm.alpha_dropout),
                                    (dnx.GaussianDropout, dropnorm.gaussian_dropout),
                                    (dnx.DropPath, dropnorm.drop_path)])
def test_family_modules(cls, fn):
    x = jax.random.normal(jax.random.key(0), (8, 6))
    m = cls(0.3, rngs=nnx.Rngs(dropout=2))
    key = nnx.clone(m).rngs()
    np.testing.assert_array_equal(m(x), fn(key, x, 0.3, True))
    assert not np.array_equal(m(x), fn(key, x, 0.3, True))  # the stream moved on
    m.eval()
    np.testing.assert_array_equal(m(x), x)


# --- Models: train()/eval(), state exchange both ways, training ------------------------------

class Net(nnx.Module):
    def __init__(self, lib, *, rngs):
        self.lin1 = nnx.Linear(8, 32, rngs=rngs)
        self.bn = lib.BatchNorm(32, momentum=0.9, rngs=rngs)
        self.drop = lib.Dropout(0.2, rngs=rngs)
        self.lin2 = nnx.Linear(32, 2, rngs=rngs)

    def __call__(self, x):
        return self.lin2(self.drop(nnx.relu(self.bn(self.lin1(x)))))


def _blobs(n=256, d=8, seed=0):
    rng = np.random.default_rng(seed)
    y = rng.integers(0, 2, n)
    centers = rng.normal(size=(2, d)) * 1.5
    x = centers[y] + rng.normal(size=(n, d)) + 3.0
    return jnp.asarray(x, jnp.float32), jnp.asarray(y)


def _train(model, x, y, steps):
    model.train()
    opt = nnx.Optimizer(model, optax.adam(1e-2), wrt=nnx.Param)

    @nnx.jit
    def step(model, opt):
        def loss_fn(model):
            logits = model(x)
            return optax.softmax_cross_entropy_with_integer_labels(logits, y).mean()

        loss, grads = nnx.value_and_grad(loss_fn)(model)
        opt.update(model, grads)
        return loss

    return [float(step(model, opt)) for _ in range(steps)]


def test_train_eval_and_view_switch_both_layers():
    m = Net(dnx, rngs=nnx.Rngs(0))
    m.eval()
    assert m.bn.use_running_average is True and m.drop.deterministic is True
    m.train()
    assert m.bn.use_running_average is False and m.drop.deterministic is False
    v = nnx.view(m, deterministic=True, use_running_average=True)
    assert v.bn.use_running_average is True and m.bn.use_running_average is False


def test_state_exchange_both_ways():
    x, y = _blobs()
    theirs, ours = Net(nnx, rngs=nnx.Rngs(0)), Net(dnx, rngs=nnx.Rngs(0))
    assert _spec(ours) == _spec(theirs)
    for trainer, other in ((theirs, ours), (ours, theirs)):
        _train(trainer, x, y, steps=5)
        nnx.update(other, nnx.state(trainer))  # a trained state of one, loaded into the other
        trainer.eval()
        other.eval()
        _close(other(x), trainer(x))  # gives the same predictions
        trainer.train()
        other.train()
        nnx.update(other, nnx.state(trainer))
        trainer.drop.deterministic = other.drop.deterministic = True
        _close(other(x), trainer(x))  # and the same training-mode batch statistics
        _close(other.bn.mean[...], trainer.bn.mean[...])
        _close(other.bn.var[...], trainer.bn.var[...])


def test_small_model_trains_with_optax():
    x, y = _blobs()
    model = Net(dnx, rngs=nnx.Rngs(0))
    losses = _train(model, x, y, steps=60)
    assert losses[-1] < 0.5 * losses[0], losses[::10]
    model.eval()
    acc = float(jnp.mean(jnp.argmax(model(x), -1) == y))
    assert acc > 0.9, acc
    assert float(jnp.abs(model.bn.mean[...]).mean()) > 0.1  # statistics moved to the data's
