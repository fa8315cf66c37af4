"""Parity of dropnorm.linen with flax.linen: variables, outputs, statistics, RNG use, training.

Tolerances. dropnorm's variance is the shifted one, Flax's default is
``E[x^2] - E[x]^2``; on inputs with |mean| ~ std ~ 1 both are accurate to a few
float32 ulps, and the normalised outputs (|y| <~ 5) agree to ~1e-6, so float32
comparisons use rtol = atol = 1e-5 (about 100 ulps at 1, far below any real
discrepancy, e.g. a wrong epsilon or momentum changes results by >1e-4). Both
compute in float32 and cast the output last, so bfloat16 outputs can differ by
at most one bfloat16 rounding (2**-8 relative): rtol = 2**-7, atol = 1e-2.
"""

import itertools

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import dropnorm
from dropnorm import linen as dnn

F32_TOL = {"rtol": 1e-5, "atol": 1e-5}
BF16_TOL = {"rtol": 2**-7, "atol": 1e-2}


def _spec(tree):
    return jax.tree.map(lambda a: (a.shape, a.dtype), tree)


def _assert_close(a, b, tol):
    a, b = np.asarray(a, np.float32), np.asarray(b, np.float32)
    np.testing.assert_allclose(a, b, **tol)


def _perturbed(variables, key):
    """Move scale/bias/statistics away from 1/0 so that every term is exercised."""
    leaves, tree = jax.tree.flatten(variables)
    keys = jax.random.split(key, len(leaves))
    new = [
        (leaf.astype(jnp.float32) + 0.3 * jax.random.normal(k, leaf.shape)).astype(leaf.dtype)
        if leaf.dtype != jnp.int32 else leaf
        for leaf, k in zip(leaves, keys, strict=True)
    ]
    new = jax.tree.unflatten(tree, new)
    if "batch_stats" in new:  # keep the running variance positive
        new["batch_stats"]["var"] = jnp.abs(new["batch_stats"]["var"]) + 0.5
    return new


# --- BatchNorm parity grid --------------------------------------------------------------

_SHAPE = (8, 3, 4)
GRID = [
    # axis, use_scale, use_bias, momentum, epsilon, use_mask, x_dtype, dtype, param_dtype
    *[(ax, s, b, 0.9, 1e-5, False, jnp.float32, None, jnp.float32)
      for ax, (s, b) in itertools.product((-1, 1, (1, 2)), itertools.product((True, False),
                                                                              repeat=2))],
    *[(ax, True, True, m, e, mk, jnp.float32, None, jnp.float32)
      for ax, m, e, mk in itertools.product((-1, (1, 2)), (0.99, 0.5), (1e-5, 1e-2),
                                            (False, True))],
    *[(-1, True, True, 0.9, 1e-5, mk, xd, d, pd)
      for mk, (xd, d, pd) in itertools.product((False, True), [
          (jnp.float32, None, jnp.bfloat16), (jnp.bfloat16, None, jnp.float32),
          (jnp.bfloat16, None, jnp.bfloat16), (jnp.float32, jnp.bfloat16, jnp.float32),
          (jnp.bfloat16, jnp.float32, jnp.bfloat16), (jnp.bfloat16, jnp.bfloat16, jnp.bfloat16)])],
]


@pytest.mark.parametrize("case", GRID, ids=str)
def test_batch_norm_matches_flax(case):
    axis, use_scale, use_bias, momentum, epsilon, use_mask, x_dtype, dtype, param_dtype = case
    kw = dict(axis=axis, use_scale=use_scale, use_bias=use_bias, momentum=momentum,
              epsilon=epsilon, dtype=dtype, param_dtype=param_dtype)
    theirs, ours = nn.BatchNorm(**kw), dnn.BatchNorm(**kw)
    kx, km, kv = jax.random.split(jax.random.key(0), 3)
    x = (1.5 * jax.random.normal(kx, _SHAPE) + 0.5).astype(x_dtype)
    mask = jax.random.bernoulli(km, 0.7, _SHAPE) if use_mask else None

    # Identical variable trees (structure, shapes, dtypes), and nothing updated by init.
    v_theirs = theirs.init(jax.random.key(1), x, use_running_average=False, mask=mask)
    v_ours = ours.init(jax.random.key(1), x, use_running_average=False, mask=mask)
    assert _spec(v_ours) == _spec(v_theirs)
    jax.tree.map(np.testing.assert_array_equal, v_ours, v_theirs)

    variables = _perturbed(v_theirs, kv)
    tol = BF16_TOL if jnp.bfloat16 in (x_dtype, dtype) and dtype != jnp.float32 else F32_TOL
    # Training: same output (and dtype) and same updated statistics.
    y_t, upd_t = theirs.apply(variables, x, use_running_average=False, mask=mask,
                              mutable=["batch_stats"])
    y_o, upd_o = ours.apply(variables, x, use_running_average=False, mask=mask,
                            mutable=["batch_stats"])
    assert y_o.dtype == y_t.dtype and y_o.shape == y_t.shape
    _assert_close(y_o, y_t, tol)
    assert _spec(upd_o) == _spec(upd_t)
    jax.tree.map(lambda a, b: _assert_close(a, b, F32_TOL), upd_o, upd_t)
    # Evaluation: same output, no update needed (batch_stats not mutable).
    y_t = theirs.apply(variables, x, use_running_average=True, mask=mask)
    y_o = ours.apply(variables, x, use_running_average=True, mask=mask)
    assert y_o.dtype == y_t.dtype
    _assert_close(y_o, y_t, tol)


def test_batch_norm_fields_and_defaults_match_flax():
    import dataclasses

    theirs = {f.name: f.default for f in dataclasses.fields(nn.BatchNorm)}
    ours = {f.name: f.default for f in dataclasses.fields(dnn.BatchNorm)}
    for name, default in theirs.items():
        assert name in ours, name
        assert ours[name] == default, (name, ours[name], default)
    assert set(ours) - set(theirs) == {"virtual_batch_size"}
    # Flax's force_float32_reductions=False stores the statistics in param_dtype; so do we.
    x = jnp.ones((4, 3), jnp.bfloat16)
    kw = dict(force_float32_reductions=False, param_dtype=jnp.bfloat16)
    v_t = nn.BatchNorm(**kw).init(jax.random.key(0), x, use_running_average=False)
    v_o = dnn.BatchNorm(**kw).init(jax.random.key(0), x, use_running_average=False)
    assert _spec(v_o) == _spec(v_t)
    assert v_o["batch_stats"]["mean"].dtype == jnp.bfloat16


def test_dropout_fields_and_defaults_match_flax():
    import dataclasses

    theirs = {f.name: f.default for f in dataclasses.fields(nn.Dropout)}
    ours = {f.name: f.default for f in dataclasses.fields(dnn.Dropout)}
    assert {k: ours[k] for k in theirs} == theirs
    assert set(ours) - set(theirs) == {"mask_bits"}


def test_init_does_not_update_and_tolerates_one_example():
    x = jnp.ones((1, 3))  # a typical dummy init input: one value per feature
    outs = []
    for mod in (nn.BatchNorm(use_running_average=False), dnn.BatchNorm(use_running_average=False),
                dnn.BatchNorm(use_running_average=False, virtual_batch_size=4)):
        y, v = mod.init_with_output(jax.random.key(0), x)
        np.testing.assert_array_equal(v["batch_stats"]["mean"], np.zeros(3))
        np.testing.assert_array_equal(v["batch_stats"]["var"], np.ones(3))
        outs.append(y)
    # As in Flax: batch statistics of the one value (mean = x, variance 0), so the bias; ghost
    # batches that do not divide the dummy batch are off while initialising.
    for y in outs:
        np.testing.assert_array_equal(y, np.zeros((1, 3)))
    x = jnp.arange(12.0).reshape(4, 3)
    v = dnn.BatchNorm(use_running_average=False).init(jax.random.key(0), x)
    np.testing.assert_array_equal(v["batch_stats"]["mean"], np.zeros(3))
    # ...but applying in training mode does update them.
    _, upd = dnn.BatchNorm(use_running_average=False, momentum=0.0).apply(
        v, x, mutable=["batch_stats"])
    np.testing.assert_allclose(upd["batch_stats"]["mean"], x.mean(0), rtol=1e-6)


def test_batch_norm_accurate_where_flax_fast_variance_is_not():
    # |mean| >> std: Flax's E[x^2] - E[x]^2 in float32 loses the variance.
    x = 3000.0 + jax.random.normal(jax.random.key(0), (256, 2))
    v = nn.BatchNorm(use_running_average=False).init(jax.random.key(1), x)
    y_o, _ = dnn.BatchNorm(use_running_average=False).apply(v, x, mutable=["batch_stats"])
    y_t, _ = nn.BatchNorm(use_running_average=False).apply(v, x, mutable=["batch_stats"])
    # Ours: unit standard deviation to float32 accuracy; Flax's is visibly off.
    np.testing.assert_allclose(np.std(np.asarray(y_o, np.float64), 0), 1.0, atol=1e-3)
    assert np.max(np.abs(np.std(np.asarray(y_t, np.float64), 0) - 1.0)) > 1e-2


def test_batch_norm_traced_use_running_average():
    x = jax.random.normal(jax.random.key(0), (8, 3))
    bn = dnn.BatchNorm(momentum=0.5)
    v = _perturbed(bn.init(jax.random.key(1), x, use_running_average=False), jax.random.key(2))

    @jax.jit
    def f(flag):
        return bn.apply(v, x, use_running_average=flag, mutable=["batch_stats"])

    for flag in (False, True):
        y_ref, upd_ref = bn.apply(v, x, use_running_average=flag, mutable=["batch_stats"])
        y, upd = f(jnp.asarray(flag))
        _assert_close(y, y_ref, F32_TOL)
        if flag:
            upd_ref = {"batch_stats": v["batch_stats"]}
        jax.tree.map(lambda a, b: _assert_close(a, b, F32_TOL), upd, upd_ref)


def test_batch_norm_ghost_batches_and_cumulative_momentum():
    x = jax.random.normal(jax.random.key(0), (8, 3))
    bn = dnn.BatchNorm(use_running_average=False, virtual_batch_size=4)
    v = bn.init(jax.random.key(1), x)
    y, _ = bn.apply(v, x, mutable=["batch_stats"])
    # float64 oracle: each chunk of 4 examples normalised by its own statistics
    xn = np.asarray(x, np.float64).reshape(2, 4, 3)
    ref = (xn - xn.mean(1, keepdims=True)) / np.sqrt(xn.var(1, keepdims=True) + 1e-5)
    _assert_close(y, ref.reshape(8, 3), F32_TOL)
    # momentum=None stores a count (a feature Flax lacks) and averages all batches.
    bn = dnn.BatchNorm(use_running_average=False, momentum=None)
    v = bn.init(jax.random.key(1), x)
    assert int(v["batch_stats"]["count"]) == 0
    for i in range(3):
        _, upd = bn.apply(v, x + i, mutable=["batch_stats"])
        v = {**v, **upd}
    assert int(v["batch_stats"]["count"]) == 3
    _assert_close(v["batch_stats"]["mean"], np.asarray(x).mean(0) + 1.0, F32_TOL)


def _shard_map_apply(bn, variables, x):
    from jax.sharding import Mesh, PartitionSpec

    mesh = Mesh(np.array(jax.devices()[:8]), ("d",))

    def f(x):
        y, upd = bn.apply(variables, x, mutable=["batch_stats"])
        return y, upd["batch_stats"]["mean"][None], upd["batch_stats"]["var"][None]

    spec = PartitionSpec("d")
    return jax.shard_map(f, mesh=mesh, in_specs=spec, out_specs=spec)(x)


def test_axis_name_and_groups_across_devices():
    x = jax.random.normal(jax.random.key(0), (32, 3)) * 2 + 1  # 4 examples on each of 8 devices
    kw = dict(use_running_average=False, axis_name="d", momentum=0.0)
    v = nn.BatchNorm(**kw).init(jax.random.key(1), x)  # init needs no mapped axis
    assert _spec(dnn.BatchNorm(**kw).init(jax.random.key(1), x)) == _spec(v)
    outs_t = _shard_map_apply(nn.BatchNorm(**kw), v, x)
    outs_o = _shard_map_apply(dnn.BatchNorm(**kw), v, x)
    for a, b in zip(outs_o, outs_t, strict=True):  # global statistics, as Flax's
        _assert_close(a, b, F32_TOL)
    # Groups of devices: statistics per group of 4 devices (16 examples). Flax's pmean with
    # groups is not implemented under shard_map; compare with a float64 oracle instead.
    groups = [[0, 1, 2, 3], [4, 5, 6, 7]]
    y, mean, var = _shard_map_apply(dnn.BatchNorm(**kw, axis_index_groups=groups), v, x)
    xg = np.asarray(x, np.float64).reshape(2, 16, 3)
    ref = (xg - xg.mean(1, keepdims=True)) / np.sqrt(xg.var(1, keepdims=True) + 1e-5)
    _assert_close(y, ref.reshape(32, 3), F32_TOL)
    _assert_close(mean, np.repeat(xg.mean(1), 4, 0), F32_TOL)
    _assert_close(var, np.repeat(xg.var(1), 4, 0), F32_TOL)


def test_batch_norm_bad_input_errors():
    with pytest.raises(ValueError, match="axis"):
        dnn.BatchNorm(use_running_average=False, axis=3).init(jax.random.key(0), jnp.ones((4, 3)))
    with pytest.raises(TypeError, match="use_running_average"):
        dnn.BatchNorm(use_running_average="yes").init(jax.random.key(0), jnp.ones((4, 3)))


def test_batch_renorm_loads_batch_norm_checkpoint():
    x = jax.random.normal(jax.random.key(0), (8, 3))
    v = _perturbed(nn.BatchNorm().init(jax.random.key(1), x, use_running_average=True),
                   jax.random.key(2))
    # r_max=1, d_max=0: exactly batch norm in training; evaluation is always batch norm's.
    rn = dnn.BatchRenorm(r_max=1.0, d_max=0.0)
    for flag in (False, True):
        y_t, _ = nn.BatchNorm().apply(v, x, use_running_average=flag, mutable=["batch_stats"])
        y_o, _ = rn.apply(v, x, use_running_average=flag, mutable=["batch_stats"])
        _assert_close(y_o, y_t, F32_TOL)


# --- Dropout ---------------------------------------------------------------------------

class _Probe(nn.Module):
    """Draws the keys the 'dropout' stream gives a module at this path."""

    n: int

    @nn.compact
    def __call__(self):
        return [jax.random.key_data(self.make_rng("dropout")) for _ in range(self.n)]


def test_dropout_draws_the_keys_flax_draws():
    x = jax.random.normal(jax.random.key(0), (4, 5))
    rngs = {"dropout": jax.random.key(7)}

    class M(nn.Module):
        @nn.compact
        def __call__(self, x):
            d = dnn.Dropout(0.5, name="drop")  # one layer called three times
            return d(x, deterministic=True), d(x, deterministic=False), d(x, False)

    class P(nn.Module):
        @nn.compact
        def __call__(self):
            return _Probe(2, name="drop")()

    y1, y2, y3 = M().apply({}, x, rngs=rngs)
    k0, k1 = (jax.random.wrap_key_data(k) for k in P().apply({}, rngs=rngs))
    np.testing.assert_array_equal(y1, x)  # deterministic: no key drawn...
    np.testing.assert_array_equal(y2, dropnorm.dropout(k0, x, 0.5, True))  # ...so this is key 0
    np.testing.assert_array_equal(y3, dropnorm.dropout(k1, x, 0.5, True))  # and this key 1
    assert not np.array_equal(y2, y3)


@pytest.mark.parametrize("rate,det", [(0.5, True), (0.0, False), (1.0, False)])
def test_dropout_paths_that_draw_no_key_like_flax(rate, det):
    # Flax draws no key when deterministic or at rate 0 or 1: both run without a 'dropout' RNG
    # and give the same output.
    x = jax.random.normal(jax.random.key(0), (4, 5))
    y_t = nn.Dropout(rate, deterministic=det).apply({}, x)
    y_o = dnn.Dropout(rate, deterministic=det).apply({}, x)
    np.testing.assert_array_equal(y_o, y_t)
    with pytest.raises(Exception, match="dropout"):  # while a training call needs one
        dnn.Dropout(0.5, deterministic=False).apply({}, x)


def test_dropout_call_signature_rng_and_broadcast_dims():
    x = jax.random.normal(jax.random.key(0), (4, 6, 5))
    key = jax.random.key(3)
    layer = dnn.Dropout(0.5, broadcast_dims=(1,))
    y = layer.apply({}, x, False, key)  # positional (inputs, deterministic, rng), as in Flax
    np.testing.assert_array_equal(y, dropnorm.dropout(key, x, 0.5, True, broadcast_dims=(1,)))
    keep = np.asarray(y != 0)
    assert (keep == keep[:, :1, :]).all()  # one mask value along the broadcast axis
    assert 0 < keep.mean() < 1
    with pytest.raises(Exception, match="deterministic"):
        dnn.Dropout(0.5).apply({}, x)  # like Flax: no deterministic anywhere is an error


def test_dropout_traced_rate_and_deterministic_in_jit():
    x = jax.random.normal(jax.random.key(0), (16, 8))
    rngs = {"dropout": jax.random.key(1)}

    @jax.jit
    def f(rate, det):
        return dnn.Dropout(rate).apply({}, x, det, rngs=rngs)

    for rate in (0.0, 0.25, 0.5, 1.0):
        static = dnn.Dropout(rate).apply({}, x, False, rngs=rngs)
        np.testing.assert_array_equal(f(jnp.float32(rate), jnp.asarray(False)), static)
    np.testing.assert_array_equal(f(jnp.float32(0.5), jnp.asarray(True)), x)
    # Flax cannot do this (its Python branch on the rate fails on a tracer).
    with pytest.raises(jax.errors.TracerBoolConversionError):
        jax.jit(lambda r: nn.Dropout(r).apply({}, x, False, rngs=rngs))(0.5)
    # Rate 1 under a traced rate: zero gradients, not NaN.
    g = jax.grad(lambda x, r: dnn.Dropout(r).apply({}, x, False, rngs=rngs).sum())(x, 1.0)
    assert np.all(np.asarray(g) == 0)


@pytest.mark.parametrize("cls,fn", [(dnn.AlphaDropout, dropnorm.alpha_dropout),
                                    (dnn.GaussianDropout, dropnorm.gaussian_dropout),
                                    (dnn.DropPath, dropnorm.drop_path)])
def test_family_modules_call_the_pure_functions(cls, fn):
    x = jax.random.normal(jax.random.key(0), (8, 6))
    key = jax.random.key(5)
    np.testing.assert_array_equal(cls(0.3).apply({}, x, False, key), fn(key, x, 0.3, True))
    np.testing.assert_array_equal(cls(0.3, deterministic=True).apply({}, x), x)
    # keys come from the 'dropout' stream, as Dropout's do
    rngs = {"dropout": jax.random.key(9)}
    y1 = cls(0.3).apply({}, x, False, rngs=rngs)
    y2 = cls(0.3).apply({}, x, False, rngs={"dropout": jax.random.key(10)})
    assert not np.array_equal(y1, y2)


# --- Models: checkpoints both ways, and training ------------------------------------------

def _model(lib):
    class Net(lib.Module if hasattr(lib, "Module") else nn.Module):
        @nn.compact
        def __call__(self, x, train: bool):
            x = nn.Dense(32)(x)
            x = lib.BatchNorm(use_running_average=not train, momentum=0.9)(x)
            x = nn.relu(x)
            x = lib.Dropout(0.2, deterministic=not train)(x)
            return nn.Dense(2)(x)

    return Net()


def _blobs(n=256, d=8, seed=0):
    rng = np.random.default_rng(seed)
    y = rng.integers(0, 2, n)
    centers = rng.normal(size=(2, d)) * 1.5
    x = centers[y] + rng.normal(size=(n, d)) + 3.0  # offset: BatchNorm has work to do
    return jnp.asarray(x, jnp.float32), jnp.asarray(y)


def _train(model, variables, x, y, steps, seed=0):
    tx = optax.adam(1e-2)
    opt = tx.init(variables["params"])

    @jax.jit
    def step(variables, opt, key):
        def loss_fn(params):
            logits, upd = model.apply({**variables, "params": params}, x, True,
                                      rngs={"dropout": key}, mutable=["batch_stats"])
            return optax.softmax_cross_entropy_with_integer_labels(logits, y).mean(), upd

        (loss, upd), g = jax.value_and_grad(loss_fn, has_aux=True)(variables["params"])
        updates, opt = tx.update(g, opt)
        return {"params": optax.apply_updates(variables["params"], updates), **upd}, opt, loss

    losses = []
    for key in jax.random.split(jax.random.key(seed), steps):
        variables, opt, loss = step(variables, opt, key)
        losses.append(float(loss))
    return variables, losses


def test_checkpoints_load_both_ways():
    x, y = _blobs()
    theirs, ours = _model(nn), _model(dnn)
    v0 = theirs.init(jax.random.key(0), x, False)
    assert _spec(ours.init(jax.random.key(0), x, False)) == _spec(v0)
    for trainer, other in ((theirs, ours), (ours, theirs)):
        v, _ = _train(trainer, v0, x, y, steps=5)  # a trained checkpoint of one...
        # ...gives the same predictions in the other (eval mode),
        _assert_close(other.apply(v, x, False), trainer.apply(v, x, False), F32_TOL)
        # and the same training-mode batch statistics update.
        _, u_a = trainer.apply(v, x, True, rngs={"dropout": jax.random.key(1)},
                               mutable=["batch_stats"])
        _, u_b = other.apply(v, x, True, rngs={"dropout": jax.random.key(1)},
                             mutable=["batch_stats"])
        jax.tree.map(lambda a, b: _assert_close(a, b, F32_TOL), u_a, u_b)


def test_small_model_trains_with_optax():
    x, y = _blobs()
    model = _model(dnn)
    v = model.init(jax.random.key(0), x, False)
    v, losses = _train(model, v, x, y, steps=60)
    assert losses[-1] < 0.5 * losses[0], losses[::10]
    acc = float(jnp.mean(jnp.argmax(model.apply(v, x, False), -1) == y))
    assert acc > 0.9, acc
    # The running statistics have moved to the data's (offset 3 on the input).
    assert float(jnp.abs(v["batch_stats"]["BatchNorm_0"]["mean"]).mean()) > 0.1
