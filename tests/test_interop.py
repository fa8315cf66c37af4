"""Parity with PyTorch's BatchNorm*d and flax.linen.BatchNorm, and the converters' round trips.

Everything here runs against the real libraries (CPU torch 2.13.0, flax 0.12).

Tolerances: PyTorch and dropnorm both compute the statistics in float32 but in
different orders (PyTorch's CPU kernel accumulates per channel, dropnorm uses a
two-pass mean/variance through XLA), so outputs agree to a few float32 ulps of
values of order 1-10: ``rtol=1e-5, atol=1e-5`` (float32 eps is 1.2e-7; this is
~100 ulps of headroom, far below any convention error such as biased vs unbiased
variance, which changes values by ~1/n = 1e-2 here). Gradients pass through the
batch-norm backward formula, which subtracts two means of similar size, so they
get ``rtol=1e-4, atol=1e-5``. Round trips through the converters are exact.
"""

from __future__ import annotations

import sys

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch

import dropnorm
from dropnorm.interop import (
    batch_norm_from_flax,
    batch_norm_from_torch,
    batch_norm_kwargs_from_torch,
    batch_norm_to_flax,
    batch_norm_to_torch,
)

RTOL, ATOL = 1e-5, 1e-5  # float32 outputs, different summation orders (see module docstring)
GRAD_RTOL, GRAD_ATOL = 1e-4, 1e-5  # the backward formula cancels two means of similar size

CASES = [  # (module class, input shape (N, C, ...))
    (torch.nn.BatchNorm1d, (16, 3)),
    (torch.nn.BatchNorm1d, (8, 3, 5)),
    (torch.nn.BatchNorm2d, (4, 3, 5, 6)),
    (torch.nn.BatchNorm3d, (2, 3, 4, 3, 5)),
]


def _randomise(module, seed=0):
    """Give a torch batch norm non-trivial weights and running statistics."""
    g = torch.Generator().manual_seed(seed)
    c = module.num_features
    with torch.no_grad():
        if module.affine:
            module.weight.copy_(torch.rand(c, generator=g) + 0.5)
            module.bias.copy_(torch.randn(c, generator=g))
        module.running_mean.copy_(torch.randn(c, generator=g))
        module.running_var.copy_(torch.rand(c, generator=g) + 0.5)
        module.num_batches_tracked.fill_(11)
    return module


def _data(shape, seed):
    # Offset and scale per call so that batch statistics are far from the running ones.
    rng = np.random.default_rng(seed)
    return (rng.standard_normal(shape) * 3.0 + 2.0).astype(np.float32)


def _t(a):
    return torch.from_numpy(np.array(a))


@pytest.mark.parametrize("cls,shape", CASES)
@pytest.mark.parametrize("affine", [True, False])
def test_eval_outputs_equal_torch_nchw_axis1(cls, shape, affine):
    module = _randomise(cls(shape[1], affine=affine, eps=1e-3)).eval()
    x = _data(shape, 1)
    expected = module(_t(x)).detach().numpy()
    params, state = batch_norm_from_torch(module)
    kw = batch_norm_kwargs_from_torch(module)
    assert kw["axis"] == 1 and kw["epsilon"] == pytest.approx(1e-3)
    y, new_state = dropnorm.batch_norm(params, state, jnp.asarray(x), train=False, **kw)
    np.testing.assert_allclose(np.asarray(y), expected, rtol=RTOL, atol=ATOL)
    assert new_state is state
    # Sanity: the wrong (channels-last) axis is not an accident that also matches.
    assert not np.allclose(np.asarray(y), x)


@pytest.mark.parametrize("cls,shape", CASES)
def test_five_training_steps_match_torch(cls, shape):
    """Torch momentum 0.1 == dropnorm momentum 0.9 with the unbiased running variance."""
    module = _randomise(cls(shape[1], momentum=0.1)).train()
    params, state = batch_norm_from_torch(module)
    assert int(state.count) == 11
    for step in range(5):
        x = _data(shape, 10 + step)
        expected = module(_t(x)).detach().numpy()
        y, state = dropnorm.batch_norm(params, state, jnp.asarray(x), train=True, axis=1,
                                       momentum=0.9, unbiased_running_var=True)
        np.testing.assert_allclose(np.asarray(y), expected, rtol=RTOL, atol=ATOL)
        np.testing.assert_allclose(np.asarray(state.mean), module.running_mean.numpy(),
                                   rtol=RTOL, atol=ATOL)
        np.testing.assert_allclose(np.asarray(state.var), module.running_var.numpy(),
                                   rtol=RTOL, atol=ATOL)
        assert int(state.count) == int(module.num_batches_tracked) == 12 + step


def test_biased_running_var_differs_from_torch():
    """The flag matters: without it the running variance is off by the factor n/(n-1)."""
    module = torch.nn.BatchNorm1d(3).train()
    params, state = batch_norm_from_torch(module)
    x = _data((4, 3), 0)
    module(_t(x))
    _, state = dropnorm.batch_norm(params, state, jnp.asarray(x), True, axis=1, momentum=0.9)
    assert not np.allclose(np.asarray(state.var), module.running_var.numpy(), rtol=1e-3)


@pytest.mark.parametrize("cls,shape", CASES[1:3])
def test_momentum_none_cumulative_average_matches_torch(cls, shape):
    module = cls(shape[1], momentum=None).train()  # fresh: num_batches_tracked = 0
    params, state = batch_norm_from_torch(module)
    kw = batch_norm_kwargs_from_torch(module)
    assert kw["momentum"] is None
    batches = [_data(shape, 20 + step) for step in range(4)]
    for x in batches:
        expected = module(_t(x)).detach().numpy()
        y, state = dropnorm.batch_norm(params, state, jnp.asarray(x), True, **kw)
        np.testing.assert_allclose(np.asarray(y), expected, rtol=RTOL, atol=ATOL)
        np.testing.assert_allclose(np.asarray(state.mean), module.running_mean.numpy(),
                                   rtol=RTOL, atol=ATOL)
        np.testing.assert_allclose(np.asarray(state.var), module.running_var.numpy(),
                                   rtol=RTOL, atol=ATOL)
        assert int(state.count) == int(module.num_batches_tracked)
    # And it is the plain average of the batch means (float64 oracle).
    axes = tuple(a for a in range(len(shape)) if a != 1)
    oracle = np.mean([b.astype(np.float64).mean(axes) for b in batches], 0)
    np.testing.assert_allclose(np.asarray(state.mean), oracle, rtol=RTOL, atol=ATOL)


def test_gradients_match_torch_one_training_step():
    shape = (6, 3, 4, 5)
    module = _randomise(torch.nn.BatchNorm2d(3)).train()
    params, state = batch_norm_from_torch(module)
    x = _data(shape, 30)
    cot = np.random.default_rng(31).standard_normal(shape).astype(np.float32)

    xt = _t(x).requires_grad_(True)
    (module(xt) * _t(cot)).sum().backward()

    def loss(params, x):
        y, _ = dropnorm.batch_norm(params, state, x, True, axis=1, momentum=0.9,
                                   unbiased_running_var=True)
        return jnp.sum(y * cot)

    gp, gx = jax.grad(loss, argnums=(0, 1))(params, jnp.asarray(x))
    np.testing.assert_allclose(np.asarray(gx), xt.grad.numpy(), rtol=GRAD_RTOL, atol=GRAD_ATOL)
    np.testing.assert_allclose(np.asarray(gp.scale), module.weight.grad.numpy(),
                               rtol=GRAD_RTOL, atol=GRAD_ATOL)
    np.testing.assert_allclose(np.asarray(gp.bias), module.bias.grad.numpy(),
                               rtol=GRAD_RTOL, atol=GRAD_ATOL)
    assert np.abs(xt.grad.numpy()).max() > 1e-2  # a non-trivial gradient was compared


@pytest.mark.parametrize("affine", [True, False])
def test_round_trip_torch_dropnorm_torch(affine):
    module = _randomise(torch.nn.BatchNorm2d(4, affine=affine), seed=3)
    params, state = batch_norm_from_torch(module.state_dict())
    assert (params.scale is None) == (not affine)
    sd = batch_norm_to_torch(params, state)
    assert all(isinstance(v, np.ndarray) for v in sd.values())
    fresh = torch.nn.BatchNorm2d(4, affine=affine)
    fresh.load_state_dict({k: torch.from_numpy(v) for k, v in sd.items()})  # strict
    fresh2 = torch.nn.BatchNorm2d(4, affine=affine)
    fresh2.load_state_dict(batch_norm_to_torch(params, state, as_tensors=True))
    for m in (fresh, fresh2):
        for k, v in module.state_dict().items():
            assert torch.equal(m.state_dict()[k], v), k


def test_round_trip_dropnorm_torch_dropnorm():
    rng = np.random.default_rng(4)
    params = dropnorm.BatchNormParams(jnp.asarray(rng.random(5), jnp.float32),
                                      jnp.asarray(rng.standard_normal(5), jnp.float32))
    state = dropnorm.BatchNormState(jnp.asarray(rng.standard_normal(5), jnp.float32),
                                    jnp.asarray(rng.random(5) + 0.1, jnp.float32),
                                    jnp.asarray(42, jnp.int32))
    module = torch.nn.BatchNorm1d(5)
    module.load_state_dict(batch_norm_to_torch(params, state, as_tensors=True))
    assert int(module.num_batches_tracked) == 42
    p2, s2 = batch_norm_from_torch(module)
    for a, b in zip(jax.tree.leaves((params, state)), jax.tree.leaves((p2, s2)), strict=True):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
        assert a.dtype == b.dtype


def test_one_sided_affine_is_written_as_identity():
    """use_scale=False (scale None) becomes weight = 1, which computes the same function."""
    params, state = dropnorm.batch_norm_init(3, use_scale=False)
    params = params._replace(bias=jnp.array([1.0, -2.0, 0.5]))
    module = torch.nn.BatchNorm1d(3).eval()
    module.load_state_dict(batch_norm_to_torch(params, state, as_tensors=True))
    x = _data((7, 3), 5)
    y, _ = dropnorm.batch_norm(params, state, jnp.asarray(x), False, axis=1)
    np.testing.assert_allclose(np.asarray(y), module(_t(x)).detach().numpy(), rtol=RTOL,
                               atol=ATOL)


def test_whole_model_state_dict_with_prefix():
    model = torch.nn.Sequential(torch.nn.Conv2d(2, 3, 3), torch.nn.BatchNorm2d(3))
    _randomise(model[1], seed=6)
    params, state = batch_norm_from_torch(model.state_dict(), prefix="1.")
    np.testing.assert_array_equal(np.asarray(state.mean), model[1].running_mean.numpy())
    np.testing.assert_array_equal(np.asarray(params.scale), model[1].weight.detach().numpy())
    with pytest.raises(ValueError, match=r"prefix='<name of the batch norm>\.'"):
        batch_norm_from_torch(model.state_dict())


def test_low_precision_module_converts_to_float32():
    module = _randomise(torch.nn.BatchNorm1d(4), seed=12).to(torch.bfloat16)
    params, state = batch_norm_from_torch(module)
    assert params.scale.dtype == state.var.dtype == jnp.float32
    np.testing.assert_array_equal(np.asarray(state.var), module.running_var.float().numpy())
    np.testing.assert_array_equal(np.asarray(params.bias), module.bias.detach().float().numpy())


def test_old_checkpoint_without_num_batches_tracked_gets_count_zero():
    sd = dict(torch.nn.BatchNorm1d(2).state_dict())
    del sd["num_batches_tracked"]
    _, state = batch_norm_from_torch(sd)
    assert int(state.count) == 0 and state.count.dtype == jnp.int32


def test_track_running_stats_false_is_a_clear_error():
    module = torch.nn.BatchNorm2d(3, track_running_stats=False)
    with pytest.raises(ValueError, match="track_running_stats=False.*batch_norm_init\\(3\\)"):
        batch_norm_from_torch(module)
    with pytest.raises(ValueError, match="no running_mean/running_var"):
        batch_norm_from_torch(module.state_dict())
    # A module whose flag was switched off after construction still has buffers, but it
    # normalises by batch statistics in eval(): converting it would silently differ.
    module = torch.nn.BatchNorm2d(3)
    module.track_running_stats = False
    with pytest.raises(ValueError, match="track_running_stats=False"):
        batch_norm_from_torch(module)


def test_bad_inputs_are_clear_errors():
    with pytest.raises(TypeError, match="BatchNorm1d/2d/3d"):
        batch_norm_from_torch(torch.nn.LayerNorm(3))
    with pytest.raises(TypeError, match="BatchNorm1d/2d/3d"):
        batch_norm_kwargs_from_torch(torch.nn.Linear(2, 2))
    # InstanceNorm shares PyTorch's _NormBase but normalises per example: not a batch norm.
    with pytest.raises(TypeError, match="BatchNorm1d/2d/3d"):
        batch_norm_from_torch(torch.nn.InstanceNorm2d(3, affine=True, track_running_stats=True))
    sd = dict(torch.nn.BatchNorm1d(2).state_dict())
    del sd["bias"]
    with pytest.raises(ValueError, match="only one of weight and bias"):
        batch_norm_from_torch(sd)
    params, state = dropnorm.batch_norm_init((2, 3))
    with pytest.raises(ValueError, match=r"one channel axis.*\(6,\)"):
        batch_norm_to_torch(params, state)
    with pytest.raises(TypeError, match="BatchNormState"):
        batch_norm_to_torch(params, {"mean": 0})
    with pytest.raises(ValueError, match="batch_stats"):
        batch_norm_from_flax({"params": {"scale": jnp.ones(2)}})


def test_missing_torch_names_the_pinned_install(monkeypatch):
    monkeypatch.setitem(sys.modules, "torch", None)  # `import torch` now raises ImportError
    params, state = dropnorm.batch_norm_init(2)
    with pytest.raises(ImportError, match=r"pip install torch==2\.13\.0"):
        batch_norm_to_torch(params, state, as_tensors=True)
    # The NumPy path never needs torch.
    assert batch_norm_to_torch(params, state)["running_mean"].shape == (2,)


# --- Flax linen -------------------------------------------------------------------------------


def _flax_variables(features, seed, use_scale=True, use_bias=True):
    bn = nn.BatchNorm(use_running_average=True, use_scale=use_scale, use_bias=use_bias)
    variables = bn.init(jax.random.key(0), jnp.zeros((1, features)))
    rng = np.random.default_rng(seed)
    randomise = lambda a: jnp.asarray(rng.random(a.shape) + 0.5, a.dtype)  # noqa: E731
    return bn, jax.tree.map(randomise, variables)


@pytest.mark.parametrize("use_scale,use_bias", [(True, True), (False, True), (False, False)])
def test_round_trip_flax_dropnorm_flax(use_scale, use_bias):
    bn, variables = _flax_variables(4, 7, use_scale, use_bias)
    params, state = batch_norm_from_flax(variables)
    assert (params.scale is None) == (not use_scale)
    assert (params.bias is None) == (not use_bias)
    assert int(state.count) == 0  # Flax keeps no count
    back = batch_norm_to_flax(params, state)
    assert jax.tree.structure(back) == jax.tree.structure(jax.tree.map(jnp.asarray, variables))
    for a, b in zip(jax.tree.leaves(variables), jax.tree.leaves(back), strict=True):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
    x = jnp.asarray(_data((6, 4), 8))
    expected = bn.apply(variables, x)
    np.testing.assert_array_equal(np.asarray(bn.apply(back, x)), np.asarray(expected))
    y, _ = dropnorm.batch_norm(params, state, x, train=False)
    np.testing.assert_allclose(np.asarray(y), np.asarray(expected), rtol=RTOL, atol=ATOL)


def test_flax_training_step_matches_after_conversion():
    """Same conventions, no flags: momentum 0.99 and biased running variance in both."""
    bn = nn.BatchNorm(use_running_average=False, momentum=0.9, use_fast_variance=False)
    _, variables = _flax_variables(4, 9)
    params, state = batch_norm_from_flax(variables, count=5)
    assert int(state.count) == 5
    x = jnp.asarray(_data((8, 4), 10))
    expected, updates = bn.apply(variables, x, mutable=["batch_stats"])
    y, state = dropnorm.batch_norm(params, state, x, train=True, momentum=0.9)
    np.testing.assert_allclose(np.asarray(y), np.asarray(expected), rtol=RTOL, atol=ATOL)
    back = batch_norm_to_flax(params, state)["batch_stats"]
    for name in ("mean", "var"):
        np.testing.assert_allclose(np.asarray(back[name]),
                                   np.asarray(updates["batch_stats"][name]), rtol=RTOL, atol=ATOL)


def test_readme_porting_snippet():
    # Kept identical to the "Porting from PyTorch" snippet of the README (/tmp/readme_interop.md).
    import jax.numpy as jnp
    import numpy as np
    import torch

    import dropnorm
    from dropnorm.interop import (
        batch_norm_from_torch,
        batch_norm_kwargs_from_torch,
        batch_norm_to_torch,
    )

    bn = torch.nn.BatchNorm2d(8).eval()              # a trained PyTorch layer
    params, state = batch_norm_from_torch(bn)         # or bn.state_dict()
    kw = batch_norm_kwargs_from_torch(bn)             # axis=1, momentum=0.9, epsilon, unbiased
    x = torch.randn(4, 8, 5, 5)
    y, _ = dropnorm.batch_norm(params, state, jnp.asarray(x.numpy()), train=False, **kw)
    assert np.allclose(y, bn(x).detach().numpy(), atol=1e-5)
    bn.load_state_dict(batch_norm_to_torch(params, state, as_tensors=True))  # and back
