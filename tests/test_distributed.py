"""Statistics across devices and mapped axes, on 8 simulated CPU devices (see conftest.py).

Every distributed form (shard_map, pmap, vmap with an axis name, sharded jit)
is compared with the single-device computation on the whole batch: outputs,
running statistics and gradients. Masked uneven shards and shards with very
different means are compared with a float64 NumPy oracle.

Tolerances: float32 reductions summed in a different order (per device, then
across devices) differ from the single-device order by a few ulps of the sums;
on O(1) normalised values and gradients that is well under 1e-5, the issue's
bound, so 1e-5 (absolute and relative) is used unless a test says otherwise.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from helpers import ref_batch_norm_train
from hypothesis import given, settings
from hypothesis import strategies as st
from jax import lax
from jax.sharding import Mesh, NamedSharding
from jax.sharding import PartitionSpec as P

import dropnorm

shard_map = jax.shard_map if hasattr(jax, "shard_map") else None
if shard_map is None:  # pragma: no cover - older JAX
    from jax.experimental.shard_map import shard_map

N = 8
TOL = dict(rtol=1e-5, atol=1e-5)


def mesh1d(name="d"):
    return Mesh(np.array(jax.devices()[:N]), (name,))


def close(a, b, **tol):
    np.testing.assert_allclose(np.asarray(a), np.asarray(b), **(tol or TOL))


def tree_close(a, b, **tol):
    la, lb = jax.tree.leaves(a), jax.tree.leaves(b)
    assert len(la) == len(lb)
    for u, v in zip(la, lb, strict=True):
        close(u, v, **tol)


def setup(shape=(16, 2, 3), seed=0):
    """Params with non-trivial scale/bias, a non-trivial state, data, and loss weights."""
    f = shape[-1]
    k = jax.random.split(jax.random.key(seed), 5)
    params = dropnorm.BatchNormParams(1.0 + 0.3 * jax.random.normal(k[0], (f,)),
                                      0.2 * jax.random.normal(k[1], (f,)))
    _, state = dropnorm.batch_norm_init(f)
    state = state._replace(mean=0.1 * jnp.arange(f, dtype=jnp.float32))
    x = 2.0 + 3.0 * jax.random.normal(k[2], shape)
    w = jax.random.normal(k[3], shape)  # loss weights: gradients of sum(y * w) are not trivial
    return params, state, x, w


def reference(params, state, x, w, **kw):
    """Single device, whole batch: ((y, new_state), (d params, d x))."""
    def f(p, x):
        y, s = dropnorm.batch_norm(p, state, x, True, **kw)
        return jnp.sum(y * w), (y, s)

    (_, out), grads = jax.jit(jax.value_and_grad(f, (0, 1), has_aux=True))(params, x)
    return out, grads


def test_eight_devices():
    assert jax.device_count() == N, "conftest.py must give the session 8 simulated CPU devices"


# ----------------------------------------------------------------------------------------------
# Each mapped form equals the single-device whole batch.


@pytest.mark.parametrize("mask_kind", [None, "uneven"])
def test_shard_map_equals_single_device(mask_kind):
    params, state, x, w = setup()
    mask = None
    if mask_kind:  # 2 rows per device; valid rows per device: 2, 1, 1, 2, 0, 2, 1, 1
        mask = (jnp.arange(16) % 5 < 3)[:, None, None] & jnp.ones((1, 2, 1), bool)
    mesh = mesh1d()

    def local(p, x, *m):
        return dropnorm.batch_norm(p, state, x, True, mask=m[0] if m else None, axis_name="d")

    specs = (P(), P("d")) + ((P("d"),) if mask is not None else ())
    mapped = shard_map(local, mesh=mesh, in_specs=specs, out_specs=(P("d"), P()))

    def f(p, x):
        y, s = mapped(p, x, *(() if mask is None else (mask,)))
        return jnp.sum(y * w), (y, s)

    (_, (y, s)), grads = jax.jit(jax.value_and_grad(f, (0, 1), has_aux=True))(params, x)
    (y0, s0), grads0 = reference(params, state, x, w, mask=mask)
    close(y, y0)
    tree_close(s, s0)
    tree_close(grads, grads0)


def test_pmap_equals_single_device():
    params, state, x, w = setup()
    xs, ws = x.reshape((N, 2) + x.shape[1:]), w.reshape((N, 2) + w.shape[1:])

    def local(p, x, w):
        def loss(p, x):
            y, s = dropnorm.batch_norm(p, state, x, True, axis_name="d")
            return jnp.sum(y * w), (y, s)

        (_, (y, s)), (gp, gx) = jax.value_and_grad(loss, (0, 1), has_aux=True)(p, x)
        # The loss is a sum over devices: its parameter gradient is the sum of the local ones.
        return y, s, lax.psum(gp, "d"), gx

    y, s, gp, gx = jax.pmap(local, axis_name="d", in_axes=(None, 0, 0))(params, xs, ws)
    (y0, s0), (gp0, gx0) = reference(params, state, x, w)
    close(y.reshape(x.shape), y0)
    for i in range(N):  # every device holds the same (replicated) state and gradient
        tree_close(jax.tree.map(lambda a, i=i: a[i], s), s0)
        tree_close(jax.tree.map(lambda a, i=i: a[i], gp), gp0)
    close(gx.reshape(x.shape), gx0)


@pytest.mark.parametrize("shape", [(16, 3), (16, 2, 3)], ids=["vector", "sequence"])
def test_vmap_per_example_equals_single_device(shape):
    # Per-example code: each lane sees one example (x[i] has no batch axis) and the batch
    # statistics run over the vmapped axis "batch".
    params, state, x, w = setup(shape)

    def per_example(p, xi):
        return dropnorm.batch_norm(p, state, xi, True, axis_name="batch")

    def f(p, x):
        y, s = jax.vmap(per_example, in_axes=(None, 0), out_axes=(0, None),
                        axis_name="batch")(p, x)
        return jnp.sum(y * w), (y, s)

    (_, (y, s)), grads = jax.jit(jax.value_and_grad(f, (0, 1), has_aux=True))(params, x)
    (y0, s0), grads0 = reference(params, state, x, w)
    close(y, y0)
    tree_close(s, s0)
    tree_close(grads, grads0)


def test_sharded_jit_without_axis_name_equals_single_device():
    params, state, x, w = setup((32, 2, 3))
    mesh = mesh1d()
    xs = jax.device_put(x, NamedSharding(mesh, P("d")))
    ws = jax.device_put(w, NamedSharding(mesh, P("d")))
    assert xs.sharding.shard_shape(xs.shape) == (4, 2, 3)  # really spread over 8 devices
    rep = NamedSharding(mesh, P())
    (y, s), grads = reference(jax.device_put(params, rep), jax.device_put(state, rep), xs, ws)
    one = jax.devices()[0]
    (y0, s0), grads0 = reference(*jax.device_put((params, state, x, w), one))
    assert len(y.sharding.device_set) == N and len(y0.sharding.device_set) == 1
    close(y, y0)
    tree_close(s, s0)
    tree_close(grads, grads0)


@functools.cache
def _sharded_bn():
    # One jitted train-mode layer with its gradients: each case below compiles it once per
    # shape and sharding.
    def f(params, state, x, w, mask):
        def loss(p, x):
            y, s = dropnorm.batch_norm(p, state, x, True, momentum=0.0, mask=mask)
            return jnp.sum(y.astype(jnp.float32) * w), (y, s)

        (_, out), grads = jax.value_and_grad(loss, (0, 1), has_aux=True)(params, x)
        return out, grads

    return jax.jit(f)


def _hard_case(case):
    """``(x, mask, state, mesh axes of x)`` for the sharded-jit hard cases."""
    rng = np.random.default_rng(11)
    rows = np.arange(64)
    x = rng.standard_normal((64, 4)).astype(np.float32)
    mask, spec, dims = None, ("d",), (N,)
    _, state = dropnorm.batch_norm_init(4)
    if case == "shards at +1e4 and -1e4":  # half the devices at each: r ~ 0, one round
        x = x + np.where(rows < 32, 1e4, -1e4)[:, None].astype(np.float32)
    elif case == "shards at 1e4 + d":  # the spread mostly between devices; r ~ 2e7
        x = (1e4 + (rows // 8)[:, None] + 0.05 * x).astype(np.float32)
    elif case == "an empty shard":  # device 2 has no valid row, device 5 one
        valid = np.array([8, 3, 0, 8, 5, 1, 8, 2])
        mask = (np.arange(8)[None, :] < valid[:, None]).reshape(64, 1)
        x = x + 10.0 * (rows // 8)[:, None]
    elif case == "bfloat16":
        x = jnp.asarray(3.0 + 2.0 * x, jnp.bfloat16)
    elif case == "a running mean 5e3 std away":  # the second round, on every device alike
        state = state._replace(mean=jnp.full((4,), -5e3))
    elif case == "2-D mesh":  # batch on "d" (4 devices), features on "m" (2)
        spec, dims = ("d", "m"), (4, 2)
        x = 2.0 + x
    return x, mask, state, spec, dims


@pytest.mark.parametrize("case", ["shards at +1e4 and -1e4", "shards at 1e4 + d",
                                  "an empty shard", "bfloat16", "a running mean 5e3 std away",
                                  "2-D mesh"])
def test_sharded_jit_hard_cases_equal_single_device(case):
    # A batch-sharded jax.jit, no axis_name: XLA's partitioner reduces the statistics across
    # devices. Outputs, statistics and gradients equal the single-device ones (TOL, as for
    # axis_name: float32 sums in another order) and the statistics the float64 oracle.
    x, mask, state, spec, dims = _hard_case(case)
    mesh = Mesh(np.array(jax.devices()[:N]).reshape(dims), spec)
    k = jax.random.split(jax.random.key(4), 2)
    params = dropnorm.BatchNormParams(1.0 + 0.3 * jax.random.normal(k[0], (4,)),
                                      0.2 * jax.random.normal(k[1], (4,)))
    w = np.asarray(jax.random.normal(jax.random.key(5), x.shape), np.float32)
    put = lambda a, p: None if a is None else jax.device_put(a, NamedSharding(mesh, p))  # noqa
    feat = P("m") if "m" in spec else P()
    sharded = _sharded_bn()(put(params, feat), put(state, P()) if feat == P() else
                            state._replace(mean=put(state.mean, feat), var=put(state.var, feat),
                                           count=put(state.count, P())),
                            put(x, P(*spec)), put(w, P(*spec)), put(mask, P("d")))
    one = jax.devices()[0]
    single = _sharded_bn()(*jax.device_put((params, state, x, w, mask), one))
    (y, s), _ = sharded
    assert len(y.sharding.device_set) == N
    # bfloat16 outputs: their own rounding (2**-8 relative), the rest as for axis_name.
    tol = dict(rtol=1e-2, atol=1e-2) if case == "bfloat16" else TOL
    close(y.astype(jnp.float32), single[0][0].astype(jnp.float32), **tol)
    tree_close(sharded[1], single[1], **tol)
    mean, var, _ = oracle(np.asarray(x, np.float32), np.ones((1, 1), bool) if mask is None
                          else mask)
    # Values up to 1e4 in float32 with a spread from 0.05 to 1e4: the variance to 1e-4
    # relative; the mean to float32 rounding at the data's magnitude (sums of 64 values of 1e4
    # are rounded to 2e-3 in any order: 4 ulps of 1e4 relative, plus TOL).
    mean_tol = dict(rtol=1e-5, atol=1e-5 + 5e-7 * float(np.max(np.abs(np.asarray(x, float)))))
    close(s.var, single[0][1].var, rtol=1e-4, atol=0)
    close(s.mean, single[0][1].mean, **mean_tol)
    close(s.var, var, rtol=1e-4, atol=0)
    close(s.mean, mean, **mean_tol)


def test_sharded_jit_on_an_explicit_mesh():
    # jax.make_mesh's default axis type in JAX 0.10 is Explicit: the shardings are part of the
    # types, and an operation XLA would have to move data for (a slice of the batch, which the
    # earlier shift took) raises at trace time. The layer and dropout run there too, with the
    # single-device results.
    mesh = jax.make_mesh((N,), ("d",))
    assert mesh.axis_types == (jax.sharding.AxisType.Explicit,)
    params, state, x, w = setup((32, 3))
    xs = jax.device_put(x, NamedSharding(mesh, P("d")))
    (y, s), grads = reference(params, state, xs, w)
    (y0, s0), grads0 = reference(params, state, x, w)
    close(y, y0)
    tree_close(s, s0)
    tree_close(grads, grads0)
    drop = jax.jit(lambda k, x: dropnorm.dropout(k, x, 0.5, True))
    np.testing.assert_array_equal(np.asarray(drop(jax.random.key(3), xs)),
                                  np.asarray(drop(jax.random.key(3), x)))


# ----------------------------------------------------------------------------------------------
# Exactness: masks with different valid counts per device, and very different per-device means.


def oracle(x, mask):
    """float64 masked mean, biased variance and normalised output (tests/helpers.py)."""
    y, mean, var, _ = ref_batch_norm_train(x, -1, mask=mask)
    return mean, var, y


def masked_uneven():
    """4 rows per device; device d has VALID[d] valid rows (one device has none)."""
    valid = np.array([4, 1, 0, 3, 2, 4, 1, 3])
    mask = (np.arange(4)[None, :] < valid[:, None]).reshape(32, 1)
    x = np.asarray(jax.random.normal(jax.random.key(3), (32, 3)), np.float32)
    x = x + 10.0 * np.repeat(np.arange(N), 4)[:, None]  # different means per device too
    return x, mask


@pytest.mark.parametrize("form", ["shard_map", "pmap", "sharded_jit"])
def test_masked_uneven_shards_are_exact(form):
    x, mask = masked_uneven()
    mean, var, y_ref = oracle(x, mask)
    _, state = dropnorm.batch_norm_init(3)
    bn = functools.partial(dropnorm.batch_norm, None, state, train=True, momentum=0.0)
    if form == "shard_map":
        f = shard_map(lambda x, m: bn(x, mask=m, axis_name="d"), mesh=mesh1d(),
                      in_specs=(P("d"), P("d")), out_specs=(P("d"), P()))
        y, s = jax.jit(f)(x, mask)
    elif form == "pmap":
        y, s = jax.pmap(lambda x, m: bn(x, mask=m, axis_name="d"), axis_name="d")(
            x.reshape(N, 4, 3), mask.reshape(N, 4, 1))
        y, s = y.reshape(32, 3), jax.tree.map(lambda a: a[0], s)
    else:
        sh = NamedSharding(mesh1d(), P("d"))
        y, s = jax.jit(lambda x, m: bn(x, mask=m))(jax.device_put(x, sh),
                                                   jax.device_put(mask, sh))
    # momentum 0: the new running statistics are the batch statistics themselves.
    # float32 statistics of values up to ~75 with spread ~23: 1e-5 relative.
    close(s.mean, mean, rtol=1e-5, atol=1e-5)
    close(s.var, var, rtol=1e-5, atol=1e-5)
    close(y, y_ref, rtol=1e-5, atol=1e-5)


def test_per_device_means_do_not_bias_variance():
    # Every device holds data around its own large mean: 1e4 + d, spread 0.05. The global
    # variance (about 5.25) is almost entirely between devices.
    rng = np.random.default_rng(0)
    x = (1e4 + np.repeat(np.arange(N), 64)[:, None] + 0.05 * rng.standard_normal((N * 64, 2)))
    x = x.astype(np.float32)
    mean, var, _ = oracle(x, np.ones((1, 1), bool))
    _, state = dropnorm.batch_norm_init(2)
    f = shard_map(lambda x: dropnorm.batch_norm(None, state, x, True, momentum=0.0,
                                                axis_name="d"),
                  mesh=mesh1d(), in_specs=P("d"), out_specs=(P("d"), P()))
    _, s = jax.jit(f)(x)
    # The data are float32 values near 1e4, stored to within 4.9e-4 (half an ulp); the
    # variance can be no better than that relative to its between-device spread: 1e-4.
    close(s.var, var, rtol=1e-4, atol=0)
    close(s.mean, mean, rtol=1e-7, atol=0)

    # The one-pass E[x^2] - E[x]^2 with a pmean (Flax's cross-device form) fails here, which
    # shows this test can tell the two apart.
    def one_pass(x):
        m, m2 = lax.pmean(jnp.stack([x.mean(0), (x * x).mean(0)]), "d")
        return m2 - m * m

    naive = shard_map(one_pass, mesh=mesh1d(), in_specs=P("d"), out_specs=P())(x)
    assert np.max(np.abs(np.asarray(naive) - var) / var) > 1e-2


@jax.jit
def prop_bn(state, x, mask):
    # One compilation serves every hypothesis example (the shapes are fixed).
    return jax.vmap(lambda x, m: dropnorm.batch_norm(None, state, x, True, mask=m, momentum=0.0,
                                                     axis_name="d"),
                    axis_name="d", out_axes=(0, None))(x, mask)


@settings(max_examples=12, deadline=None)
@given(counts=st.lists(st.integers(0, 3), min_size=N, max_size=N).filter(lambda c: sum(c) >= 2),
       offsets=st.lists(st.sampled_from([0.0, 1.0, -30.0, 500.0]), min_size=N, max_size=N),
       seed=st.integers(0, 2**16))
def test_property_any_valid_counts_and_offsets_are_exact(counts, offsets, seed):
    # Any number of valid rows per device (0 to 3 of 3) and any per-device offset: the
    # combined statistics equal the float64 statistics of the valid rows of the whole batch.
    x = np.random.default_rng(seed).standard_normal((N, 3, 2)).astype(np.float32)
    x = x + np.asarray(offsets, np.float32)[:, None, None]
    mask = np.arange(3)[None, :, None] < np.asarray(counts)[:, None, None]
    _, state = dropnorm.batch_norm_init(2)
    y, s = prop_bn(state, x, mask)
    mean, var, y_ref = oracle(x.reshape(-1, 2), mask.reshape(-1, 1))
    # Values up to ~500 with a spread up to ~250: float32 sums of 24 such values are good to
    # a few ulps of 500 (~1e-4 absolute); variances (up to ~6e4) to 1e-5 relative.
    close(s.mean, mean, rtol=1e-5, atol=1e-4)
    close(s.var, var, rtol=1e-5, atol=1e-4)
    close(y.reshape(-1, 2), y_ref, rtol=1e-4, atol=1e-4)


def test_batch_renorm_passes_axis_name_through():
    params, state, x, w = setup((16, 3))
    state = state._replace(var=jnp.full((3,), 4.0))  # running stats far from the batch ones
    kw = dict(r_max=1.5, d_max=0.5)
    y0, s0 = dropnorm.batch_renorm(params, state, x, True, **kw)
    y, s = jax.jit(jax.vmap(
        lambda xi: dropnorm.batch_renorm(params, state, xi, True, axis_name="b", **kw),
        axis_name="b", out_axes=(0, None)))(x)
    close(y, y0)
    tree_close(s, s0)


# ----------------------------------------------------------------------------------------------
# Tuples of axis names and axis_index_groups.


def test_tuple_of_axis_names_shard_map_2d_mesh():
    params, state, x, w = setup()
    mesh = Mesh(np.array(jax.devices()).reshape(2, 4), ("a", "b"))

    def f(p, x):
        y, s = shard_map(lambda p, x: dropnorm.batch_norm(p, state, x, True, axis_name=("a", "b")),
                         mesh=mesh, in_specs=(P(), P(("a", "b"))),
                         out_specs=(P(("a", "b")), P()))(p, x)
        return jnp.sum(y * w), (y, s)

    (_, (y, s)), grads = jax.jit(jax.value_and_grad(f, (0, 1), has_aux=True))(params, x)
    (y0, s0), grads0 = reference(params, state, x, w)
    close(y, y0)
    tree_close(s, s0)
    tree_close(grads, grads0)


@pytest.mark.parametrize("outer", ["vmap", "pmap"])
def test_tuple_of_axis_names_nested_maps(outer):
    # Devices (or an outer vmap) times examples: statistics over both names at once.
    params, state, x, _ = setup((16, 3))
    inner = jax.vmap(lambda xi: dropnorm.batch_norm(params, state, xi, True,
                                                    axis_name=("dev", "ex")),
                     axis_name="ex")
    wrap = jax.vmap if outer == "vmap" else jax.pmap
    y, s = jax.jit(wrap(inner, axis_name="dev"))(x.reshape(N, 2, 3))
    (y0, s0), _ = reference(params, state, x, jnp.zeros_like(x))
    close(y.reshape(x.shape), y0)
    tree_close(jax.tree.map(lambda a: a[0, 0], s), s0)


GROUPS = [[[0, 1, 2, 3], [4, 5, 6, 7]], [[0], [1, 2], [3, 4, 5, 6, 7]],
          [[6, 0], [1, 7, 2, 3, 4, 5]]]


def per_group_reference(params, state, x, groups, rows):
    """Single-device batch norm of each group's examples: y, and the state of each device."""
    y = np.zeros(x.shape, np.float32)
    states = [None] * N
    for g in groups:
        idx = np.concatenate([np.arange(d * rows, (d + 1) * rows) for d in g])
        yg, sg = dropnorm.batch_norm(params, state, x[idx], True)
        y[idx] = yg
        for d in g:
            states[d] = sg
    return y, states


@pytest.mark.parametrize("form", ["shard_map", "pmap"])
def test_groups_that_disagree_on_the_second_round_all_take_it(form):
    # The first group's data sit 1e4 std from the running mean (its second round is needed),
    # the second group's at it. The second round's collective spans all devices, so every
    # device must take the same branch: before the predicate was or-ed over the groups, the
    # second group's devices skipped it and the first group's waited forever (XLA CPU
    # aborted after its 40 s rendezvous timeout). The variance's tolerance is the one the
    # far-mean tests use (1e-4 relative at mean 1e4 x std).
    groups = [[0, 1, 2, 3], [4, 5, 6, 7]]
    params, state, x, _ = setup((16, 3))
    x = x.at[:8].add(3e4)
    y0, states0 = per_group_reference(params, state, np.asarray(x), groups, 2)

    def local(x):
        y, s = dropnorm.batch_norm(params, state, x, True, axis_name="d",
                                   axis_index_groups=groups)
        return y, jax.tree.map(lambda a: a[None], s)

    if form == "shard_map":
        y, s = jax.jit(shard_map(local, mesh=mesh1d(), in_specs=P("d"),
                                 out_specs=(P("d"), P("d"))))(x)
    else:
        y, s = jax.jit(jax.pmap(local, axis_name="d"))(x.reshape(N, 2, 3))
        y, s = y.reshape(x.shape), jax.tree.map(lambda a: a[:, 0], s)
    close(y, y0, rtol=1e-4, atol=1e-4)
    for d in range(N):
        close(s.mean[d], states0[d].mean)
        close(s.var[d], states0[d].var, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("groups", GROUPS, ids=["halves", "uneven", "scattered"])
@pytest.mark.parametrize("form", ["shard_map", "pmap", "vmap"])
def test_axis_index_groups_give_per_group_statistics(form, groups):
    params, state, x, _ = setup((16, 3))
    y0, states0 = per_group_reference(params, state, np.asarray(x), groups, 2)

    def local(x):
        y, s = dropnorm.batch_norm(params, state, x, True, axis_name="d",
                                   axis_index_groups=groups)
        return y, jax.tree.map(lambda a: a[None], s)  # per-device state, stacked

    if form == "shard_map":
        y, s = jax.jit(shard_map(local, mesh=mesh1d(), in_specs=P("d"),
                                 out_specs=(P("d"), P("d"))))(x)
    else:
        y, s = jax.jit(getattr(jax, form)(local, axis_name="d"))(x.reshape(N, 2, 3))
        y, s = y.reshape(x.shape), jax.tree.map(lambda a: a[:, 0], s)
    close(y, y0)
    for d in range(N):
        tree_close(jax.tree.map(lambda a, d=d: a[d], s), states0[d])


def test_axis_index_groups_with_a_tuple_of_names():
    params, state, x, _ = setup((16, 3))
    groups = [[0, 1, 2, 3, 4, 5], [6, 7]]  # linear indices over ("a", "b")
    y0, _ = per_group_reference(params, state, np.asarray(x), groups, 2)
    mesh = Mesh(np.array(jax.devices()).reshape(2, 4), ("a", "b"))
    f = shard_map(lambda x: dropnorm.batch_norm(params, state, x, True, axis_name=("a", "b"),
                                                axis_index_groups=groups)[0],
                  mesh=mesh, in_specs=P(("a", "b")), out_specs=P(("a", "b")))
    close(jax.jit(f)(x), y0)


def test_bad_axis_name_and_groups_raise_clear_errors():
    params, state, x, _ = setup((16, 3))
    bn = functools.partial(dropnorm.batch_norm, params, state, train=True)
    vm = lambda f: jax.vmap(f, axis_name="d")(x.reshape(N, 2, 3))  # noqa: E731
    with pytest.raises(ValueError, match=r"`axis_name`='d' is not bound.*sharded jax.jit"):
        jax.jit(lambda x: bn(x, axis_name="d"))(x)
    with pytest.raises(TypeError, match=r"`axis_name` must be .*tuple of names; got \['d'\]"):
        vm(lambda x: bn(x, axis_name=["d"]))
    with pytest.raises(TypeError, match=r"`axis_name`.*got \(\)"):
        vm(lambda x: bn(x, axis_name=()))
    with pytest.raises(ValueError, match=r"`axis_index_groups`=.* needs `axis_name`"):
        bn(x, axis_index_groups=[[0, 1]])
    with pytest.raises(TypeError, match=r"`axis_index_groups` must be .*got \[0, 1\]"):
        vm(lambda x: bn(x, axis_name="d", axis_index_groups=[0, 1]))
    with pytest.raises(ValueError, match=r"contains index 8, but the axis has 8 devices"):
        vm(lambda x: bn(x, axis_name="d", axis_index_groups=[[0, 1, 2, 3], [4, 5, 6, 8]]))
    with pytest.raises(ValueError, match=r"lists device 3 twice"):
        vm(lambda x: bn(x, axis_name="d", axis_index_groups=[[0, 1, 2, 3], [3, 4, 5, 6, 7]]))
    with pytest.raises(ValueError, match=r"leaves out devices \[7\]"):
        vm(lambda x: bn(x, axis_name="d", axis_index_groups=[[0, 1, 2, 3], [4, 5, 6]]))
    with pytest.raises(ValueError, match=r"leaves no axis .*\(pass `axis_name`"):
        bn(x[0])


# ----------------------------------------------------------------------------------------------
# Ghost batches.


def per_chunk_reference(params, state, x, v, momentum=0.9):
    """Normalise each chunk of v examples by its own statistics; running stats from their mean."""
    ys, means, vars_ = [], [], []
    for c in range(x.shape[0] // v):
        chunk = x[c * v:(c + 1) * v]
        y, s = dropnorm.batch_norm(params, state, chunk, True, momentum=0.0)
        ys.append(y)
        means.append(s.mean)
        vars_.append(s.var)
    mean, var = np.mean(means, 0), np.mean(vars_, 0)
    return np.concatenate(ys), (momentum * state.mean + (1 - momentum) * mean,
                                momentum * state.var + (1 - momentum) * var)


@pytest.mark.parametrize("v", [2, 4, 16])
def test_ghost_batches_equal_per_chunk_normalisation(v):
    params, state, x, _ = setup((16, 2, 3))
    y0, (m0, v0) = per_chunk_reference(params, state, x, v)
    y, s = dropnorm.batch_norm(params, state, x, True, momentum=0.9, virtual_batch_size=v)
    close(y, y0)
    close(s.mean, m0)
    close(s.var, v0)
    assert int(s.count) == 1


@pytest.mark.parametrize("rows, v", [(4, 2), (4, 4), (2, 4), (2, 8), (2, 16)],
                         ids=["2-per-device", "1-per-device", "span-2", "span-4", "span-8"])
@pytest.mark.parametrize("form", ["shard_map", "sharded_jit"])
def test_ghost_batches_across_devices_equal_single_device(form, rows, v):
    # Ghost batches are consecutive chunks of the global batch wherever its pieces live: on
    # one device, several per device, or one spanning several devices.
    params, state, x, w = setup((N * rows, 3))
    kw = dict(momentum=0.9, virtual_batch_size=v)
    (y0, s0), grads0 = reference(params, state, x, w, **kw)
    if form == "shard_map":
        mapped = shard_map(lambda p, x: dropnorm.batch_norm(p, state, x, True, axis_name="d",
                                                            **kw),
                           mesh=mesh1d(), in_specs=(P(), P("d")), out_specs=(P("d"), P()))
        wd = w
    else:
        sh = NamedSharding(mesh1d(), P("d"))
        mapped = lambda p, x: dropnorm.batch_norm(p, state, x, True, **kw)  # noqa: E731
        x, wd = jax.device_put(x, sh), jax.device_put(w, sh)

    def f(p, x):
        y, s = mapped(p, x)
        return jnp.sum(y * wd), (y, s)

    (_, (y, s)), grads = jax.jit(jax.value_and_grad(f, (0, 1), has_aux=True))(params, x)
    close(y, y0)
    tree_close(s, s0)
    tree_close(grads, grads0)


def test_ghost_batches_spanning_devices_that_disagree_on_the_second_round():
    # Ghost batches of 4 rows spanning 2 devices each (summed by recursive doubling): only
    # the first one's data sit far from the running mean, so only its devices' sums call
    # for the second round, whose exchanges span all devices; the flag is or-ed over the
    # devices (one scalar psum) so that all take it (see the groups test above).
    params, state, x, w = setup((N * 2, 3))
    x = x.at[:4].add(3e4)
    kw = dict(momentum=0.9, virtual_batch_size=4)
    (y0, s0), _ = reference(params, state, x, w, **kw)
    y, s = jax.jit(shard_map(
        lambda p, x: dropnorm.batch_norm(p, state, x, True, axis_name="d", **kw),
        mesh=mesh1d(), in_specs=(P(), P("d")), out_specs=(P("d"), P())))(params, x)
    close(y, y0, rtol=1e-4, atol=1e-4)
    close(s.mean, s0.mean)
    close(s.var, s0.var, rtol=1e-4, atol=1e-4)


def test_ghost_batch_errors():
    params, state, x, _ = setup((16, 3))
    with pytest.raises(ValueError, match=r"batch of 16 does not divide into ghost batches of "
                                         r"`virtual_batch_size`=5; pick a divisor of 16"):
        dropnorm.batch_norm(params, state, x, True, virtual_batch_size=5)
    with pytest.raises(ValueError, match=r"batch of 2 on each device does not divide .*=3"):
        jax.vmap(lambda x: dropnorm.batch_norm(params, state, x, True, axis_name="d",
                                               virtual_batch_size=3),
                 axis_name="d")(x.reshape(N, 2, 3))
    with pytest.raises(ValueError, match=r"8 devices do not group into ghost batches of 6"):
        jax.vmap(lambda x: dropnorm.batch_norm(params, state, x, True, axis_name="d",
                                               virtual_batch_size=6),
                 axis_name="d")(x.reshape(N, 2, 3))
    with pytest.raises(ValueError, match=r"cannot be combined with `axis_index_groups`"):
        jax.vmap(lambda x: dropnorm.batch_norm(params, state, x, True, axis_name="d",
                                               virtual_batch_size=2,
                                               axis_index_groups=[list(range(N))]),
                 axis_name="d")(x.reshape(N, 2, 3))
    with pytest.raises(ValueError, match=r"give 1 value per feature"):
        dropnorm.batch_norm(params, state, x, True, virtual_batch_size=1)
    with pytest.raises(ValueError, match=r"positive int; got 0"):
        dropnorm.batch_norm(params, state, x, True, virtual_batch_size=0)


# ----------------------------------------------------------------------------------------------
# Dropout does not depend on how its input is split.


@pytest.mark.parametrize("mask_bits", [16, 32])
def test_dropout_same_output_sharded_or_not(mask_bits):
    key = jax.random.key(7)
    x = jax.random.normal(jax.random.key(1), (64, 24))
    drop = jax.jit(lambda k, x: dropnorm.dropout(k, x, 0.5, True, mask_bits=mask_bits))
    y0 = drop(key, jax.device_put(x, jax.devices()[0]))
    for spec in (P("d"), P(None, "d"), P("d", None)):
        xs = jax.device_put(x, NamedSharding(mesh1d(), spec))
        y = drop(key, xs)
        assert len(y.sharding.device_set) == N
        np.testing.assert_array_equal(np.asarray(y), np.asarray(y0))  # bit-for-bit


def test_dropout_masks_independent_across_shards():
    key = jax.random.key(7)
    x = jax.device_put(jnp.ones((N * 32, 16)), NamedSharding(mesh1d(), P("d")))
    y = jax.jit(lambda k, x: dropnorm.dropout(k, x, 0.5, True))(key, x)
    blocks = [np.asarray(s.data) != 0 for s in sorted(y.addressable_shards,
                                                       key=lambda s: s.index[0].start)]
    assert len(blocks) == N
    for i in range(N):
        for j in range(i):
            # Independent blocks of 512 fair coins agree in about half the places, never all.
            agree = np.mean(blocks[i] == blocks[j])
            assert 0.35 < agree < 0.65, (i, j, agree)
    assert 0.45 < np.mean(np.concatenate(blocks)) < 0.55


def test_dropout_in_shard_map_needs_a_per_device_key():
    # Under shard_map each device calls dropout on its own piece: the same key repeats the
    # same mask on every device; folding in the device index makes the blocks independent.
    key = jax.random.key(7)
    x = jnp.ones((N * 32, 16))

    def run(fold):
        def local(x):
            k = jax.random.fold_in(key, lax.axis_index("d")) if fold else key
            return dropnorm.dropout(k, x, 0.5, True)

        y = shard_map(local, mesh=mesh1d(), in_specs=P("d"), out_specs=P("d"))(x)
        return np.asarray(y).reshape(N, 32, 16) != 0

    same, folded = run(False), run(True)
    assert all(np.array_equal(same[0], same[d]) for d in range(N))
    assert not any(np.array_equal(folded[0], folded[d]) for d in range(1, N))


# ----------------------------------------------------------------------------------------------
# The data-parallel example: its train step, sharded, equals the single-device one.


@functools.cache
def example():
    import importlib.util
    import pathlib

    path = pathlib.Path(__file__).resolve().parents[1] / "examples" / "data_parallel.py"
    spec = importlib.util.spec_from_file_location("data_parallel_example", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_data_parallel_train_step_equals_single_device():
    import optax

    ex = example()
    x, y, _, _ = ex.load_digits_split()
    x, y = x[:64], y[:64]  # 8 examples per device
    opt = optax.adam(3e-3)
    params, states = ex.init(jax.random.key(0))
    step = jax.jit(ex.make_train_step(opt))
    mesh = mesh1d("batch")
    data, rep, one = NamedSharding(mesh, P("batch")), NamedSharding(mesh, P()), jax.devices()[0]

    def run(put_data, put_rest):
        p, s = put_rest((params, states))
        o = put_rest(opt.init(params))
        xb, yb = put_data(x), put_data(y)
        for i in range(3):
            p, s, o, loss = step(p, s, o, xb, yb, jax.random.fold_in(jax.random.key(1), i))
        return p, s, loss, xb

    ps, ss, ls, xs = run(lambda a: jax.device_put(a, data), lambda a: jax.device_put(a, rep))
    p1, s1, l1, x1 = run(lambda a: jax.device_put(a, one), lambda a: jax.device_put(a, one))
    assert xs.sharding.shard_shape(xs.shape) == (8, 64) and len(x1.sharding.device_set) == 1
    assert all(leaf.sharding.is_fully_replicated for leaf in jax.tree.leaves(ss))
    close(ls, l1)
    tree_close(ss, s1)
    tree_close(ps, p1)


def test_data_parallel_example_runs_and_learns(capsys):
    out = example().main(steps=60, log_every=0)
    printed = capsys.readouterr().out
    assert out["devices"] == N and out["batch_size"] == 256
    assert "8 devices" in printed and "32 examples per device" in printed
    assert "state replicated on all 8 devices: True" in printed
    assert out["last_loss"] < 0.5 * out["first_loss"]
    # 60 steps reach ~95% on the 450 held-out digits (chance: 10%); 85% leaves margin.
    assert out["accuracy"] > 0.85


# ----------------------------------------------------------------------------------------------
# The Flax shell passes axis_name and virtual_batch_size through to the same core.


@pytest.mark.parametrize("vbs", [None, 4], ids=["plain", "ghost-span-2"])
def test_linen_batch_norm_under_shard_map_equals_single_device(vbs):
    from dropnorm import linen as dnn

    x = setup((16, 3))[2]
    kw = dict(use_running_average=False, momentum=0.9, virtual_batch_size=vbs)
    whole = dnn.BatchNorm(**kw)
    variables = whole.init(jax.random.key(0), x)
    y0, upd0 = whole.apply(variables, x, mutable=["batch_stats"])
    sharded = dnn.BatchNorm(axis_name="d", **kw)
    f = shard_map(lambda v, x: sharded.apply(v, x, mutable=["batch_stats"]), mesh=mesh1d(),
                  in_specs=(P(), P("d")), out_specs=(P("d"), P()))
    y, upd = jax.jit(f)(variables, x)
    close(y, y0)
    tree_close(upd, upd0)
