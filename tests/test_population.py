"""Population statistics after training (PreciseBN): float64 oracles, properties, PyTorch.

The statistics are the exact mean and variance of everything a layer saw over all batches
(the pooled ones), not an average of per-batch variances: the oracle is NumPy float64 over
the concatenation of the layer's inputs. Peer: ``torch.optim.swa_utils.update_bn``, whose
documented semantics (average of per-batch means and unbiased variances) are checked too,
and where they differ from ours, by how much.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import linen as nn
from flax import nnx
from hypothesis import given, settings
from hypothesis import strategies as st
from jax.sharding import Mesh
from jax.sharding import PartitionSpec as P

import dropnorm
from dropnorm import linen as dnn
from dropnorm import nnx as dnx

shard_map = jax.shard_map if hasattr(jax, "shard_map") else None
if shard_map is None:  # pragma: no cover - older JAX
    from jax.experimental.shard_map import shard_map

EPS = 1e-5


def _one_layer(params, state, x):
    return dropnorm.batch_norm(params, state, x, train=True)


def _pooled(batches, ddof=0):
    """float64 mean and variance of the rows of all batches together (the oracle)."""
    rows = np.concatenate([np.asarray(b, np.float64).reshape(-1, np.shape(b)[-1])
                           for b in batches])
    return rows.mean(0), rows.var(0, ddof=ddof)


def _batch_norm64(h, scale, bias):
    """Training-mode batch norm of one batch in float64 (biased batch variance)."""
    return (h - h.mean(0)) / np.sqrt(h.var(0) + EPS) * scale + bias


# --------------------------------------------------------------------------- float64 oracle


def test_pure_is_the_pooled_float64_statistics_at_a_large_mean():
    # Five batches of unequal sizes around 1e4 (std 1, float32), batch means up to 3 apart.
    rng = np.random.default_rng(0)
    sizes, offsets = [7, 64, 33, 128, 5], [0.0, 0.5, -0.3, 1.0, -3.0]
    batches = [(1e4 + o + rng.standard_normal((n, 3))).astype(np.float32)
               for n, o in zip(sizes, offsets, strict=True)]
    params, state = dropnorm.batch_norm_init(3)
    new = dropnorm.recompute_batch_norm(_one_layer, params, state,
                                        [jnp.asarray(b) for b in batches])
    mean, var = _pooled(batches)
    # The mean is a float32 number near 1e4, whose ulp is 2**-10: within one ulp of the exact
    # mean (rounding the result costs half of it). The variance is exact to float32 rounding
    # of sums over 237 values and 5 merges: 2e-6 is ~30 ulps (measured: under 1e-7).
    np.testing.assert_allclose(np.asarray(new.mean, np.float64), mean, rtol=0, atol=2**-10)
    np.testing.assert_allclose(np.asarray(new.var, np.float64), var, rtol=2e-6)
    assert int(new.count) == 5 and new.count.dtype == jnp.int32
    # What this guards against: E[x^2] - E[x]^2 in float32 is off by the order of 1e8 * 6e-8,
    # and an average of per-batch variances (PyTorch's update_bn) misses the spread of the
    # batch means, here more than 20% of the variance.
    x32 = np.concatenate(batches)
    naive = (x32 * x32).mean(0) - x32.mean(0) ** 2
    assert np.all(np.abs(naive - var) > 1.0), naive
    averaged = np.mean([b.astype(np.float64).var(0, ddof=1) for b in batches], 0)
    assert np.all(np.abs(averaged - var) > 0.2 * var), (averaged, var)


def test_unbiased_option_divides_by_n_minus_1():
    batches = [jnp.arange(6.0).reshape(3, 2), jnp.arange(6.0, 14.0).reshape(4, 2)]
    params, state = dropnorm.batch_norm_init(2)
    new = dropnorm.recompute_batch_norm(_one_layer, params, state, batches,
                                        unbiased_running_var=True)
    _, var = _pooled(batches, ddof=1)
    np.testing.assert_allclose(np.asarray(new.var), var, rtol=1e-6)  # float32 rounding
    # batch_renorm gathers the same statistics (its corrections are off while gathering).
    renorm = dropnorm.recompute_batch_norm(
        lambda p, s, x: dropnorm.batch_renorm(p, s, x, True, r_max=1.5, d_max=0.5),
        params, state, batches, unbiased_running_var=True)
    assert jax.tree.all(jax.tree.map(lambda a, b: bool(jnp.all(a == b)), renorm, new))


def test_two_layers_the_second_sees_the_first_normalised_by_each_batch():
    # PreciseBN: while recomputing, every layer normalises by its batch's statistics, so the
    # second layer's population is over relu(bn1_batch(x_b)) @ w, batch by batch.
    rng = np.random.default_rng(1)
    batches = [rng.standard_normal((n, 4)).astype(np.float32) * 2 + o
               for n, o in ((16, 0.0), (9, 1.5), (30, -1.0))]
    w = rng.standard_normal((4, 3)).astype(np.float32)
    p1, s1 = dropnorm.batch_norm_init(4)
    p1 = p1._replace(scale=jnp.asarray(rng.uniform(0.5, 2, 4), jnp.float32),
                     bias=jnp.asarray(rng.standard_normal(4), jnp.float32))
    p2, s2 = dropnorm.batch_norm_init(3)
    params, state = {"bn1": p1, "bn2": p2, "w": jnp.asarray(w)}, {"bn1": s1, "bn2": s2}

    def apply_fn(params, state, x):
        h, a = dropnorm.batch_norm(params["bn1"], state["bn1"], x, train=True, momentum=0.9)
        h = jax.nn.relu(h) @ params["w"]
        h, b = dropnorm.batch_norm(params["bn2"], state["bn2"], h, train=True)
        return h, {"bn1": a, "bn2": b}

    new = dropnorm.recompute_batch_norm(apply_fn, params, state, batches)
    g, b = np.asarray(p1.scale, np.float64), np.asarray(p1.bias, np.float64)
    second = [np.maximum(_batch_norm64(x.astype(np.float64), g, b), 0) @ w for x in batches]
    for name, inputs in (("bn1", batches), ("bn2", second)):
        mean, var = _pooled(inputs)
        # float32 forward and statistics of values of order 1-10: 1e-5 is ~100 ulps.
        np.testing.assert_allclose(np.asarray(new[name].mean), mean, rtol=1e-5, atol=1e-5)
        np.testing.assert_allclose(np.asarray(new[name].var), var, rtol=1e-5)
        assert int(new[name].count) == 3


def test_masks_ghost_batches_stacked_states_and_untouched_leaves():
    # A mask leaves padding out; feature 2 is never valid, so it keeps its old statistics.
    # Ghost batches change the forward, not the population (the whole batch). A state stacked
    # for scan (leading layer axis) and a non-state leaf pass through.
    rng = np.random.default_rng(2)
    xs = [rng.standard_normal((8, 3)).astype(np.float32) + 5 for _ in range(3)]
    masks = [np.stack([rng.random(8) < 0.6, rng.random(8) < 0.9, np.zeros(8, bool)], -1)
             for _ in range(3)]
    params, one = dropnorm.batch_norm_init(3)
    one = one._replace(mean=jnp.full(3, 7.0), var=jnp.full(3, 3.0))
    stacked = jax.tree.map(lambda a: jnp.stack([a, a]), one)

    def apply_fn(params, state, batch):
        x, m = batch

        def layer(s, x):
            y, s = dropnorm.batch_norm(params, s, x, True, mask=m, virtual_batch_size=4)
            return y, s

        _, new = jax.lax.scan(lambda x, s: layer(s, x), x, state["layers"])
        return None, {"layers": new, "step": state["step"]}

    state = {"layers": stacked, "step": jnp.asarray(41)}
    batches = [(jnp.asarray(x), jnp.asarray(m)) for x, m in zip(xs, masks, strict=True)]
    new = dropnorm.recompute_batch_norm(apply_fn, params, state, batches)
    assert int(new["step"]) == 41 and new["layers"].count.tolist() == [3, 3]
    x_all, m_all = np.concatenate(xs).astype(np.float64), np.concatenate(masks)
    for f in range(2):
        v = x_all[m_all[:, f], f]
        # Layer 0 sees x; layer 1 sees layer 0's output (as scanned).
        np.testing.assert_allclose(float(new["layers"].mean[0, f]), v.mean(), rtol=1e-6)
        np.testing.assert_allclose(float(new["layers"].var[0, f]), v.var(), rtol=1e-5)
    assert new["layers"].mean[:, 2].tolist() == [7.0, 7.0]
    assert new["layers"].var[:, 2].tolist() == [3.0, 3.0]


def test_across_devices_the_population_is_the_global_batch():
    mesh = Mesh(np.array(jax.devices()[:4]), ("d",))
    params, state = dropnorm.batch_norm_init(2)
    stats = dropnorm.population_stats_init(state)

    def local(stats, x):
        return dropnorm.batch_norm(params, stats, x, True, axis_name="d")[1]

    step = jax.jit(shard_map(local, mesh=mesh, in_specs=(P(), P("d")), out_specs=P()))
    rng = np.random.default_rng(3)
    # Each device's quarter sits at its own mean: a device-local statistic would be wrong.
    batches = [(rng.standard_normal((16, 2)) + np.repeat([0, 10, 20, 30], 4)[:, None])
               .astype(np.float32) for _ in range(2)]
    for x in batches:
        stats = step(stats, jnp.asarray(x))
    new = dropnorm.population_stats_finalize(stats, state)
    mean, var = _pooled(batches)
    np.testing.assert_allclose(np.asarray(new.mean), mean, rtol=1e-6)  # float32 rounding
    np.testing.assert_allclose(np.asarray(new.var), var, rtol=1e-5)


def test_complex_input_gives_a_complex_mean_and_the_real_variance():
    rng = np.random.default_rng(4)
    batches = [(rng.standard_normal((n, 2)) + 1j * rng.standard_normal((n, 2)) + (3 - 2j))
               .astype(np.complex64) for n in (5, 11)]
    params, state = dropnorm.batch_norm_init(2)
    new = dropnorm.recompute_batch_norm(_one_layer, params, state,
                                        [jnp.asarray(b) for b in batches])
    rows = np.concatenate(batches).astype(np.complex128)
    assert new.mean.dtype == jnp.complex64 and new.var.dtype == jnp.float32
    np.testing.assert_allclose(np.asarray(new.mean), rows.mean(0), rtol=1e-6)  # float32
    np.testing.assert_allclose(np.asarray(new.var), (np.abs(rows - rows.mean(0)) ** 2).mean(0),
                               rtol=1e-5)


# --------------------------------------------------------------------------- properties


@settings(max_examples=8, deadline=None)
@given(n=st.integers(4, 40), cuts=st.lists(st.floats(0, 1), max_size=3),
       seed=st.integers(0, 2**16), loc=st.floats(-100, 100), order=st.randoms())
def test_any_split_and_order_of_the_same_data_gives_the_same_statistics(n, cuts, seed, loc,
                                                                        order):
    # The first layer's statistics depend on the data, not on how it is cut into batches
    # (of at least 2 rows) nor on their order. Tolerance: float32 rounding of values up to
    # ~100 with a spread of 1: the mean to 1e-5 absolute (a few ulps of 100), the variance
    # to 1e-4 relative (the shift is the first batch's mean, up to a few units from the
    # others'; that costs a few ulps of the deviations, ~1e-5 each, in the variance).
    x = (loc + np.random.default_rng(seed).standard_normal((n, 2))).astype(np.float32)
    points = sorted({int(c * n) for c in cuts} | {0, n})
    pieces = [x[a:b] for a, b in zip(points, points[1:], strict=False) if b - a >= 2]
    pieces = pieces or [x]
    order.shuffle(pieces)
    params, state = dropnorm.batch_norm_init(2)
    split = dropnorm.recompute_batch_norm(_one_layer, params, state,
                                          [jnp.asarray(p) for p in pieces])
    mean, var = _pooled(pieces)
    np.testing.assert_allclose(np.asarray(split.mean, np.float64), mean, rtol=0, atol=1e-5)
    np.testing.assert_allclose(np.asarray(split.var, np.float64), var, rtol=1e-4, atol=1e-6)
    assert int(split.count) == len(pieces)


# --------------------------------------------------------------------------- PyTorch


def test_torch_update_bn_semantics_and_where_ours_differ():
    torch = pytest.importorskip("torch")
    from torch.optim.swa_utils import update_bn

    from dropnorm import interop

    torch.manual_seed(0)
    net = torch.nn.Sequential(torch.nn.Linear(5, 4), torch.nn.BatchNorm1d(4), torch.nn.ReLU(),
                              torch.nn.Linear(4, 3), torch.nn.BatchNorm1d(3))
    rng = np.random.default_rng(5)
    # Six batches of 16 at different means, and a short last one.
    batches = [(rng.standard_normal((16, 5)) + o).astype(np.float32)
               for o in (-2.0, -1.0, 0.0, 1.0, 2.0, 3.0)] + [
        (rng.standard_normal((4, 5)) + 6).astype(np.float32)]
    seen = {1: [], 4: []}  # the inputs torch's BatchNorm layers saw, per batch
    hooks = [net[i].register_forward_pre_hook(
        lambda m, args, i=i: seen[i].append(args[0].detach().double().numpy()))
        for i in seen]
    update_bn([torch.from_numpy(b) for b in batches], net)
    for h in hooks:
        h.remove()

    params = {"w1": jnp.asarray(net[0].weight.detach().numpy().T),
              "b1": jnp.asarray(net[0].bias.detach().numpy()),
              "w2": jnp.asarray(net[3].weight.detach().numpy().T),
              "b2": jnp.asarray(net[3].bias.detach().numpy())}
    (params["bn1"], s1), (params["bn2"], s2) = (interop.batch_norm_from_torch(net[i])
                                                for i in (1, 4))

    def apply_fn(p, s, x):
        h, a = dropnorm.batch_norm(p["bn1"], s["bn1"], x @ p["w1"] + p["b1"], True)
        h = jax.nn.relu(h) @ p["w2"] + p["b2"]
        h, b = dropnorm.batch_norm(p["bn2"], s["bn2"], h, True)
        return h, {"bn1": a, "bn2": b}

    ours = dropnorm.recompute_batch_norm(apply_fn, params, {"bn1": s1, "bn2": s2},
                                         [jnp.asarray(b) for b in batches],
                                         unbiased_running_var=True)
    for i, name in ((1, "bn1"), (4, "bn2")):
        inputs = seen[i]
        # torch: the plain average of each batch's mean and unbiased variance (float32
        # forward of values of order 1-10: 2e-5 is ~100 ulps).
        torch_mean = np.mean([h.mean(0) for h in inputs], 0)
        torch_var = np.mean([h.var(0, ddof=1) for h in inputs], 0)
        np.testing.assert_allclose(net[i].running_mean.numpy(), torch_mean, rtol=2e-5,
                                   atol=2e-5)
        np.testing.assert_allclose(net[i].running_var.numpy(), torch_var, rtol=2e-5)
        assert int(net[i].num_batches_tracked) == int(ours[name].count) == len(batches)
        # Ours: the pooled statistics of the same inputs (so the two forwards agree too).
        mean, var = _pooled(inputs, ddof=1)
        np.testing.assert_allclose(np.asarray(ours[name].mean), mean, rtol=2e-5, atol=2e-5)
        np.testing.assert_allclose(np.asarray(ours[name].var), var, rtol=2e-5)
    # Where they differ, by exactly what the two definitions give: torch's mean weighs the
    # short last batch like a full one, and torch's variance lacks the spread of the batch
    # means (the between-batch part of the pooled variance).
    first = seen[1]
    pooled_mean, pooled_var = _pooled(first, ddof=1)
    mean_gap = np.mean([h.mean(0) for h in first], 0) - pooled_mean
    var_gap = pooled_var - np.mean([h.var(0, ddof=1) for h in first], 0)
    assert np.max(np.abs(mean_gap)) > 0.3 and np.max(var_gap) > 1.0, (mean_gap, var_gap)
    np.testing.assert_allclose(net[1].running_mean.numpy() - np.asarray(ours["bn1"].mean),
                               mean_gap, rtol=1e-4, atol=1e-4)
    np.testing.assert_allclose(np.asarray(ours["bn1"].var) - net[1].running_var.numpy(),
                               var_gap, rtol=1e-4, atol=1e-4)


def test_torch_update_bn_agrees_on_equal_batches_at_one_mean():
    # With equal-sized batches of one distribution, both estimate the same thing: the means
    # are equal exactly (as averages of equal-weight batch means), the variances within the
    # sampling noise of the batch means (here a few percent).
    torch = pytest.importorskip("torch")
    from torch.optim.swa_utils import update_bn

    from dropnorm import interop

    bn = torch.nn.BatchNorm1d(3)
    rng = np.random.default_rng(6)
    batches = [rng.standard_normal((64, 3)).astype(np.float32) for _ in range(8)]
    update_bn([torch.from_numpy(b) for b in batches], bn)
    params, state = interop.batch_norm_from_torch(bn)
    ours = dropnorm.recompute_batch_norm(_one_layer, params, state,
                                         [jnp.asarray(b) for b in batches],
                                         unbiased_running_var=True)
    np.testing.assert_allclose(np.asarray(ours.mean), bn.running_mean.numpy(), atol=1e-6)
    np.testing.assert_allclose(np.asarray(ours.var), bn.running_var.numpy(), rtol=0.05)


# --------------------------------------------------------------------------- Flax linen


class _Linen(nn.Module):
    """Dense -> Flax's BatchNorm -> relu -> dropout -> Dense -> dropnorm's (with a count)."""

    @nn.compact
    def __call__(self, x, train: bool):
        h = nn.BatchNorm(use_running_average=not train, momentum=0.9)(nn.Dense(4)(x))
        h = nn.Dropout(0.5, deterministic=not train)(nn.relu(h))
        h = dnn.BatchNorm(use_running_average=not train, momentum=None)(nn.Dense(3)(h))
        return dnn.Dropout(0.5, deterministic=not train)(h)


def _two_layer_oracle(batches, w1, b1, g1, be1, w2, b2):
    f = [np.asarray(a, np.float64) for a in (w1, b1, g1, be1, w2, b2)]
    first = [x.astype(np.float64) @ f[0] + f[1] for x in batches]
    second = [np.maximum(_batch_norm64(h, f[2], f[3]), 0) @ f[4] + f[5] for h in first]
    return _pooled(first), _pooled(second)


def _data(seed=7):
    rng = np.random.default_rng(seed)
    # Equal sizes: one compilation (unequal ones are the pure tests' business).
    return [(rng.standard_normal((12, 5)) * 3 + o).astype(np.float32) for o in (0.0, 2.0, -1.0)]


def test_linen_variables_in_variables_out_for_flax_and_dropnorm_layers():
    batches = _data()
    model = _Linen()
    variables = model.init(jax.random.key(0), batches[0], train=False)
    variables["params"]["BatchNorm_0"]["scale"] = jnp.asarray([0.5, 1.0, 2.0, 1.5])
    variables["params"]["BatchNorm_0"]["bias"] = jnp.asarray([0.1, -0.2, 0.3, 0.0])
    evaluation = dnn.recompute_batch_norm(model, variables, batches, train=False)
    # train=True: the BatchNorm layers are forced to batch statistics either way, and dropout
    # is off (no 'dropout' RNG is needed): the same statistics.
    training = dnn.recompute_batch_norm(model, variables, batches, train=True)
    p = variables["params"]
    (m1, v1), (m2, v2) = _two_layer_oracle(
        batches, p["Dense_0"]["kernel"], p["Dense_0"]["bias"], p["BatchNorm_0"]["scale"],
        p["BatchNorm_0"]["bias"], p["Dense_1"]["kernel"], p["Dense_1"]["bias"])
    for new in (evaluation, training):
        stats = new["batch_stats"]
        assert set(stats) == {"BatchNorm_0", "BatchNorm_1"}
        assert set(stats["BatchNorm_0"]) == {"mean", "var"}  # Flax's layer keeps no count
        assert int(stats["BatchNorm_1"]["count"]) == 3
        # float32 forward and statistics, values of order 1-10: 1e-5 is ~100 ulps.
        for got, want in ((stats["BatchNorm_0"]["mean"], m1), (stats["BatchNorm_0"]["var"], v1),
                          (stats["BatchNorm_1"]["mean"], m2), (stats["BatchNorm_1"]["var"], v2)):
            np.testing.assert_allclose(np.asarray(got), want, rtol=1e-5, atol=1e-5)
        assert all(a is b for a, b in zip(jax.tree.leaves(new["params"]),
                                          jax.tree.leaves(variables["params"]), strict=True))
    np.testing.assert_array_equal(np.asarray(variables["batch_stats"]["BatchNorm_0"]["var"]),
                                  np.ones(4))  # the input is not modified


def test_linen_method_and_layers_inside_nn_scan():
    # A function as `method`, and BatchNorm layers lifted by nn.scan (batch_stats stacked):
    # the accumulators travel in batch_stats, so they are stacked too.
    class Block(nn.Module):
        @nn.compact
        def __call__(self, h, _):
            return nn.relu(dnn.BatchNorm(use_running_average=True)(nn.Dense(3)(h))), None

    class Deep(nn.Module):
        @nn.compact
        def __call__(self, x):
            scan = nn.scan(Block, variable_axes={"params": 0, "batch_stats": 0},
                           split_rngs={"params": True}, length=2)
            return scan()(x, None)[0]

    batches = [b[:, :3] for b in _data(8)]
    model = Deep()
    variables = model.init(jax.random.key(1), batches[0])
    new = dnn.recompute_batch_norm(model, variables, batches,
                                   method=lambda module, batch: module(batch))
    stats = new["batch_stats"]["ScanBlock_0"]["BatchNorm_0"]
    assert stats["mean"].shape == (2, 3)
    p = variables["params"]["ScanBlock_0"]["Dense_0"]
    first = [x.astype(np.float64) @ np.asarray(p["kernel"][0]) + np.asarray(p["bias"][0])
             for x in batches]
    mean, var = _pooled(first)
    np.testing.assert_allclose(np.asarray(stats["mean"][0]), mean, rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(np.asarray(stats["var"][0]), var, rtol=1e-5)
    assert not np.allclose(np.asarray(stats["var"][1]), 1.0)  # the second layer was reached


# --------------------------------------------------------------------------- Flax NNX


class _Nnx(nnx.Module):
    def __init__(self, rngs):
        self.dense1, self.dense2 = nnx.Linear(5, 4, rngs=rngs), nnx.Linear(4, 3, rngs=rngs)
        self.bn1 = nnx.BatchNorm(4, momentum=0.9, rngs=rngs)  # Flax's
        self.bn2 = dnx.BatchNorm(3, momentum=None, rngs=rngs)  # dropnorm's, with a count
        self.drop = nnx.Dropout(0.5, rngs=rngs)

    def __call__(self, x):
        h = self.drop(nnx.relu(self.bn1(self.dense1(x))), deterministic=False)
        return self.bn2(self.dense2(h))


def test_nnx_in_place_for_flax_and_dropnorm_layers():
    batches = _data(9)
    model = _Nnx(nnx.Rngs(0))
    model.bn1.scale[...] = jnp.asarray([0.5, 1.0, 2.0, 1.5])
    model.bn1.bias[...] = jnp.asarray([0.1, -0.2, 0.3, 0.0])
    model.eval()
    rng_count = int(model.drop.rngs.count[...])
    kernel = np.asarray(model.dense1.kernel[...])
    assert dnx.recompute_batch_norm(model, batches) is None
    (m1, v1), (m2, v2) = _two_layer_oracle(
        batches, model.dense1.kernel[...], model.dense1.bias[...], model.bn1.scale[...],
        model.bn1.bias[...], model.dense2.kernel[...], model.dense2.bias[...])
    # float32 forward and statistics, values of order 1-10: 1e-5 is ~100 ulps. The forward
    # calls dropout with deterministic=False: it is off while recomputing even so.
    for got, want in ((model.bn1.mean, m1), (model.bn1.var, v1), (model.bn2.mean, m2),
                      (model.bn2.var, v2)):
        np.testing.assert_allclose(np.asarray(got[...]), want, rtol=1e-5, atol=1e-5)
    assert int(model.bn2.count[...]) == 3
    # Nothing else changed: flags, the dropout stream, the weights, the classes.
    assert model.bn1.use_running_average and model.drop.deterministic
    assert int(model.drop.rngs.count[...]) == rng_count
    np.testing.assert_array_equal(np.asarray(model.dense1.kernel[...]), kernel)
    assert type(model.bn1) is nnx.BatchNorm and type(model.bn2) is dnx.BatchNorm


def test_nnx_shared_layer_gathers_every_call_and_call_argument():
    class Shared(nnx.Module):
        def __init__(self, rngs):
            self.bn = dnx.BatchNorm(2, rngs=rngs)
            self.layers = nnx.List([self.bn])  # the same layer at a second path

        def __call__(self, x, y):
            return self.bn(x) + self.layers[0](y)

    model = Shared(nnx.Rngs(0))
    rng = np.random.default_rng(10)
    batches = [(rng.standard_normal((6, 2)).astype(np.float32),
                rng.standard_normal((6, 2)).astype(np.float32) + 4) for _ in range(2)]
    dnx.recompute_batch_norm(model, batches, call=lambda m, b: m(*b))
    mean, var = _pooled([a for pair in batches for a in pair])
    np.testing.assert_allclose(np.asarray(model.bn.mean[...]), mean, rtol=1e-6, atol=1e-6)
    np.testing.assert_allclose(np.asarray(model.bn.var[...]), var, rtol=1e-5)


# --------------------------------------------------------------------------- errors


def test_errors_of_the_pure_api():
    params, state = dropnorm.batch_norm_init(2)
    x = jnp.ones((4, 2))
    for empty in ([], iter([jnp.ones((4, 2))] * 0), (b for b in ())):
        with pytest.raises(ValueError, match=r"`batches` is empty"):
            dropnorm.recompute_batch_norm(_one_layer, params, state, empty)
    with pytest.raises(TypeError, match=r"`batches` must be an iterable.*shape \(4, 2\).*\[x\]"):
        dropnorm.recompute_batch_norm(_one_layer, params, state, x)
    with pytest.raises(ValueError, match=r"`state` holds no BatchNormState \(got dict\)"):
        dropnorm.recompute_batch_norm(_one_layer, params, {"w": x}, [x])
    with pytest.raises(ValueError, match=r"state\['unused'\] saw no batch"):
        dropnorm.recompute_batch_norm(
            lambda p, s, x: (None, {"used": _one_layer(p, s["used"], x)[1], "unused": s["unused"]}),
            params, {"used": state, "unused": state}, [x])
    with pytest.raises(ValueError, match=r"PopulationStats.*`train`=False.*train=True"):
        dropnorm.recompute_batch_norm(lambda p, s, x: dropnorm.batch_norm(p, s, x, False),
                                      params, state, [x])
    with pytest.raises(ValueError, match=r"structure differs"):
        dropnorm.recompute_batch_norm(lambda p, s, x: (x, state), params, state, [x])
    with pytest.raises(TypeError, match=r"return \(output, new_state\)"):
        dropnorm.recompute_batch_norm(lambda p, s, x: x, params, state, [x])
    with pytest.raises(ValueError, match=r"`dtype`=float64 needs 64-bit JAX"):
        dropnorm.population_stats_init(state, dtype=jnp.float64)
    with pytest.raises(ValueError, match=r"`state\.shift` has shape \(3,\)"):
        dropnorm.batch_norm(params, dropnorm.population_stats_init(
            dropnorm.batch_norm_init(3)[1]), x, True)
    with pytest.raises(ValueError, match=r"`stats` does not match `state`"):
        dropnorm.population_stats_finalize({"a": dropnorm.population_stats_init(state)},
                                           {"b": state})


def test_errors_of_the_flax_drivers():
    x = jnp.ones((4, 5))
    no_bn = nn.Dense(3)
    with pytest.raises(ValueError, match=r"`model` \(Dense\) called no BatchNorm layer"):
        dnn.recompute_batch_norm(no_bn, no_bn.init(jax.random.key(0), x), [x])
    model = _Linen()
    variables = model.init(jax.random.key(0), x, train=False)
    with pytest.raises(ValueError, match=r"`batches` is empty"):
        dnn.recompute_batch_norm(model, variables, [], train=False)
    with pytest.raises(TypeError, match=r"`model` must be a flax.linen Module"):
        dnn.recompute_batch_norm(_Nnx(nnx.Rngs(0)), variables, [x])
    with pytest.raises(ValueError, match=r"`model` \(Linear\) has no BatchNorm layer"):
        dnx.recompute_batch_norm(nnx.Linear(5, 3, rngs=nnx.Rngs(0)), [x])
    with pytest.raises(ValueError, match=r"`batches` is empty"):
        dnx.recompute_batch_norm(_Nnx(nnx.Rngs(0)), [])
    unused = _Nnx(nnx.Rngs(0))
    with pytest.raises(ValueError, match=r"layers bn2 of `model` were not called"):
        dnx.recompute_batch_norm(unused, [x], call=lambda m, b: m.bn1(m.dense1(b)))
    assert np.all(np.asarray(unused.bn1.var[...]) == 1.0)  # nothing written on error

    class Lifted(nnx.Module):  # a layer called inside an NNX transform cannot be followed
        def __init__(self):
            self.bn = dnx.BatchNorm(5, rngs=nnx.Rngs(0))

        def __call__(self, x):
            return nnx.remat(lambda bn, x: bn(x))(self.bn, x)

    with pytest.raises(NotImplementedError, match=r"inside an NNX transform"):
        dnx.recompute_batch_norm(Lifted(), [x])
