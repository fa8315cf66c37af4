"""Batch normalisation as pure functions: params and state in, output and new state out."""

from __future__ import annotations

import functools
import math
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax

from dropnorm import _checks
from dropnorm._moments import (
    Reducer,
    _axis_size,
    batch_moments,
    check_axis_index_groups,
    check_axis_name,
    ghost_layout,
    merge_moments,
    re_dot,
    real_dtype,
    reducer,
    stats_dtype,
)


class BatchNormParams(NamedTuple):
    """Learned affine parameters of batch normalisation: ``y = x_hat * scale + bias``.

    A ``NamedTuple``, so a pytree: optimisers, ``jax.grad`` and checkpointing see its
    arrays as leaves. Either field may be None (no scale / no bias, like Flax's
    ``use_scale=False`` / ``use_bias=False`` or PyTorch's ``affine=False``).

    Attributes:
      scale: the per-feature scale (gamma), of the feature shape and the parameter
        dtype (float32 by default), or None for a scale of 1.
      bias: the per-feature bias (beta), same shape and dtype, or None for 0.

    Examples:
      >>> import jax.numpy as jnp, dropnorm
      >>> params = dropnorm.BatchNormParams(scale=jnp.ones(3), bias=None)
      >>> params.scale.shape, params.bias
      ((3,), None)

    References:
      Ioffe & Szegedy, "Batch Normalization: Accelerating Deep Network Training
      by Reducing Internal Covariate Shift", ICML 2015 (gamma and beta).
    """

    scale: jax.Array | None  # feature_shape, param dtype (float32 by default); gamma
    bias: jax.Array | None  # feature_shape, param dtype; beta


class BatchNormState(NamedTuple):
    """Running statistics of batch normalisation, updated in training, used in evaluation.

    A ``NamedTuple`` (a pytree). :func:`batch_norm` never modifies it: training returns
    a new state, evaluation returns the one it was given.

    Attributes:
      mean: running mean, of the feature shape, float32 (complex64 once trained on
        complex input); starts at 0. ``new = momentum * old + (1 - momentum) * batch``.
      var: running variance, same shape, float32; starts at 1. Biased (divide by n)
        unless ``unbiased_running_var=True`` (PyTorch's convention).
      count: int32 scalar, the number of training updates so far (PyTorch's
        ``num_batches_tracked``); ``momentum=None`` averages all batches with it.

    Examples:
      >>> import dropnorm
      >>> _, state = dropnorm.batch_norm_init(2)
      >>> state.mean.tolist(), state.var.tolist(), int(state.count)
      ([0.0, 0.0], [1.0, 1.0], 0)

    References:
      Ioffe & Szegedy, "Batch Normalization: Accelerating Deep Network Training
      by Reducing Internal Covariate Shift", ICML 2015 (the running averages used at
      inference). PyTorch's ``BatchNorm`` keeps the same three buffers
      (``running_mean``, ``running_var``, ``num_batches_tracked``).
    """

    mean: jax.Array  # feature_shape, float32; starts at 0
    var: jax.Array  # feature_shape, float32, biased (unless unbiased_running_var); starts at 1
    count: jax.Array  # (), int32: number of training updates so far


class PopulationStats(NamedTuple):
    """The exact statistics of every input a batch norm layer has seen, batch after batch.

    Pass it to :func:`batch_norm` (or :func:`batch_renorm`) in place of a
    ``BatchNormState``, with ``train=True``: the layer normalises by the batch's
    statistics, as in training, and returns a new ``PopulationStats`` that adds
    the batch's per-feature count, mean and ``M2`` (sum of squared deviations)
    to the ones so far by Chan et al.'s pairwise update
    ``M2 = M2_a + M2_b + delta^2 n_a n_b / n``. The mean is kept as
    ``shift + mean_d``, the shift fixed at the first batch's mean, so it is
    never rounded at the data's magnitude between batches.
    :func:`population_stats_init` makes empty ones and
    :func:`population_stats_finalize` turns them into a ``BatchNormState``;
    :func:`recompute_batch_norm` does both around a loop over batches.

    Attributes:
      count: the number of values seen per feature, of the feature shape, in
        the accumulation dtype (float32 unless asked otherwise: exact up to
        2**24 values, then with a relative rounding of 6e-8).
      shift: the first batch's mean, same shape (complex for complex input).
      mean_d: the mean of everything seen minus ``shift``, shift's dtype.
      m2: the sum of ``|x - mean|^2`` over everything seen, count's dtype.
      updates: int32, the state's ``count`` shape (a scalar): the number of
        batches merged, which becomes the new state's ``count`` (PyTorch's
        ``update_bn`` leaves ``num_batches_tracked`` at the number of batches).

    Examples:
      >>> import jax.numpy as jnp, dropnorm
      >>> params, state = dropnorm.batch_norm_init(1)
      >>> stats = dropnorm.population_stats_init(state)
      >>> for x in (jnp.array([[0.0], [2.0]]), jnp.array([[10.0], [12.0], [14.0]])):
      ...     _, stats = dropnorm.batch_norm(params, stats, x, train=True)
      >>> new = dropnorm.population_stats_finalize(stats, state)
      >>> # of all five values 0, 2, 10, 12, 14:
      >>> round(float(new.mean[0]), 4), round(float(new.var[0]), 4), int(new.count)
      (7.6, 31.04, 2)

    References:
      Chan, Golub & LeVeque, "Updating Formulae and a Pairwise Algorithm for
      Computing Sample Variances", 1979. Wu & Johnson, "Rethinking 'Batch' in
      BatchNorm", 2021 (PreciseBN: population statistics after training).
    """

    count: jax.Array  # feature_shape, float32 (the accumulation dtype): values seen per feature
    shift: jax.Array  # feature_shape, count's dtype (complex for complex input): 1st batch's mean
    mean_d: jax.Array  # feature_shape, shift's dtype: the mean of all values seen, minus shift
    m2: jax.Array  # feature_shape, count's dtype: sum of |x - mean|^2 over all values seen
    updates: jax.Array  # the state count's shape ((), stacked layers: (layers,)), int32


# Exported programs (jax.export) may take and return these types: serialised by name.
for _cls in (BatchNormParams, BatchNormState, PopulationStats):
    jax.export.register_namedtuple_serialization(_cls, serialized_name=f"dropnorm.{_cls.__name__}")
del _cls


def _accumulate(stats: PopulationStats, x, mask, rough, lay, red: Reducer) -> PopulationStats:
    """``stats`` with the batch ``x`` (over ``red``'s devices) merged in.

    The batch's moments are those of ``x - centre``, ``centre`` the accumulator's shift (or,
    for its first batch, ``rough``, a mean of this batch): exact in floating point for the
    values within a factor 2 of it (Sterbenz), so the batch's mean is known at the scale of
    the deviations, not rounded at the data's magnitude, before Chan's update merges it.
    """
    seen = stats.count > 0
    centre = lax.stop_gradient(jnp.where(seen, stats.shift, rough.reshape(lay.feature_shape)))
    dt = jnp.promote_types(stats_dtype(x.dtype), stats.count.dtype)
    mean, var, count = batch_moments(x.astype(dt) - centre.reshape(lay.stats_shape).astype(dt),
                                     lay.reduction_axes, mask=mask, red=red)
    mean, var, count = (a.reshape(lay.feature_shape) for a in (mean, var, count))
    n, mean_d, m2 = merge_moments(stats.count, stats.mean_d, stats.m2, count, mean, var * count)
    mean_dtype = (jnp.result_type(stats.shift, centre) if jnp.iscomplexobj(centre)
                  else stats.shift.dtype)
    return PopulationStats(n.astype(stats.count.dtype), centre.astype(mean_dtype),
                           mean_d.astype(mean_dtype), m2.astype(stats.m2.dtype),
                           stats.updates + 1)


def batch_norm_init(num_features, *, use_scale: bool = True, use_bias: bool = True,
                    dtype=jnp.float32) -> tuple[BatchNormParams, BatchNormState]:
    """Initial parameters (scale 1, bias 0) and state (mean 0, var 1, count 0).

    Args:
      num_features: the number of features (an int), or the feature shape (a
        tuple) when normalising over several feature axes.
      use_scale: whether to learn a per-feature scale (gamma).
      use_bias: whether to learn a per-feature bias (beta).
      dtype: dtype of the parameters. The running statistics are always float32.

    Returns:
      ``(params, state)``: ``BatchNormParams`` (None for a field that is not used)
      and ``BatchNormState``.

    Raises:
      ValueError: ``num_features`` that is not a positive int or a tuple of them.

    Examples:
      >>> import dropnorm
      >>> params, state = dropnorm.batch_norm_init(3)
      >>> params.scale.tolist(), state.var.tolist(), int(state.count)
      ([1.0, 1.0, 1.0], [1.0, 1.0, 1.0], 0)

    References:
      Ioffe & Szegedy, "Batch Normalization: Accelerating Deep Network Training
      by Reducing Internal Covariate Shift", ICML 2015.
    """
    if isinstance(num_features, (int, np.integer)) and not isinstance(num_features, bool):
        shape = (int(num_features),)
    elif isinstance(num_features, tuple) and all(
        isinstance(n, (int, np.integer)) and not isinstance(n, bool) for n in num_features
    ):
        shape = tuple(int(n) for n in num_features)
    else:
        raise ValueError(
            f"batch_norm_init: `num_features` must be an int or a tuple of ints; got "
            f"{num_features!r}."
        )
    if any(n <= 0 for n in shape):
        raise ValueError(f"batch_norm_init: `num_features` must be positive; got {num_features!r}.")
    params = BatchNormParams(
        jnp.ones(shape, dtype) if use_scale else None,
        jnp.zeros(shape, dtype) if use_bias else None,
    )
    state = BatchNormState(jnp.zeros(shape, jnp.float32), jnp.ones(shape, jnp.float32),
                           jnp.zeros((), jnp.int32))
    return params, state


class _Layout(NamedTuple):
    feature_axes: tuple[int, ...]
    reduction_axes: tuple[int, ...]
    feature_shape: tuple[int, ...]
    stats_shape: tuple[int, ...]  # x's rank, 1 on reduction axes


def _layout(caller, params, state, x, axis) -> _Layout:
    fn = caller.fn
    feature_axes = _checks.normalize_axes(axis, x.ndim, fn)
    reduction_axes = tuple(a for a in range(x.ndim) if a not in feature_axes)
    feature_shape = tuple(x.shape[a] for a in feature_axes)
    stats_shape = tuple(x.shape[a] if a in feature_axes else 1 for a in range(x.ndim))
    if isinstance(state, PopulationStats):
        named = [("state.shift", state.shift), ("state.m2", state.m2)]
    else:
        named = [("state.mean", state.mean), ("state.var", state.var)]
    if params is not None:
        named += [("params.scale", params.scale), ("params.bias", params.bias)]
    for name, value in named:
        if value is not None and tuple(jnp.shape(value)) != feature_shape:
            init_arg = feature_shape[0] if len(feature_shape) == 1 else feature_shape
            fix = caller.state_hint or f"create the state with batch_norm_init({init_arg})"
            raise ValueError(
                f"{fn}: `{caller.x_name}` has {math.prod(feature_shape)} features (shape "
                f"{feature_shape} along axis {axis!r}, {caller.x_name}.shape={tuple(x.shape)}) "
                f"but `{name}` has shape {tuple(jnp.shape(value))} "
                f"({math.prod(jnp.shape(value))} features). Check `axis`, or {fix}."
            )
    return _Layout(feature_axes, reduction_axes, feature_shape, stats_shape)


def _as_scale(g, x_dtype):
    """A scale in the statistics' real dtype, or complex if it is complex (never dropping an
    imaginary part: Flax's NNX promotes the scale to the complex input's dtype)."""
    return g.astype(stats_dtype(x_dtype) if jnp.iscomplexobj(g) else real_dtype(x_dtype))


def _normalize(x, mean, inv_std, params, stats_shape, out_dtype):
    """``(x - mean) * inv_std * scale + bias`` in the statistics dtype, cast to ``out_dtype``."""
    dt = stats_dtype(x.dtype)
    mul = inv_std
    if params is not None and params.scale is not None:
        mul = mul * _as_scale(params.scale.reshape(stats_shape), x.dtype)
    y = (x.astype(dt) - mean) * mul
    if params is not None and params.bias is not None:
        y = y + params.bias.reshape(stats_shape).astype(dt)
    return y.astype(out_dtype)


class _Spec(NamedTuple):
    """The static part of a training-mode call (hashable)."""

    reduction_axes: tuple[int, ...]  # of x (ghost batches: of the (chunks, examples, ...) view)
    stats_shape: tuple[int, ...]  # parameters and running statistics broadcast to this
    out_dtype: Any
    red: Reducer  # how local sums become global ones (devices, groups)
    always_batch: bool  # static train=True and no mask: every feature uses its batch statistics


def _forward(spec: _Spec, x, mask, scale, bias, epsilon, run_mean, run_var, train, bounds):
    """Training-mode batch norm: ``(y, mean, var, count)`` and the per-feature coefficients.

    ``y = (x - M) * K * g + (D * g + b)``: for a feature that uses its batch statistics,
    ``M`` is the batch mean, ``K = r / sqrt(var + epsilon)`` and ``D = d`` (batch
    renormalisation's corrections; ``r = 1, d = 0`` otherwise); a feature with no valid
    element, or every feature when a traced ``train`` is False, uses the running
    statistics (``M = running mean``, ``K = 1 / sqrt(running var + epsilon)``, ``D = 0``).
    """
    # The running mean is the sums' shift: every device holds it, so the common case costs
    # one pass over x and one collective (_moments.shifted_moments).
    mean, var, count = batch_moments(x, spec.reduction_axes, mask=mask, red=spec.red,
                                     shift=run_mean)
    inv = lax.rsqrt(var + epsilon)
    r = d = None
    if bounds is not None:  # batch renormalisation: r and d are constants (no gradient)
        r_max, d_max = bounds
        run_std = jnp.sqrt(run_var + epsilon)
        r = lax.stop_gradient(jnp.clip(jnp.sqrt(var + epsilon) / run_std, 1.0 / r_max, r_max))
        d = lax.stop_gradient(jnp.clip((mean - run_mean) / run_std, -d_max, d_max))
    k_batch = inv if r is None else inv * r
    if spec.always_batch:
        use, big_m, big_k, big_d = None, mean, k_batch, d
    else:
        use = count > 0
        if train is not None:
            use = use & train
        big_m = jnp.where(use, mean, run_mean)
        big_k = jnp.where(use, k_batch, lax.rsqrt(run_var + epsilon))
        big_d = None if d is None else jnp.where(use, d, 0.0)
    y = _affine(x, big_m, big_k, big_d, scale, bias, spec)
    return (y, mean, var, count), (use, big_m, big_k, big_d, inv, r)


def _affine(x, big_m, big_k, big_d, scale, bias, spec: _Spec):
    dt = stats_dtype(x.dtype)
    mul, add = big_k, big_d
    if scale is not None:
        g = _as_scale(scale.reshape(spec.stats_shape), x.dtype)
        mul = mul * g
        add = None if add is None else add * g
    if bias is not None:
        b = bias.reshape(spec.stats_shape).astype(dt)
        add = b if add is None else add + b
    y = (x.astype(dt) - big_m) * mul
    if add is not None:
        y = y + add
    return y.astype(spec.out_dtype)


@functools.partial(jax.custom_jvp, nondiff_argnums=(0,))
def _train_normalize(spec, x, mask, scale, bias, epsilon, run_mean, run_var, train, bounds):
    """Every training-mode batch norm: ``(y, mean, var, count)``.

    One function and one derivative rule whatever the options (a mask, ``axis_name``
    and groups, ghost batches, batch renormalisation, a traced ``train``). A
    ``jax.custom_jvp`` with a hand-written tangent (not ``custom_vjp``, so ``jax.jvp``,
    ``jax.hessian``, ``vmap`` and ``scan`` keep working). The tangent is computed inside
    ``jax.checkpoint`` from ``x`` and per-feature vectors, so reverse mode keeps only the
    input (plus the mask, if any) alive for the backward pass, and XLA compiles the
    backward to two fused reductions (one collective of 2 x features numbers across
    devices) and one elementwise pass instead of autodiff's chain through the statistics.
    """
    return _cached_forward(spec, x, mask, scale, bias, epsilon, run_mean, run_var, train,
                           bounds)[0]


def _tangent(spec, x, mask, mean, count, coef, scale, run_var, epsilon, tx, tscale, tbias,
             teps, trun_mean, trun_var):
    """Tangents of ``(y, mean, var)``, linear in the input tangents.

    With ``t = tx`` and expectations over the valid elements (and devices): the batch
    statistics move by ``tmean = E[t]`` and ``tvar = 2 E[Re(conj(x - mean) t)]``, so
    ``tK = -r inv^3 (tvar + teps) / 2``; for features on the running statistics
    ``tM = trun_mean`` and ``tK = -rinv^3 (trun_var + teps) / 2``. Then
    ``ty = g ((t - tM) K + (x - M) tK) + tg ((x - M) K + D) + tb``, written as one
    elementwise pass with per-feature coefficients.
    """
    use, big_m, big_k, big_d, inv, r = coef
    dt = stats_dtype(x.dtype)
    rdt = real_dtype(x.dtype)
    red, sshape = spec.reduction_axes, spec.stats_shape
    t = tx.astype(dt)
    xf = x.astype(dt)
    dev_t = xf - mean
    if mask is not None:
        zero = jnp.zeros((), dt)
        t_valid, dev_t = jnp.where(mask, t, zero), jnp.where(mask, dev_t, zero)
    else:
        t_valid = t
    s_t = jnp.sum(t_valid, red, keepdims=True)
    s_xt = jnp.sum(re_dot(dev_t, t), red, keepdims=True)
    if jnp.iscomplexobj(s_t):
        s_t, s_xt = spec.red.total((s_t, s_xt))
    else:
        s_t, s_xt = spec.red.total(jnp.stack([s_t, s_xt]))
    safe = jnp.maximum(count, 1.0)
    tmean, tvar = s_t / safe, 2.0 * s_xt / safe
    teps = teps.astype(rdt)
    tk = -0.5 * inv**3 * (tvar + teps)
    if r is not None:
        tk = tk * r
    if use is None:
        tm = tmean
    else:
        rinv = lax.rsqrt(run_var + epsilon)
        tm = jnp.where(use, tmean, trun_mean.astype(dt))
        tk = jnp.where(use, tk, -0.5 * rinv**3 * (trun_var.astype(rdt) + teps))
    g = 1.0 if scale is None else _as_scale(scale.reshape(sshape), x.dtype)
    a = g * big_k  # ty = a t + (x - M) k + c
    k = g * tk
    c = -a * tm
    if tscale is not None:
        tg = _as_scale(tscale.reshape(sshape), x.dtype)
        k = k + tg * big_k
        if big_d is not None:
            c = c + tg * big_d
    if tbias is not None:
        c = c + tbias.reshape(sshape).astype(dt)
    ty = a * t + (xf - big_m) * k + c
    return ty.astype(spec.out_dtype), tmean, tvar


# prevent_cse=False: inside one jit XLA may share x - mean between the forward and the
# rematerialised tangent (bf16 vjp on CPU: 4 instead of 6 input-sized temporaries; the 12-layer
# step's temp memory moves by about 1%). The residuals stay x and per-feature vectors.
_checkpointed_tangent = jax.checkpoint(_tangent, static_argnums=(0,), prevent_cse=False)
# The forward as a jit: its trace is cached, so the layers of a model that share a shape
# trace the statistics once (the 12-layer step's trace time: 1.08x Flax's before, BENCHMARKS).
_cached_forward = jax.jit(_forward, static_argnums=(0,))


@_train_normalize.defjvp
def _train_normalize_jvp(spec, primals, tangents):
    x, mask, scale, bias, epsilon, run_mean, run_var, train, bounds = primals
    tx, _, tscale, tbias, teps, trun_mean, trun_var, _, _ = tangents
    out, coef = _cached_forward(spec, x, mask, scale, bias, epsilon, run_mean, run_var, train,
                                bounds)
    y, mean, var, count = out
    ty, tmean, tvar = _checkpointed_tangent(spec, x, mask, mean, count, coef, scale, run_var,
                                            epsilon, tx, tscale, tbias, teps, trun_mean,
                                            trun_var)
    return out, (ty, tmean, tvar, jnp.zeros_like(count))


def _update_running(state, batch_mean, batch_var, valid, momentum):
    """The new state: running averages of the batch statistics, and count + 1.

    A complex batch mean makes the new running mean complex (Flax casts it to float32,
    dropping the imaginary part); the running variance is real.
    """
    count = state.count + 1
    if momentum is None:  # cumulative average: the plain mean of every batch seen so far
        w = 1.0 / count.astype(jnp.float32)
        new_mean = state.mean + w * (batch_mean - state.mean)
        new_var = state.var + w * (batch_var - state.var)
    else:
        new_mean = momentum * state.mean + (1.0 - momentum) * batch_mean
        new_var = momentum * state.var + (1.0 - momentum) * batch_var
    mean_dtype = jnp.result_type(state.mean, batch_mean) if jnp.iscomplexobj(batch_mean) else (
        state.mean.dtype)
    new_mean = jnp.where(valid, new_mean, state.mean).astype(mean_dtype)
    new_var = jnp.where(valid, new_var, state.var).astype(state.var.dtype)
    return BatchNormState(new_mean, new_var, count.astype(state.count.dtype))


def _check_mask(fn, mask, x):
    if mask is None:
        return None
    mask = jnp.asarray(mask)
    try:
        shape = jnp.broadcast_shapes(mask.shape, x.shape)
    except ValueError:
        shape = None
    if shape != tuple(x.shape):
        raise ValueError(
            f"{fn}: `mask` of shape {tuple(mask.shape)} does not broadcast to x's shape "
            f"{tuple(x.shape)}. Give it x's shape, or size 1 along the axes it does not vary on "
            f"(e.g. (batch, 1) for a padded batch of 2-D x)."
        )
    return jnp.broadcast_to(mask.astype(bool), x.shape)


def _check_params_state(fn, params, state):
    """Catch ``batch_norm(state, params, ...)`` and other non-state arguments early."""
    states = (BatchNormState, PopulationStats)
    if isinstance(params, states) or isinstance(state, BatchNormParams):
        raise TypeError(
            f"{fn}: `params` is a {type(params).__name__} and `state` a "
            f"{type(state).__name__}: the two look swapped. The parameters come first: "
            f"{fn}(params, state, x, train), as returned by batch_norm_init: "
            f"`params, state = batch_norm_init(num_features)`."
        )
    if not isinstance(state, PopulationStats) and not all(
            hasattr(state, f) for f in BatchNormState._fields):
        raise TypeError(
            f"{fn}: `state` must be a BatchNormState(mean, var, count), e.g. from "
            f"batch_norm_init(num_features); got {type(state).__name__}."
        )
    if params is not None and not all(hasattr(params, f) for f in BatchNormParams._fields):
        raise TypeError(
            f"{fn}: `params` must be a BatchNormParams(scale, bias) or None; got "
            f"{type(params).__name__}."
        )


def _core(caller, params, state, x, train, *, axis, momentum, epsilon, mask, axis_name,
          axis_index_groups, virtual_batch_size, unbiased_running_var, dtype, renorm):
    """Shared body of batch_norm and batch_renorm. ``renorm`` is None or (r_max, d_max)."""
    caller = _checks.as_caller(caller)
    fn = caller.fn
    _check_params_state(fn, params, state)
    x = _checks.check_floating(x, fn, caller.x_name, allow_complex=renorm is None)
    train = _checks.check_train(train, fn)
    population = isinstance(state, PopulationStats)
    if population:
        if train is not True:
            raise ValueError(
                f"{fn}: `state` is a PopulationStats, which gathers the statistics of the "
                f"batches a layer normalises in training mode, but `train`={train!r}. Pass "
                f"train=True (a Python bool) while recomputing the statistics, and the "
                f"finalised BatchNormState (population_stats_finalize) for evaluation.")
        renorm = None  # every layer normalises by its batch's statistics (PreciseBN)
    momentum = _checks.check_momentum(momentum, fn, allow_none=True)
    epsilon = _checks.check_epsilon(epsilon, fn)
    names = check_axis_name(axis_name, fn)
    check_axis_index_groups(axis_index_groups, names, fn)
    lay = _layout(caller, params, state, x, axis)
    out_dtype = x.dtype if dtype is None else jnp.dtype(dtype)
    dt, rdt = stats_dtype(x.dtype), real_dtype(x.dtype)
    scale = None if params is None else params.scale
    bias = None if params is None else params.bias

    if train is False:
        y = _normalize(x, state.mean.reshape(lay.stats_shape).astype(dt),
                       lax.rsqrt(state.var.reshape(lay.stats_shape).astype(rdt) + epsilon),
                       params, lay.stats_shape, out_dtype)
        return y, state

    if not lay.reduction_axes and names is None:
        raise ValueError(f"{fn}: `axis`={axis!r} leaves no axis to compute batch statistics over "
                         f"(pass `axis_name` when the batch is a mapped axis, as under vmap).")
    mask = _check_mask(fn, mask, x)

    # Ghost batches: view the batch axis 0 as (chunks, examples) and reduce per chunk; a ghost
    # batch larger than the local batch spans `span` consecutive devices (a group of them).
    xs, ms, red_axes, sshape, span, chunks = x, mask, lay.reduction_axes, lay.stats_shape, 1, 1
    if virtual_batch_size is not None:
        v = _checks.check_positive_int(virtual_batch_size, fn, "virtual_batch_size")
        if 0 in lay.feature_axes:
            raise ValueError(f"{fn}: `virtual_batch_size` splits axis 0, the batch axis, but "
                             f"`axis`={axis!r} makes it a feature axis.")
        if axis_index_groups is not None:
            raise ValueError(
                f"{fn}: `virtual_batch_size` cannot be combined with `axis_index_groups`: ghost "
                f"batches already define which examples share statistics. Drop one of them.")
        size = 1 if names is None else _axis_size(names, fn)
        chunks, span = ghost_layout(x.shape, lay.reduction_axes, v, size, names is not None, fn)
        per_chunk = math.prod(x.shape[a] for a in lay.reduction_axes if a != 0) * v
        if names is None and not caller.flax_small_batch and _checks.is_static(per_chunk) \
                and per_chunk < 2:
            raise ValueError(f"{fn}: ghost batches of `virtual_batch_size`={v} give {per_chunk} "
                             f"value per feature; statistics need at least 2.")
        chunked = (chunks, x.shape[0] // chunks) + x.shape[1:]
        xs = x.reshape(chunked)
        ms = None if mask is None else mask.reshape(chunked)
        red_axes = tuple(a + 1 for a in lay.reduction_axes)
        sshape = (1,) + lay.stats_shape
    elif (names is None and not caller.flax_small_batch
          and _checks.is_static(n_values := math.prod(x.shape[a] for a in lay.reduction_axes))
          and n_values < 2):  # a symbolic batch (jax.export) cannot be checked: see Raises
        raise ValueError(
            f"{fn}: the batch is too small: training needs at least 2 values per feature to "
            f"compute statistics, but {caller.x_name}.shape={tuple(x.shape)} with "
            f"`axis`={axis!r} gives {n_values}. Use "
            f"a bigger batch, {caller.train_off}, or pass `axis_name` when the batch is spread "
            f"over a mapped axis."
        )
    # Statistics over devices: over the device's group, or a ghost batch's devices; ghost
    # batches that lie on one device need no collective for their statistics.
    groups = None if span == 1 and virtual_batch_size is not None else axis_index_groups
    red = reducer(None if virtual_batch_size is not None and span == 1 else axis_name, groups,
                  fn, span=span)
    spec = _Spec(red_axes, sshape, out_dtype, red, train is True and mask is None)
    if population:  # a feature with no valid element uses the statistics gathered so far
        seen = state.count > 0
        run_mean = jnp.where(seen, state.shift + state.mean_d, 0.0).reshape(sshape).astype(dt)
        run_var = jnp.where(seen, state.m2 / jnp.maximum(state.count, 1.0), 1.0)
        run_var = run_var.reshape(sshape).astype(rdt)
    else:
        run_mean = state.mean.reshape(sshape).astype(dt)
        run_var = state.var.reshape(sshape).astype(rdt)
    bounds = None if renorm is None else tuple(jnp.asarray(b, rdt) for b in renorm)
    y, mean, var, count = _train_normalize(
        spec, xs, ms, scale, bias, jnp.asarray(epsilon, rdt), run_mean, run_var,
        None if train is True else train, bounds)
    if population:  # the population is the whole (global) batch, whatever its ghost batches
        whole = reducer(axis_name, None, fn)
        rough = mean if virtual_batch_size is None and axis_index_groups is None else (
            batch_moments(x, lay.reduction_axes, mask=mask, red=whole)[0])
        return y.reshape(x.shape), _accumulate(state, x, mask, rough, lay, whole)

    # The running-average update, from the batch statistics (ghost batches: the average of
    # every ghost batch of the global batch).
    def unbiased(var, count):
        if not unbiased_running_var:
            return var
        return jnp.where(count > 1, var * count / jnp.maximum(count - 1.0, 1.0), var)

    if virtual_batch_size is not None:
        sums = [jnp.sum(mean, 0), jnp.sum(unbiased(var, count), 0),
                jnp.sum((count == 0).astype(rdt), 0)]
        total = chunks
        if names is not None:  # each device holds `chunks` ghost batches, or 1/span of one
            sums = list(lax.psum(tuple(sums) if jnp.iscomplexobj(mean) else jnp.stack(sums),
                                 names))
            total = chunks * _axis_size(names, fn)
        upd_mean, upd_var, valid = sums[0] / total, sums[1] / total, sums[2] == 0
    else:
        upd_mean, upd_var, valid = mean, unbiased(var, count), count > 0
    reshape = lambda a: a.reshape(lay.feature_shape)  # noqa: E731
    new_state = _update_running(state, reshape(upd_mean), reshape(upd_var),
                                reshape(jnp.broadcast_to(valid, upd_mean.shape)), momentum)
    if train is not True:  # traced flag: the running statistics stay when not training
        new_state = jax.tree.map(lambda new, old: jnp.where(train, new, old), new_state, state)
    return y.reshape(x.shape), new_state


def batch_norm(params, state, x, train, *, axis=-1, momentum=0.99, epsilon=1e-5, mask=None,
               axis_name=None, axis_index_groups=None, virtual_batch_size=None,
               unbiased_running_var: bool = False, dtype=None):
    """Batch normalisation: normalise each feature by batch (train) or running (eval) statistics.

    Training: ``mean`` and biased ``var`` per feature over every axis except
    ``axis`` (and over ``axis_name`` across devices), then
    ``y = (x - mean) / sqrt(var + epsilon) * scale + bias`` and
    ``new.mean = momentum * state.mean + (1 - momentum) * mean`` (likewise
    ``var``), ``new.count = state.count + 1``. Evaluation: the same formula with
    the running statistics; the state is returned unchanged.

    Statistics are computed in at least float32 as sums of the deviations from the
    running mean and of their squares, in one pass over ``x`` as Flax's
    ``E[x^2] - E[x]^2``; when the running mean is more than 2 standard deviations
    from the batch's mean (early in training, on uncentred data), a second pass
    about the batch's mean runs instead. So the variance stays accurate when
    ``|mean| >> std``, is never negative, and is exactly 0 for a constant feature;
    the output has the input's dtype (bf16 in, bf16 out) unless ``dtype`` says
    otherwise. Complex input gives a complex mean, the real
    variance ``E|x - mean|^2`` and a complex output (as Flax), and a complex
    running mean (Flax drops its imaginary part).

    Across devices the statistics cost one collective of ``2 x features`` numbers
    (``3 x`` with a ``mask``) whatever the number of devices, the size of Flax's,
    and a second one of ``2 x features`` in the rare second pass: a ``psum`` over
    ``axis_name`` (``shard_map``, ``pmap``, ``vmap``), or, under a batch-sharded
    ``jax.jit`` without ``axis_name``, the all-reduce XLA inserts. Exact for uneven
    masks and for devices whose data sit at very different means.

    Args:
      params: ``BatchNormParams`` (scale and bias, either may be None), or None
        for no affine transform.
      state: ``BatchNormState`` from :func:`batch_norm_init` or a previous call.
      x: floating (or complex floating) input, features along ``axis``.
      train: True to use and update batch statistics, False to use the running
        ones. A traced boolean is accepted (one compiled function for both, with
        the same derivative rule as a static True).
      axis: the feature axis or axes (default -1, channels last; use 1 for
        PyTorch's NCHW).
      momentum: decay of the running average, in [0, 1]. PyTorch's ``momentum``
        is ``1 - momentum`` here: PyTorch's 0.1 equals 0.9. None gives the
        cumulative average of all batches (PyTorch's ``momentum=None``). A
        traced momentum is accepted; one that is NaN or outside [0, 1] cannot
        raise, so it makes the new running statistics NaN.
      epsilon: added to the variance before the square root (default 1e-5).
        A traced epsilon that is negative or NaN makes the output NaN.
      mask: optional boolean array broadcastable to ``x``; True elements count
        towards the statistics (padding gets False). All elements are normalised.
        A feature with no valid element in the batch has no batch statistics: it
        is normalised by the running statistics (as in evaluation), which it
        keeps unchanged.
      axis_name: a mapped axis name (``pmap``, ``shard_map``, ``vmap``), or a
        tuple of names, to compute global statistics over. Not needed under a
        sharded ``jax.jit``, where XLA reduces across devices by itself.
      axis_index_groups: groups of device indices along ``axis_name``; statistics
        are global within each group.
      virtual_batch_size: ghost batch normalisation: statistics per consecutive
        chunk of this many examples along axis 0; the running statistics move
        towards the average of the chunks' statistics.
      unbiased_running_var: update the running variance with the unbiased
        (n - 1) batch variance, as PyTorch does; normalisation still uses the
        biased one.
      dtype: output dtype (default: ``x.dtype``).

    Returns:
      ``(y, new_state)``.

    Raises:
      ValueError: feature count of ``x`` differing from params/state, ``axis``
        out of range, momentum outside [0, 1], negative epsilon, a batch too
        small to have statistics (one value per feature: PyTorch raises too; the
        Flax modules follow Flax instead and normalise it to the bias; a symbolic
        batch under ``jax.export`` cannot be checked, and one value per feature is
        then normalised to the bias too), a mask
        that does not broadcast, or a batch that ghost batches do not divide.
      TypeError: a non-floating ``x``, a non-boolean ``train``, ``params`` and
        ``state`` swapped, or a ``state`` that is not a ``BatchNormState``.

    Examples:
      >>> import jax.numpy as jnp, dropnorm
      >>> params, state = dropnorm.batch_norm_init(2)
      >>> x = jnp.array([[1.0, 10.0], [3.0, 30.0]])
      >>> y, state = dropnorm.batch_norm(params, state, x, train=True)
      >>> y.round(3).tolist(), [round(m, 3) for m in state.mean.tolist()], int(state.count)
      ([[-1.0, -1.0], [1.0, 1.0]], [0.02, 0.2], 1)

    References:
      Ioffe & Szegedy, "Batch Normalization: Accelerating Deep Network Training
      by Reducing Internal Covariate Shift", ICML 2015. Hoffer et al., "Train
      longer, generalize better" (ghost batch normalisation), NeurIPS 2017.
    """
    return batch_norm_as("batch_norm", params, state, x, train, axis=axis, momentum=momentum,
                         epsilon=epsilon, mask=mask, axis_name=axis_name,
                         axis_index_groups=axis_index_groups,
                         virtual_batch_size=virtual_batch_size,
                         unbiased_running_var=unbiased_running_var, dtype=dtype)


def batch_norm_as(caller, params, state, x, train, *, axis=-1, momentum=0.99, epsilon=1e-5,
                  mask=None, axis_name=None, axis_index_groups=None, virtual_batch_size=None,
                  unbiased_running_var: bool = False, dtype=None):
    """:func:`batch_norm` with errors in ``caller``'s terms (a ``_checks.Caller`` or a name).

    The Flax modules call this; ``Caller.flax_small_batch`` also makes one value per
    feature legal in training, as in Flax (it is normalised to the bias).
    """
    return _core(caller, params, state, x, train, axis=axis, momentum=momentum,
                 epsilon=epsilon, mask=mask, axis_name=axis_name,
                 axis_index_groups=axis_index_groups, virtual_batch_size=virtual_batch_size,
                 unbiased_running_var=unbiased_running_var, dtype=dtype, renorm=None)


def batch_renorm(params, state, x, train, *, r_max=3.0, d_max=5.0, axis=-1, momentum=0.99,
                 epsilon=1e-5, mask=None, axis_name=None, axis_index_groups=None,
                 unbiased_running_var: bool = False, dtype=None):
    """Batch renormalisation: batch statistics corrected towards the running ones.

    Training: ``x_hat = (x - mean) / std * r + d`` with
    ``r = clip(std / running_std, 1 / r_max, r_max)`` and
    ``d = clip((mean - running_mean) / running_std, -d_max, d_max)``, both
    treated as constants (no gradient); ``std = sqrt(var + epsilon)``. Then
    ``y = x_hat * scale + bias``. ``r_max=1, d_max=0`` is plain batch norm;
    unclipped, it is normalisation by the running statistics. Running statistics
    and evaluation are exactly those of :func:`batch_norm`.

    The other arguments are :func:`batch_norm`'s.

    Args:
      r_max: bound on ``r`` (>= 1). Ioffe starts at 1 and raises it to about 3.
      d_max: bound on ``|d|`` (>= 0). Ioffe starts at 0 and raises it to about 5.
        Both may be traced (a schedule inside one compiled step); a traced bound
        that is NaN or below its minimum makes the output NaN.

    Returns:
      ``(y, new_state)``.

    Raises:
      ValueError: ``r_max`` below 1 or ``d_max`` below 0 (concrete values), and
        everything :func:`batch_norm` raises.
      TypeError: complex ``x`` (the corrections ``r`` and ``d`` are real clips),
        and everything :func:`batch_norm` raises.

    Examples:
      >>> import jax.numpy as jnp, dropnorm
      >>> params, state = dropnorm.batch_norm_init(1)
      >>> x = jnp.array([[0.0], [4.0]])
      >>> y, _ = dropnorm.batch_renorm(params, state, x, train=True, r_max=1.0, d_max=0.0)
      >>> y.round(3).ravel().tolist()
      [-1.0, 1.0]

    References:
      Ioffe, "Batch Renormalization: Towards Reducing Minibatch Dependence in
      Batch-Normalized Models", NeurIPS 2017.
    """
    return batch_renorm_as("batch_renorm", params, state, x, train, r_max=r_max, d_max=d_max,
                           axis=axis, momentum=momentum, epsilon=epsilon, mask=mask,
                           axis_name=axis_name, axis_index_groups=axis_index_groups,
                           unbiased_running_var=unbiased_running_var, dtype=dtype)


def batch_renorm_as(caller, params, state, x, train, *, r_max=3.0, d_max=5.0, axis=-1,
                    momentum=0.99, epsilon=1e-5, mask=None, axis_name=None,
                    axis_index_groups=None, unbiased_running_var: bool = False, dtype=None):
    """:func:`batch_renorm` with errors in ``caller``'s terms (see :func:`batch_norm_as`)."""
    caller = _checks.as_caller(caller)
    bounds = []
    for name, value, low in (("r_max", r_max, 1.0), ("d_max", d_max, 0.0)):
        if _checks.is_traced(value):
            value = _checks.traced_real_scalar(value, caller.fn, name)
            value = _checks.poison_unless(value >= low, value)
        elif not _checks.real_scalar(value) >= low:
            raise ValueError(
                f"{caller.fn}: `{name}` must be >= {low} (a real number); got {value!r}.")
        bounds.append(value)
    r_max, d_max = bounds
    return _core(caller, params, state, x, train, axis=axis, momentum=momentum,
                 epsilon=epsilon, mask=mask, axis_name=axis_name,
                 axis_index_groups=axis_index_groups, virtual_batch_size=None,
                 unbiased_running_var=unbiased_running_var, dtype=dtype, renorm=(r_max, d_max))


def fold_batch_norm(kernel, bias, params, state, *, epsilon=1e-5):
    """Fold an evaluation-mode batch norm into the preceding Dense or convolution.

    For a layer ``z = x @ kernel + bias`` (or a convolution whose kernel has its
    output features last, Flax's ``(..., in, out)`` layout) followed by
    ``batch_norm(params, state, z, train=False)``, returns ``(kernel', bias')``
    with ``kernel' = kernel * a`` and ``bias' = (bias - mean) * a + beta``, where
    ``a = scale / sqrt(var + epsilon)``: one layer computing the same function.

    Args:
      kernel: array ``(..., out)``.
      bias: array ``(out,)`` or None (a layer without bias).
      params: ``BatchNormParams`` (or None).
      state: ``BatchNormState`` with running statistics of shape ``(out,)``.
      epsilon: the batch norm's epsilon.

    Returns:
      ``(kernel, bias)``, in the kernel's dtype (computed in at least float32).

    Raises:
      ValueError: a kernel whose last axis is not the state's feature count, a bias
        of the wrong shape, or a negative ``epsilon``.

    Examples:
      >>> import jax.numpy as jnp, dropnorm
      >>> params, state = dropnorm.batch_norm_init(2)
      >>> state = state._replace(mean=jnp.array([1.0, 2.0]), var=jnp.array([4.0, 1.0]))
      >>> k, b = dropnorm.fold_batch_norm(jnp.eye(2), None, params, state, epsilon=0.0)
      >>> k.tolist(), b.tolist()
      ([[0.5, 0.0], [0.0, 1.0]], [-0.5, -2.0])

    References:
      Jacob et al., "Quantization and Training of Neural Networks for Efficient
      Integer-Arithmetic-Only Inference", CVPR 2018 (section 3.2, folding batch
      normalisation into the preceding layer).
    """
    epsilon = _checks.check_epsilon(epsilon, "fold_batch_norm")
    kernel = jnp.asarray(kernel)
    out = kernel.shape[-1] if kernel.ndim else None
    if out is None or tuple(state.mean.shape) != (out,):
        raise ValueError(
            f"fold_batch_norm: the kernel's last axis (output features) has size {out} but "
            f"`state.mean` has shape {tuple(state.mean.shape)}; the batch norm must follow "
            f"this layer and normalise its {out} outputs."
        )
    if bias is not None and tuple(jnp.shape(bias)) != (out,):
        raise ValueError(
            f"fold_batch_norm: `bias` must have shape ({out},); got {jnp.shape(bias)}.")
    dt = stats_dtype(kernel.dtype)
    a = lax.rsqrt(state.var.astype(dt) + epsilon)
    if params is not None and params.scale is not None:
        a = a * params.scale.astype(dt)
    b = -state.mean.astype(dt) if bias is None else jnp.asarray(bias, dt) - state.mean.astype(dt)
    b = b * a
    if params is not None and params.bias is not None:
        b = b + params.bias.astype(dt)
    out_dtype = kernel.dtype
    return (kernel.astype(dt) * a).astype(out_dtype), b.astype(
        out_dtype if bias is None else jnp.result_type(bias))
