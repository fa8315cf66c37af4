"""Population statistics after training (PreciseBN): exact, over many batches.

After weight averaging (SWA, an EMA of the weights), or whenever the running averages
lag behind the weights, each batch norm layer's statistics are recomputed over many
batches with the weights fixed. Here they are the exact mean and (biased, dropnorm's
convention) variance of all the inputs the layer saw, batch after batch: every batch's
moments come from the same code as training's (:func:`dropnorm.batch_norm` with a
:class:`~dropnorm.PopulationStats` as its state) and are merged by Chan et al.'s
pairwise update (``_moments.merge_moments``). Not an average of per-batch variances,
which is what PyTorch's ``torch.optim.swa_utils.update_bn`` computes (cumulative
averages of each batch's mean and unbiased variance, ``momentum=None``): that leaves
out the spread of the batch means, and weights a small last batch like a full one.

The pure API is here; the Flax drivers (``dropnorm.linen.recompute_batch_norm``,
``dropnorm.nnx.recompute_batch_norm``) use :func:`fold_batches`,
:func:`population_stats_finalize` and the checks below, and only say how a Flax
model's layers are found, called and written back.

References:
  Wu & Johnson, "Rethinking 'Batch' in BatchNorm", 2021 (PreciseBN). Izmailov et al.,
  "Averaging Weights Leads to Wider Optima and Better Generalization", UAI 2018 (SWA and
  ``update_bn``). Chan, Golub & LeVeque, "Updating Formulae and a Pairwise Algorithm for
  Computing Sample Variances", 1979.
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Callable, Hashable, Iterable
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from dropnorm._batch_norm import BatchNormState, PopulationStats


def _is_state(s) -> bool:
    return isinstance(s, BatchNormState)


def _is_stats(s) -> bool:
    return isinstance(s, PopulationStats)


def _paths(tree, is_node) -> list[str]:
    """``jax.tree_util.keystr`` of every ``is_node`` subtree of ``tree`` ('' for the root)."""
    leaves = jax.tree_util.tree_flatten_with_path(tree, is_leaf=is_node)[0]
    return [jax.tree_util.keystr(p) for p, leaf in leaves if is_node(leaf)]


def accumulation_dtype(dtype, fn: str, name: str = "dtype"):
    """float32 by default; float64 only with ``jax_enable_x64`` (JAX would silently give 32)."""
    if dtype is None:
        return jnp.dtype(jnp.float32)
    try:
        dt = jnp.dtype(dtype)
    except TypeError:
        dt = None
    if dt is None or dt.kind != "f" or dt.itemsize < 4:
        raise ValueError(f"{fn}: `{name}` must be float32 or float64 (the dtype the statistics "
                         f"are accumulated in); got {dtype!r}.")
    if dt == jnp.float64 and not jax.config.jax_enable_x64:
        raise ValueError(f"{fn}: `{name}`=float64 needs 64-bit JAX: set "
                         f"jax.config.update('jax_enable_x64', True) first, or use float32.")
    return dt


def empty_stats(feature_shape, mean_dtype, dtype, updates_shape=()) -> PopulationStats:
    """A :class:`PopulationStats` that has seen nothing (all zeros)."""
    shift_dtype = jnp.promote_types(dtype, mean_dtype) if jnp.issubdtype(
        mean_dtype, jnp.complexfloating) else dtype
    z = jnp.zeros(feature_shape, dtype)
    zs = jnp.zeros(feature_shape, shift_dtype)
    return PopulationStats(z, zs, zs, z, jnp.zeros(updates_shape, jnp.int32))


def _init(state, dtype, fn: str):
    dt = accumulation_dtype(dtype, fn)
    if not _paths(state, _is_state):
        raise ValueError(
            f"{fn}: `state` holds no BatchNormState (got {type(state).__name__}), so there are "
            f"no batch norm statistics to recompute. Pass the state pytree your model threads "
            f"through dropnorm.batch_norm: a BatchNormState, or a dict, list or tuple of them.")
    return jax.tree.map(
        lambda s: empty_stats(jnp.shape(s.mean), jnp.result_type(s.mean), dt,
                              jnp.shape(s.count)) if _is_state(s) else s,
        state, is_leaf=_is_state)


def population_stats_init(state: Any, *, dtype=None) -> Any:
    """Empty :class:`PopulationStats` in place of every ``BatchNormState`` in ``state``.

    ``state`` is the pytree a model threads through :func:`batch_norm` (one
    ``BatchNormState``, or a dict, list or tuple of them, possibly stacked for
    ``scan``); every other leaf is kept as it is. Pass the result where the
    state goes, call the model in training mode on each batch, and hand what
    it returns to :func:`population_stats_finalize`.

    Args:
      state: a pytree with ``BatchNormState`` nodes.
      dtype: the accumulation dtype, float32 (default) or float64 (needs
        ``jax_enable_x64``).

    Returns:
      ``state``'s structure with a zero ``PopulationStats`` (of each layer's
      feature shape) for each ``BatchNormState``.

    Raises:
      ValueError: ``state`` holds no ``BatchNormState``; ``dtype`` not float32
        or float64, or float64 without ``jax_enable_x64``.

    Examples:
      >>> import dropnorm
      >>> _, state = dropnorm.batch_norm_init(3)
      >>> stats = dropnorm.population_stats_init({"bn": state})
      >>> stats["bn"].count.tolist(), int(stats["bn"].updates)
      ([0.0, 0.0, 0.0], 0)

    References:
      Wu & Johnson, "Rethinking 'Batch' in BatchNorm", 2021 (PreciseBN).
    """
    return _init(state, dtype, "population_stats_init")


def _finalize_one(stats: PopulationStats, state: BatchNormState, unbiased: bool):
    seen = stats.count > 0
    n = stats.count
    mean = stats.shift + stats.mean_d
    mean_dtype = jnp.result_type(state.mean, mean) if jnp.iscomplexobj(mean) else (
        jnp.result_type(state.mean))
    var = stats.m2 / jnp.maximum(n - 1.0 if unbiased else n, 1.0)
    new = BatchNormState(jnp.where(seen, mean, state.mean).astype(mean_dtype),
                         jnp.where(seen, var, state.var).astype(jnp.result_type(state.var)),
                         stats.updates.astype(jnp.result_type(state.count)))
    # A layer that saw no batch keeps its state (the drivers raise before they get here).
    reached = stats.updates > 0
    return jax.tree.map(
        lambda a, b: jnp.where(reached.reshape(reached.shape + (1,) * (a.ndim - reached.ndim)),
                               a, b), new, BatchNormState(*(jnp.asarray(v) for v in state)))


def finalize(stats, state, unbiased: bool, fn: str):
    try:
        return jax.tree.map(
            lambda s, p: _finalize_one(p, s, unbiased) if _is_state(s) else s,
            state, stats, is_leaf=_is_state)
    except (ValueError, TypeError, AttributeError) as err:
        raise ValueError(
            f"{fn}: `stats` does not match `state`: it must have a PopulationStats wherever "
            f"`state` has a BatchNormState (what population_stats_init(state) made and the "
            f"model returned). {state_paths(state, stats)}") from err


def state_paths(state, stats) -> str:
    have, want = set(_paths(stats, _is_stats)), _paths(state, _is_state)
    missing = [p or "(the root)" for p in want if p not in have]
    return f"Missing at: {', '.join(missing)}." if missing else ""


def population_stats_finalize(stats: Any, state: Any, *,
                              unbiased_running_var: bool = False) -> Any:
    """The ``BatchNormState`` pytree with each layer's population statistics.

    For each layer, ``mean = shift + mean_d`` and ``var = M2 / count`` (the
    biased variance, dropnorm's and Flax's convention for running variances),
    or ``M2 / (count - 1)`` with ``unbiased_running_var=True`` (PyTorch's);
    ``count`` becomes the number of batches merged (``updates``). A feature
    that saw no valid (unmasked) element keeps its old mean and variance; a
    layer that saw no batch keeps its whole state. Other leaves are
    ``state``'s.

    Args:
      stats: what the model returned for :func:`population_stats_init`'s
        output after the last batch.
      state: the original state (its structure, dtypes and fallbacks).
      unbiased_running_var: divide by ``count - 1`` as PyTorch does.

    Returns:
      ``state``'s structure with new ``BatchNormState`` s.

    Raises:
      ValueError: ``stats`` lacks a ``PopulationStats`` where ``state`` has a
        ``BatchNormState``.

    Examples:
      >>> import jax.numpy as jnp, dropnorm
      >>> params, state = dropnorm.batch_norm_init(1)
      >>> stats = dropnorm.population_stats_init(state)
      >>> _, stats = dropnorm.batch_norm(params, stats, jnp.array([[1.0], [3.0]]), True)
      >>> new = dropnorm.population_stats_finalize(stats, state, unbiased_running_var=True)
      >>> new.mean.tolist(), new.var.tolist(), int(new.count)
      ([2.0], [2.0], 1)

    References:
      Wu & Johnson, "Rethinking 'Batch' in BatchNorm", 2021 (PreciseBN).
    """
    return finalize(stats, state, unbiased_running_var, "population_stats_finalize")


_NOTHING = object()
_STEPS: OrderedDict = OrderedDict()  # the last few jitted steps, by what defines them
_MAX_STEPS = 16


def cached_step(key: Hashable, make: Callable[[], Callable]) -> tuple[Callable, Callable]:
    """``(step, jax.jit(step))`` with ``step = make()``, shared by the calls with an equal
    ``key`` (the model and how it is called), so that recomputing the statistics of many
    weights of one model (seeds, SWA and the final weights) compiles once per batch shape.
    An unhashable key (e.g. arrays among the call's arguments) gets a fresh step."""
    try:
        hash(key)
    except TypeError:
        step = make()
        return step, jax.jit(step)
    if key in _STEPS:
        _STEPS.move_to_end(key)
    else:
        step = make()
        _STEPS[key] = (step, jax.jit(step))
        if len(_STEPS) > _MAX_STEPS:
            _STEPS.popitem(last=False)
    return _STEPS[key]


def fold_batches(fn: str, batches: Iterable, start: Callable[[Any], Any],
                 step: Callable[[Any, Any], Any]) -> tuple[Any, int]:
    """``carry = step(carry, batch)`` over ``batches``, from ``start(first_batch)``.

    Returns ``(carry, number of batches)``. ``batches`` must be a non-empty iterable of
    batches (a list, a generator, a data loader), not an array: iterating an array
    would give one example per "batch".
    """
    if batches is None or isinstance(batches, (jax.Array, np.ndarray)) or hasattr(
            batches, "__array__"):
        raise TypeError(
            f"{fn}: `batches` must be an iterable of batches (a list, a generator, a data "
            f"loader); got {_describe(batches)}. For one batch, pass [x].")
    try:
        it = iter(batches)
    except TypeError:
        raise TypeError(
            f"{fn}: `batches` must be an iterable of batches (a list, a generator, a data "
            f"loader); got {type(batches).__name__}.") from None
    first = next(it, _NOTHING)
    if first is _NOTHING:
        raise ValueError(
            f"{fn}: `batches` is empty, so there is nothing to compute statistics from. Pass at "
            f"least one batch (an iterator or generator that was already consumed is empty: "
            f"make a new one).")
    carry = start(first)
    carry = step(carry, first)
    n = 1
    for batch in it:
        carry = step(carry, batch)
        n += 1
    return carry, n


def _describe(value) -> str:
    if hasattr(value, "shape") and hasattr(value, "dtype"):
        return f"an array of shape {tuple(value.shape)} and dtype {value.dtype}"
    return repr(value)


def unreached(named_stats: dict[str, PopulationStats]) -> list[str]:
    """The names whose statistics saw no batch (concrete values)."""
    return [name for name, s in named_stats.items() if np.any(np.asarray(s.updates) == 0)]


def recompute_batch_norm(apply_fn: Callable[[Any, Any, Any], tuple[Any, Any]], params: Any,
                         state: Any, batches: Iterable, *, unbiased_running_var: bool = False,
                         dtype=None) -> Any:
    """Recompute every batch norm layer's statistics over ``batches``: PreciseBN, for SWA.

    Runs ``apply_fn(params, stats, batch)`` on each batch, with
    :class:`PopulationStats` in place of the ``BatchNormState`` s in ``state``
    (see :func:`population_stats_init`): each :func:`batch_norm` call that gets
    one normalises by its batch's statistics, as in training (so a layer's
    input is what training would have fed it), and adds the batch's moments
    to its exact population statistics. Then, per layer and feature, over all
    ``N`` values ``x_i`` it saw in all batches together:
    ``mean = sum(x_i) / N`` and ``var = sum((x_i - mean)^2) / N`` (or
    ``/ (N - 1)`` with ``unbiased_running_var``), exact (Chan et al.'s pairwise
    update of per-batch moments), and ``count`` = the number of batches.
    PyTorch's ``torch.optim.swa_utils.update_bn`` instead averages each
    batch's mean and unbiased variance (``momentum=None``): it misses the
    spread between batch means and weights a small last batch like a full one.

    ``apply_fn`` is your model's training-mode forward, written as for
    training: ``batch_norm(params, state, x, train=True)`` for each layer,
    returning ``(output, new_state)`` with ``new_state`` in ``state``'s
    structure. Turn dropout off in it (``train=False`` for dropout): at
    evaluation the layers see inputs without dropout, so their statistics
    should too (Li et al. 2019's variance shift). Each step runs under
    ``jax.jit`` (one compilation per batch shape); the output is discarded.

    Args:
      apply_fn: ``(params, state, batch) -> (output, new_state)``.
      params: passed to ``apply_fn`` unchanged (e.g. averaged weights).
      state: the pytree with ``BatchNormState`` s (its structure, dtypes, and
        the fallback for features that see no valid element).
      batches: a non-empty iterable of batches (each passed to ``apply_fn``
        as is: an array, or any pytree of them such as ``(x, mask)``).
      unbiased_running_var: store ``M2 / (N - 1)``, PyTorch's convention.
      dtype: the accumulation dtype (float32; float64 needs
        ``jax_enable_x64``).

    Returns:
      ``state``'s structure with each ``BatchNormState`` replaced by the
      population statistics; other leaves as in ``state``.

    Raises:
      ValueError: ``batches`` empty; ``state`` without a ``BatchNormState``;
        a layer that ``apply_fn`` never called with its state in training
        mode; ``apply_fn`` returning a state of another structure.
      TypeError: ``batches`` an array or not iterable; ``apply_fn`` not
        callable or not returning a pair.

    Examples:
      >>> import jax, jax.numpy as jnp, dropnorm
      >>> params, state = dropnorm.batch_norm_init(2)
      >>> def apply_fn(params, state, x):
      ...     return dropnorm.batch_norm(params, state, x, train=True)
      >>> batches = [jnp.array([[0.0, 1.0], [2.0, 1.0]]), jnp.array([[10.0, 1.0], [12.0, 1.0]])]
      >>> new = dropnorm.recompute_batch_norm(apply_fn, params, state, batches)
      >>> new.mean.tolist(), new.var.tolist(), int(new.count)  # of 0, 2, 10, 12 and of 1s
      ([6.0, 1.0], [26.0, 0.0], 2)

    References:
      Wu & Johnson, "Rethinking 'Batch' in BatchNorm", 2021 (PreciseBN).
      Izmailov et al., "Averaging Weights Leads to Wider Optima and Better
      Generalization", UAI 2018 (SWA, ``update_bn``). Li et al.,
      "Understanding the Disharmony between Dropout and Batch Normalization by
      Variance Shift", CVPR 2019.
    """
    fn = "recompute_batch_norm"
    if not callable(apply_fn):
        raise TypeError(f"{fn}: `apply_fn` must be a function (params, state, batch) -> "
                        f"(output, new_state); got {_describe(apply_fn)}.")
    stats = _init(state, dtype, fn)
    _, jitted = cached_step(("pure", apply_fn), lambda: _pure_step(apply_fn, fn))
    stats, _ = fold_batches(fn, batches, lambda _: stats,
                            lambda s, batch: jitted(params, s, batch))
    flat = jax.tree_util.tree_flatten_with_path(stats, is_leaf=_is_stats)[0]
    missing = unreached({f"state{jax.tree_util.keystr(p)}" if p else "`state`": s
                         for p, s in flat if _is_stats(s)})
    if missing:
        raise ValueError(
            f"{fn}: the layers at {', '.join(missing)} saw no batch: `apply_fn` "
            f"never passed their state to dropnorm.batch_norm with train=True. Call every "
            f"layer in training mode (dropout off), or leave unused layers out of `state`.")
    return finalize(stats, state, unbiased_running_var, fn)


def _pure_step(apply_fn, fn: str):
    def step(params, stats, batch):
        out = apply_fn(params, stats, batch)
        if not (isinstance(out, tuple) and len(out) == 2):
            raise TypeError(f"{fn}: `apply_fn` must return (output, new_state), as "
                            f"dropnorm.batch_norm does; got {type(out).__name__}.")
        new = out[1]
        if jax.tree.structure(new) != jax.tree.structure(stats):
            raise ValueError(
                f"{fn}: `apply_fn` returned a new state whose structure differs from "
                f"`state`'s: it must return each layer's state as dropnorm.batch_norm "
                f"returned it, where that layer's state was. {_stats_paths(stats, new)}")
        return new

    return step


def _stats_paths(given, returned) -> str:
    have = set(_paths(returned, _is_stats))
    missing = [p or "(the root)" for p in _paths(given, _is_stats) if p not in have]
    return f"No PopulationStats at: {', '.join(missing)}." if missing else ""
