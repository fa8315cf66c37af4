"""``jax.export`` with symbolic shapes: export, serialise, deserialise, call, compare.

Each function is exported once as ``jax.export.export(jax.jit(f))`` with a symbolic batch
(and, where it applies, sequence or spatial) dimension, serialised (with its first-order
VJP for the training functions), deserialised, and called at two concrete sizes; the
results are compared with ``jax.jit(f)`` at the same sizes: bit-equal for masks (the
exported program draws the mask through the 64-bit counter's 2-D layout, the jitted one
through the 1-D layout of small masks: the same words), within float32 rounding where
the two programs sum in a different order. The deserialised VJP (``Exported.vjp()``) is
checked against ``jax.vjp`` of the same function.

Shared helpers come first (:func:`symbolic_specs`, :func:`export_roundtrip`); each area
has its own section below them. Every concrete size compiles the exported and the jitted
program once, so each test uses two small sizes.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import dropnorm

# ------------------------------------------------------------------ shared helpers


def symbolic_specs(args, shapes, constraints=()):
    """``jax.ShapeDtypeStruct`` specs of ``args`` with the symbolic ``shapes`` (a prefix
    pytree of shape strings such as ``"b, ..."``, None for a static argument), all in one
    symbolic scope (``jax.export.symbolic_args_specs``)."""
    return jax.export.symbolic_args_specs(args, shapes, constraints)


def _compare(got, want, rtol: float, atol: float, what: str):
    got_leaves, got_tree = jax.tree_util.tree_flatten_with_path(got)
    want_leaves, want_tree = jax.tree.flatten(want)
    assert jax.tree.structure(got) == want_tree, (what, got_tree, want_tree)
    for (path, g), w in zip(got_leaves, want_leaves, strict=True):
        if jax.dtypes.issubdtype(jnp.asarray(w).dtype, jax.dtypes.float0):
            continue  # the cotangent of a key or an integer input
        where = f"{what}, output {jax.tree_util.keystr(path)}"
        if jax.dtypes.issubdtype(jnp.asarray(w).dtype, jax.dtypes.prng_key):
            g, w = jax.random.key_data(g), jax.random.key_data(w)  # an RNG stream's key
        g, w = np.asarray(g), np.asarray(w)
        assert g.shape == w.shape and g.dtype == w.dtype, (where, g.shape, w.shape, g.dtype,
                                                            w.dtype)
        if (rtol == 0.0 and atol == 0.0) or not np.issubdtype(w.dtype, np.inexact):
            np.testing.assert_array_equal(g, w, err_msg=where)
        else:
            np.testing.assert_allclose(g, w, rtol=rtol, atol=atol, err_msg=where)


def _cotangents(out, seed: int = 0):
    """Random cotangents of ``out``'s float leaves (float0 for any other leaf)."""
    rng = np.random.default_rng(seed)

    def one(a):
        a = jnp.asarray(a)
        if jnp.issubdtype(a.dtype, jnp.floating):
            return jnp.asarray(rng.normal(size=a.shape), a.dtype)
        return np.zeros(a.shape, jax.dtypes.float0)

    return jax.tree.map(one, out)


def export_roundtrip(f, args_specs, concrete_args_list, *, rtol: float = 0.0,
                     atol: float = 0.0, vjp: bool = False, vjp_at: int = 0):
    """Export ``jax.jit(f)`` at ``args_specs``, serialise, deserialise, and check it.

    At each tuple of ``concrete_args_list`` the deserialised ``call`` must equal
    ``jax.jit(f)``: bit-equal with the default tolerances of 0, else within
    ``rtol``/``atol`` (state why in the caller); integer and boolean outputs (masks) are
    always compared bit for bit. The output's pytree structure (NamedTuple
    types included) must survive serialisation. With ``vjp``, the function is serialised
    with ``vjp_order=1`` and the deserialised ``Exported.vjp()`` is called at
    ``concrete_args_list[vjp_at]`` with random cotangents and compared with ``jax.vjp`` of
    ``jax.jit(f)`` (the input cotangents; float0 ones are skipped).

    Returns:
      The deserialised ``jax.export.Exported``.
    """
    exported = jax.export.export(jax.jit(f))(*args_specs)
    blob = exported.serialize(vjp_order=1 if vjp else 0)
    back = jax.export.deserialize(blob)
    jitted = jax.jit(f)
    for i, args in enumerate(concrete_args_list):
        _compare(back.call(*args), jitted(*args), rtol, atol, f"call at size {i}")
    if vjp:
        args = concrete_args_list[vjp_at]
        out, pullback = jax.vjp(jitted, *args)
        cts = _cotangents(out)
        want = pullback(cts)
        flat = back.vjp().call(*jax.tree.leaves(args), *jax.tree.leaves(cts))
        _compare(jax.tree.unflatten(jax.tree.structure(args), flat), want, rtol, atol,
                 "vjp")
    return back


KEY = jax.random.key(0)


def _normal(shape, seed: int = 1, dtype=jnp.float32):
    return jax.random.normal(jax.random.key(seed), shape, dtype)


# ------------------------------------------------------------------ dropout family

# Every member of the family in two exported programs (one per input rank), to compile
# fewer programs: each output is compared on its own. The key is an argument: an exported
# training program takes it as an input, so that every call can draw a new mask.


def _dense_family(key, x, rate):  # x: (b, 16); rate: a traced float32 scalar
    return {"dropout": dropnorm.dropout(key, x, rate, True),
            "dropout 32 bits": dropnorm.dropout(key, x, 0.3, True, mask_bits=32),
            "alpha_dropout": dropnorm.alpha_dropout(key, x, 0.2, True),
            "gaussian_dropout": dropnorm.gaussian_dropout(key, x, 0.2, True),
            "drop_path": dropnorm.drop_path(key, x, 0.5, True)}


def _spatial_family(key, x):  # x: (b, h, w, 3)
    return {"spatial dropout": dropnorm.dropout(key, x, 0.5, True, broadcast_dims=(1, 2)),
            "drop_block": dropnorm.drop_block(key, x, 0.3, True, block_size=3)}


@pytest.mark.parametrize(("f", "spec", "sizes"), [
    (_dense_family, "b, 16", ((3, 16), (8, 16))),
    (_spatial_family, "b, h, w, 3", ((2, 6, 7, 3), (3, 9, 8, 3))),
], ids=["dense", "spatial"])
def test_family_exports_with_symbolic_shapes_and_its_vjp(f, spec, sizes):
    xs = [_normal(s, seed=i) for i, s in enumerate(sizes)]
    # The dense family's dropout takes its rate as an argument (traced): one exported
    # program serves every rate.
    extra = (jnp.float32(0.3),) if f is _dense_family else ()
    back = export_roundtrip(f, symbolic_specs((KEY, xs[0], *extra),
                                              (None, spec, *(None for _ in extra))),
                            [(KEY, x, *extra) for x in xs], vjp=True, vjp_at=1)
    # each exported member did change x (a mask that keeps everything would pass the rest)
    for name, y in back.call(KEY, xs[1], *extra).items():
        assert not np.allclose(np.asarray(y), np.asarray(xs[1])), name
    if f is _dense_family:  # the traced rate's mask is the static rate's
        np.testing.assert_array_equal(
            np.asarray(back.call(KEY, xs[1], jnp.float32(0.7))["dropout"]),
            np.asarray(dropnorm.dropout(KEY, xs[1], 0.7, True)))


# ------------------------------------------------------------------ attention


def _attention_mask(key, q):
    """The attention weights' dropout mask as booleans ``(b, q, heads, k)``: with ``q = k =
    0`` the weights are uniform, and a one-hot ``v`` puts weight ``j`` in output column
    ``j``, so an output is 0 exactly where the mask dropped (``x != 0`` of a positive
    weight times 0 or ``1 / p``)."""
    z = jnp.zeros_like(q)
    n = q.shape[1]
    v = jnp.broadcast_to(jnp.eye(n, dtype=q.dtype)[None, :, None, :],
                         (q.shape[0], n, q.shape[2], n))
    return dropnorm.dot_product_attention(z, z, v, dropout_rng=key, dropout_rate=0.5,
                                          broadcast_dropout=False) != 0


def test_attention_with_dropout_exports_with_symbolic_batch_and_length_and_its_vjp():
    # Exported, the query length is symbolic: 32-row chunks over padded queries and the
    # 64-bit element index (the mask's size is not known); jitted, one pass and the 32-bit
    # index. The masks must be the same bits, the outputs the same to float32 rounding.
    def f(key, q, k, v):
        out = dropnorm.dot_product_attention(q, k, v, dropout_rng=key, dropout_rate=0.2,
                                             broadcast_dropout=False, is_causal=True)
        return out, _attention_mask(key, q)

    shapes = [(2, 5, 2, 8), (3, 37, 2, 8)]  # one chunk; two, padded
    args = [(KEY, _normal(s, 1), _normal(s, 2), _normal(s, 3)) for s in shapes]
    # float32 outputs of order 1, summed over chunks of another size (32 padded rows
    # exported, one pass jitted): a few ulps, within 1e-5. The masks: bit for bit.
    back = export_roundtrip(
        f, symbolic_specs(args[0], (None, "b, l, ...", "b, l, ...", "b, l, ...")), args,
        atol=1e-5, vjp=True, vjp_at=1)
    mask = np.asarray(back.call(*args[1])[1])
    assert 0.3 < mask.mean() < 0.7  # rate 0.5: it dropped about half


def test_attention_without_dropout_exports_with_a_symbolic_batch_and_heads():
    # Serving: a symbolic batch, a fixed length (the chunk size comes from the concrete
    # dims), evaluation mode; multi-query attention (one key head) with a symbolic number
    # of query heads, so that the key head is repeated a symbolic number of times.
    def f(q, k, v):
        return dropnorm.dot_product_attention(q, k, v, deterministic=True)

    args = [(_normal((b, 6, h, 4), 1), _normal((b, 6, 1, 4), 2), _normal((b, 6, 1, 4), 3))
            for b, h in ((1, 2), (4, 3))]
    # same chunking on both sides; 1e-6 absolute allows for XLA's own fusion choices
    export_roundtrip(f, symbolic_specs(args[0], ("b, 6, h, 4", "b, ...", "b, ...")), args,
                     atol=1e-6)


# ------------------------------------------------------------------ MC dropout


def test_mc_dropout_exports_and_returns_its_named_tuple():
    w = _normal((16, 3), 5)

    def f(key, x):
        return dropnorm.mc_dropout(
            lambda k, x: dropnorm.dropout(k, jax.nn.relu(x), 0.5, True) @ w, key, 4, x)

    xs = [_normal((2, 16), 6), _normal((5, 16), 7)]
    # the same program shape on both sides: softmax, mean and spread in float32, 1e-6
    back = export_roundtrip(f, symbolic_specs((KEY, xs[0]), (None, "b, ...")),
                            [(KEY, x) for x in xs], atol=1e-6)
    pred = back.call(KEY, xs[1])
    assert type(pred) is dropnorm.MCDropoutPrediction
    assert pred.mean.shape == (5, 3) and bool(jnp.all(pred.std > 0))


# ------------------------------------------------------------------ batch normalisation

# Float32 statistics summed over a symbolic batch (exported) and a concrete one (jitted):
# XLA may order the sums differently, a few ulps of O(1-10) values; 1e-5 absolute and
# relative, as for the distributed tests.
BN_TOL = dict(rtol=1e-5, atol=1e-5)


def _bn_args(b, seed=0, features=16):
    k = jax.random.split(jax.random.key(seed), 4)
    params = dropnorm.BatchNormParams(1.0 + 0.2 * jax.random.normal(k[0], (features,)),
                                      0.1 * jax.random.normal(k[1], (features,)))
    _, state = dropnorm.batch_norm_init(features)
    state = state._replace(mean=jnp.full((features,), 0.5), var=jnp.full((features,), 2.0))
    x = 3.0 + 2.0 * jax.random.normal(k[2], (b, features))
    mask = jnp.arange(b)[:, None] % 3 != 1
    return params, state, x, mask


def _batch_norm_family(params, state, x, mask, train):
    """Every pure batch-norm function of a (b, 16) batch, in one exported program; ``train``
    traced (one program for both modes). A running mean 5e3 standard deviations away takes
    the statistics' second round."""
    return {"train": dropnorm.batch_norm(params, state, x, True),
            "eval": dropnorm.batch_norm(params, state, x, False),
            "traced train": dropnorm.batch_norm(params, state, x, train),
            "mask": dropnorm.batch_norm(params, state, x, True, mask=mask),
            "renorm": dropnorm.batch_renorm(params, state, x, True, r_max=1.5, d_max=0.5),
            "a far running mean (second round)": dropnorm.batch_norm(
                params, state._replace(mean=jnp.full((16,), -1e4)), x, True)}


def test_batch_norm_family_exports_with_a_symbolic_batch_and_its_vjp():
    args = [(*_bn_args(b, seed), jnp.bool_(t)) for b, seed, t in ((5, 1, True), (12, 2, False))]
    back = export_roundtrip(_batch_norm_family,
                            symbolic_specs(args[0], (None, None, "b, 16", "b, 1", None)), args,
                            vjp=True, vjp_at=0, **BN_TOL)
    out = back.call(*args[0])
    for name, (_, new) in out.items():
        assert type(new) is dropnorm.BatchNormState, name  # the NamedTuple survives
        assert int(new.count) == (0 if name == "eval" else 1), name
    # The traced flag at False is evaluation: the state comes back unchanged.
    y, new = back.call(*args[1])["traced train"]
    np.testing.assert_allclose(np.asarray(y), np.asarray(back.call(*args[1])["eval"][0]),
                               **BN_TOL)
    assert int(new.count) == 0


def test_ghost_batches_and_population_statistics_export_with_a_symbolic_multiple():
    # Ghost batches of 4 need a batch that 4 divides: the symbolic batch is declared as
    # 4*k. PopulationStats in and out (registered for serialisation).
    def f(params, state, stats, x):
        y, new = dropnorm.batch_norm(params, state, x, True, virtual_batch_size=4)
        _, stats = dropnorm.batch_norm(params, stats, x, True)
        return y, new, stats

    def args(b, seed):
        params, state, x, _ = _bn_args(b, seed)
        return params, state, dropnorm.population_stats_init(state), x

    concrete = [args(8, 3), args(20, 4)]
    back = export_roundtrip(f, symbolic_specs(concrete[0], (None, None, None, "4*k, 16")),
                            concrete, vjp=True, **BN_TOL)
    _, _, stats = back.call(*concrete[1])
    assert type(stats) is dropnorm.PopulationStats and float(stats.count[0]) == 20
    # A plain symbolic batch cannot be split into ghost batches of 4: a clear error.
    with pytest.raises(ValueError, match="virtual_batch_size"):
        jax.export.export(jax.jit(f))(*symbolic_specs(concrete[0], (None, None, None, "b, 16")))


def test_a_batch_of_one_under_a_symbolic_batch_is_normalised_to_the_bias():
    # The documented behaviour (export guide): the static check for one value per feature
    # cannot run on a symbolic batch, so an exported train-mode batch_norm accepts b = 1,
    # where the variance is 0 and every output is the bias, as Flax's layer gives.
    params, state, x, _ = _bn_args(1)
    exported = jax.export.export(jax.jit(lambda p, s, x: dropnorm.batch_norm(p, s, x, True)))(
        *symbolic_specs((params, state, x), (None, None, "b, 16")))
    y, new = exported.call(params, state, x)
    np.testing.assert_allclose(np.asarray(y), np.broadcast_to(params.bias, (1, 16)), atol=1e-6)
    with pytest.raises(ValueError, match="too small"):  # concrete: the check still runs
        dropnorm.batch_norm(params, state, x, True)


def test_fold_batch_norm_exports_with_a_symbolic_input_width():
    # fold_batch_norm has no batch: its kernel's input width is the symbolic dimension.
    params, state, _, _ = _bn_args(2)

    def f(kernel, bias, params, state):
        return dropnorm.fold_batch_norm(kernel, bias, params, state)

    concrete = [(_normal((n, 16), n), _normal((16,), 9), params, state) for n in (3, 8)]
    # The same elementwise program on both sides: 1e-6 allows for XLA's fusion choices.
    export_roundtrip(f, symbolic_specs(concrete[0], ("n, 16", None, None, None)), concrete,
                     atol=1e-6, rtol=1e-6)


# ------------------------------------------------------------------ modules inside a model


def test_linen_model_exports_for_serving_and_training():
    import flax.linen as nn

    import dropnorm.linen as dl

    class Net(nn.Module):
        @nn.compact
        def __call__(self, x, train):
            x = dl.BatchNorm(use_running_average=not train)(nn.Dense(16)(x))
            return nn.Dense(3)(dl.Dropout(0.3, deterministic=not train)(nn.relu(x)))

    net = Net()
    variables = jax.jit(net.init, static_argnums=2)(jax.random.key(0), jnp.ones((2, 8)), False)

    def step(params, batch_stats, key, x):
        def loss(params):
            y, upd = net.apply({"params": params, "batch_stats": batch_stats}, x, True,
                               rngs={"dropout": key}, mutable=["batch_stats"])
            return jnp.mean(y ** 2), upd["batch_stats"]

        (value, stats), grads = jax.value_and_grad(loss, has_aux=True)(params)
        return value, grads, stats, net.apply({"params": params, "batch_stats": stats}, x,
                                              False)

    concrete = [(variables["params"], variables["batch_stats"], KEY, _normal((b, 8), b))
                for b in (4, 9)]
    export_roundtrip(step, symbolic_specs(concrete[0], (None, None, None, "b, 8")), concrete,
                     vjp=True, **BN_TOL)


def test_nnx_model_exports_through_its_pure_state():
    from flax import nnx

    import dropnorm.nnx as dn

    class Net(nnx.Module):
        def __init__(self, rngs):
            self.dense = nnx.Linear(8, 16, rngs=rngs)
            self.norm = dn.BatchNorm(16, rngs=rngs)
            self.drop = dn.Dropout(0.3, rngs=rngs)

        def __call__(self, x):
            return self.drop(nnx.relu(self.norm(self.dense(x))))

    graphdef, state = nnx.split(Net(nnx.Rngs(0)))

    def f(pure, x):
        model = nnx.merge(graphdef, nnx.State(pure))
        y = model(x)  # train mode: batch statistics, dropout from the model's own RNG stream
        return y, nnx.to_pure_dict(nnx.state(model))

    pure = nnx.to_pure_dict(state)
    concrete = [(pure, _normal((b, 8), b)) for b in (3, 10)]
    back = export_roundtrip(f, symbolic_specs(concrete[0], (None, "b, 8")), concrete,
                            **BN_TOL)
    _, new = back.call(*concrete[1])
    # train mode: the running mean moved from its initial 0 towards the batch's
    assert float(jnp.abs(new["norm"]["mean"]).max()) > 0
