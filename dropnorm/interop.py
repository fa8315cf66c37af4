"""Converters between dropnorm's batch-norm ``(params, state)`` and PyTorch / Flax.

Import it as ``dropnorm.interop``; it is not re-exported from ``dropnorm``, and
torch is imported only inside the functions that need it (``pip install
torch==2.13.0``, or the ``dropnorm[torch]`` extra).

PyTorch's ``BatchNorm1d/2d/3d`` and ``dropnorm.batch_norm`` compute the same
function once these conventions are translated:

==================================  =========================================
PyTorch                             dropnorm
==================================  =========================================
``weight``, ``bias``                ``BatchNormParams(scale, bias)``
``running_mean``, ``running_var``   ``BatchNormState(mean, var, count)``
``num_batches_tracked``             ``count``
``momentum=m`` (default 0.1)        ``momentum=1 - m`` (0.9)
``momentum=None``                   ``momentum=None`` (cumulative average)
running var unbiased (n - 1)        ``unbiased_running_var=True``
``eps`` (default 1e-5)              ``epsilon`` (default 1e-5)
channels at dim 1 (NC, NCL, NCHW)   ``axis=1``
``affine=False``                    ``BatchNormParams(None, None)``
==================================  =========================================

:func:`batch_norm_kwargs_from_torch` returns these keyword arguments for a
given module. Flax linen's ``BatchNorm`` already shares dropnorm's conventions
(momentum, biased running variance, epsilon 1e-5); only the variable tree
differs, and Flax keeps no update count.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import jax.numpy as jnp
import numpy as np

from dropnorm._batch_norm import BatchNormParams, BatchNormState

_TORCH_HINT = (
    "dropnorm.interop needs PyTorch for this; install the CPU build with "
    "`pip install torch==2.13.0` (or the `dropnorm[torch]` extra)."
)
_TORCH_KEYS = ("weight", "bias", "running_mean", "running_var", "num_batches_tracked")


def _import_torch():
    try:
        import torch
    except ImportError as err:
        raise ImportError(_TORCH_HINT) from err
    return torch


def _to_numpy(value: Any) -> np.ndarray:
    """A torch tensor, NumPy or JAX array as a NumPy array (float tensors via float32)."""
    if hasattr(value, "detach"):  # a torch tensor; bfloat16 has no NumPy dtype
        value = value.detach().cpu()
        if value.is_floating_point():
            value = value.float()
        return value.numpy()
    return np.asarray(value)


def _is_torch_batch_norm(obj: Any) -> bool:
    cls = type(obj)
    return any(
        c.__name__ == "_BatchNorm" and c.__module__.startswith("torch.nn") for c in cls.__mro__
    )


def batch_norm_from_torch(
    module_or_state_dict: Any, *, prefix: str = ""
) -> tuple[BatchNormParams, BatchNormState]:
    """Convert a PyTorch ``BatchNorm1d/2d/3d`` (or its ``state_dict()``) to ``(params, state)``.

    ``weight``/``bias`` become ``params.scale``/``params.bias`` (both None for
    ``affine=False``), ``running_mean``/``running_var`` become ``state.mean``/
    ``state.var`` and ``num_batches_tracked`` becomes ``state.count`` (0 when a
    pre-1.0 checkpoint lacks it, as PyTorch itself assumes). Everything is
    converted to float32; ``count`` is int32.

    The result reproduces the module with ``dropnorm.batch_norm(params, state,
    x, train, **batch_norm_kwargs_from_torch(module))``: ``axis=1`` for NCHW
    input, ``momentum = 1 - torch_momentum`` (or None), the same ``epsilon``, and
    ``unbiased_running_var=True`` because PyTorch updates its running variance
    with the unbiased (n - 1) batch variance.

    Args:
      module_or_state_dict: a ``torch.nn.BatchNorm1d``, ``BatchNorm2d`` or
        ``BatchNorm3d`` (``SyncBatchNorm`` and ``LazyBatchNorm*d`` once
        initialised work too), or a mapping with the keys of its
        ``state_dict()`` (``weight``, ``bias``, ``running_mean``,
        ``running_var``, ``num_batches_tracked``) holding tensors or arrays.
      prefix: for a whole model's ``state_dict()``, the prefix of the batch
        norm's keys, e.g. ``"layer1.0.bn1."``; other keys are ignored.

    Returns:
      ``(BatchNormParams, BatchNormState)``.

    Raises:
      ValueError: for a module built with ``track_running_stats=False`` (it has
        no running statistics, and in evaluation it normalises by batch
        statistics, which ``batch_norm(..., train=False)`` does not do); for a
        state dict without running statistics, with unexpected keys, with only
        one of weight/bias, or with mismatched shapes.
      TypeError: for anything that is neither a batch-norm module nor a mapping.
      ImportError: if a module is passed and torch cannot be imported.

    Examples:
      >>> import numpy as np
      >>> from dropnorm.interop import batch_norm_from_torch
      >>> sd = {"weight": np.full(3, 2.0), "bias": np.zeros(3), "running_mean": np.ones(3),
      ...       "running_var": np.full(3, 4.0), "num_batches_tracked": np.array(7)}
      >>> params, state = batch_norm_from_torch(sd)
      >>> params.scale.tolist(), state.var.tolist(), int(state.count)
      ([2.0, 2.0, 2.0], [4.0, 4.0, 4.0], 7)

    References:
      PyTorch documentation, ``torch.nn.BatchNorm2d``. Ioffe & Szegedy, "Batch
      Normalization", ICML 2015.
    """
    fn = "batch_norm_from_torch"
    if isinstance(module_or_state_dict, Mapping):
        source = {
            k[len(prefix):]: v for k, v in module_or_state_dict.items() if k.startswith(prefix)
        }
        if prefix:
            source = {k: v for k, v in source.items() if "." not in k}
        what = "the state dict" + (f" (keys under prefix {prefix!r})" if prefix else "")
    elif _is_torch_batch_norm(module_or_state_dict):
        module = module_or_state_dict
        if not module.track_running_stats:
            raise ValueError(
                f"{fn}: the module was built with track_running_stats=False, so it keeps no "
                f"running statistics and always normalises by the statistics of the batch it "
                f"is given, even in eval(). dropnorm's equivalent is batch_norm(..., train=True) "
                f"with a fresh state from dropnorm.batch_norm_init({module.num_features}) whose "
                f"update you ignore. Convert a module with track_running_stats=True instead."
            )
        source = dict(module.state_dict())
        what = f"the module {type(module).__name__}"
    else:
        raise TypeError(
            f"{fn}: expected a torch.nn.BatchNorm1d/2d/3d module or its state_dict() (a mapping "
            f"with keys {', '.join(_TORCH_KEYS)}); got {type(module_or_state_dict).__name__}."
        )

    unknown = sorted(set(source) - set(_TORCH_KEYS))
    if unknown:
        raise ValueError(
            f"{fn}: {what} has keys {unknown} that a BatchNorm state dict does not have "
            f"(expected a subset of {list(_TORCH_KEYS)}). For a whole model's state_dict(), pass "
            f"prefix='<name of the batch norm>.', e.g. prefix='bn1.'."
        )
    if "running_mean" not in source or "running_var" not in source:
        raise ValueError(
            f"{fn}: {what} has no running_mean/running_var (it has keys {sorted(source)}). A "
            f"module with track_running_stats=False keeps none; dropnorm needs them for "
            f"train=False. Start from dropnorm.batch_norm_init(num_features) instead."
        )
    if ("weight" in source) != ("bias" in source):
        raise ValueError(f"{fn}: {what} has only one of weight and bias; a BatchNorm with "
                         f"affine=True has both, one with affine=False neither.")

    mean = _to_numpy(source["running_mean"]).astype(np.float32)
    var = _to_numpy(source["running_var"]).astype(np.float32)
    shape = mean.shape
    if mean.ndim != 1 or var.shape != shape:
        raise ValueError(f"{fn}: running_mean and running_var must have the same shape (C,); "
                         f"got {mean.shape} and {var.shape}.")
    count = source.get("num_batches_tracked")
    count = 0 if count is None else int(_to_numpy(count))
    scale = bias = None
    if "weight" in source:
        scale = _to_numpy(source["weight"]).astype(np.float32)
        bias = _to_numpy(source["bias"]).astype(np.float32)
        if scale.shape != shape or bias.shape != shape:
            raise ValueError(f"{fn}: weight {scale.shape} and bias {bias.shape} must have the "
                             f"shape {shape} of running_mean.")
        scale, bias = jnp.asarray(scale), jnp.asarray(bias)
    params = BatchNormParams(scale, bias)
    state = BatchNormState(jnp.asarray(mean), jnp.asarray(var), jnp.asarray(count, jnp.int32))
    return params, state


def batch_norm_kwargs_from_torch(module: Any) -> dict[str, Any]:
    """Keyword arguments that make ``dropnorm.batch_norm`` behave like ``module``.

    Returns ``{"axis": 1, "momentum": 1 - module.momentum (or None), "epsilon":
    module.eps, "unbiased_running_var": True}``: PyTorch's channels are dimension
    1 (NC, NCL, NCHW, NCDHW), its momentum weighs the new batch where dropnorm's
    weighs the old average, and its running variance is unbiased.

    Args:
      module: a ``torch.nn.BatchNorm1d``, ``BatchNorm2d`` or ``BatchNorm3d``.

    Returns:
      A dict of keyword arguments for :func:`dropnorm.batch_norm`.

    Raises:
      TypeError: if ``module`` is not a PyTorch batch-norm module.

    Examples:
      >>> import torch
      >>> from dropnorm.interop import batch_norm_kwargs_from_torch
      >>> kw = batch_norm_kwargs_from_torch(torch.nn.BatchNorm2d(8, momentum=0.1, eps=1e-3))
      >>> kw["axis"], round(kw["momentum"], 6), kw["epsilon"], kw["unbiased_running_var"]
      (1, 0.9, 0.001, True)

    References:
      PyTorch documentation, ``torch.nn.BatchNorm2d`` (the momentum note).
    """
    if not _is_torch_batch_norm(module):
        raise TypeError(f"batch_norm_kwargs_from_torch: expected a torch.nn.BatchNorm1d/2d/3d "
                        f"module; got {type(module).__name__}.")
    momentum = None if module.momentum is None else 1.0 - float(module.momentum)
    return {"axis": 1, "momentum": momentum, "epsilon": float(module.eps),
            "unbiased_running_var": True}


def _check_pair(fn: str, params: Any, state: Any) -> tuple[Any, Any]:
    if not isinstance(state, BatchNormState):
        raise TypeError(f"{fn}: `state` must be a dropnorm.BatchNormState; got "
                        f"{type(state).__name__}.")
    if params is None:
        params = BatchNormParams(None, None)
    if not isinstance(params, BatchNormParams):
        raise TypeError(f"{fn}: `params` must be a dropnorm.BatchNormParams or None; got "
                        f"{type(params).__name__}.")
    return params, state


def batch_norm_to_torch(params: BatchNormParams | None, state: BatchNormState, *,
                        as_tensors: bool = False) -> dict[str, Any]:
    """Convert ``(params, state)`` to a PyTorch ``BatchNorm*d`` state dict.

    Keys: ``weight`` and ``bias`` (omitted when both are None, for a module with
    ``affine=False``; if only one is None it is written as ones or zeros, which
    computes the same function), ``running_mean``, ``running_var`` (float32) and
    ``num_batches_tracked`` (int64 scalar, from ``count``). The running variance
    is written as it is: it matches PyTorch's unbiased convention if the state
    was trained with ``unbiased_running_var=True`` (or came from
    :func:`batch_norm_from_torch`).

    ``Module.load_state_dict`` accepts tensors only: pass ``as_tensors=True``, or
    wrap the arrays with ``torch.from_numpy``.

    Args:
      params: ``BatchNormParams`` or None.
      state: ``BatchNormState`` with feature shape ``(C,)``.
      as_tensors: return torch tensors (imports torch) instead of NumPy arrays.

    Returns:
      A dict of writable NumPy arrays (or torch tensors) keyed like
      ``BatchNorm*d.state_dict()``.

    Raises:
      TypeError: for arguments that are not dropnorm params/state.
      ValueError: for a feature shape other than ``(C,)`` (PyTorch batch norms
        have one channel axis).
      ImportError: if ``as_tensors=True`` and torch cannot be imported.

    Examples:
      >>> import dropnorm
      >>> from dropnorm.interop import batch_norm_to_torch
      >>> sd = batch_norm_to_torch(*dropnorm.batch_norm_init(2))
      >>> sorted(sd), sd["running_var"].tolist(), int(sd["num_batches_tracked"])
      (['bias', 'num_batches_tracked', 'running_mean', 'running_var', 'weight'], [1.0, 1.0], 0)

    References:
      PyTorch documentation, ``torch.nn.Module.load_state_dict``.
    """
    fn = "batch_norm_to_torch"
    params, state = _check_pair(fn, params, state)
    mean = np.array(state.mean, np.float32)  # np.array copies: writable, as torch wants
    if mean.ndim != 1:
        raise ValueError(
            f"{fn}: PyTorch batch norms have one channel axis, but the state's feature shape is "
            f"{mean.shape}. Reshape the statistics to ({mean.size},) and normalise over a single "
            f"feature axis."
        )
    out: dict[str, Any] = {}
    if params.scale is not None or params.bias is not None:
        scale = np.ones_like(mean) if params.scale is None else np.array(params.scale, np.float32)
        bias = np.zeros_like(mean) if params.bias is None else np.array(params.bias, np.float32)
        if scale.shape != mean.shape or bias.shape != mean.shape:
            raise ValueError(f"{fn}: params.scale {scale.shape} and params.bias {bias.shape} must "
                             f"have the statistics' shape {mean.shape}.")
        out["weight"], out["bias"] = scale, bias
    out["running_mean"] = mean
    out["running_var"] = np.array(state.var, np.float32)
    out["num_batches_tracked"] = np.array(int(state.count), np.int64)
    if as_tensors:
        torch = _import_torch()
        out = {k: torch.from_numpy(v) for k, v in out.items()}
    return out


def batch_norm_from_flax(variables: Mapping[str, Any], *,
                         count: int = 0) -> tuple[BatchNormParams, BatchNormState]:
    """Convert a ``flax.linen.BatchNorm``'s variables to ``(params, state)``.

    ``{'params': {'scale', 'bias'}, 'batch_stats': {'mean', 'var'}}`` becomes
    ``BatchNormParams(scale, bias)`` and ``BatchNormState(mean, var, count)``.
    A layer built with ``use_scale=False`` or ``use_bias=False`` lacks that
    parameter (and the whole ``'params'`` entry when both are off): it becomes
    None. Flax's conventions are dropnorm's (momentum, biased running variance,
    epsilon 1e-5, ``axis=-1``), so no flag changes. Flax keeps no update count:
    ``count`` becomes the ``count`` argument (0 by default), which matters only
    for ``momentum=None``, where the next batch then replaces the statistics.

    Args:
      variables: the layer's variables (pass ``variables['params']['BatchNorm_0']``
        and its ``batch_stats`` sibling for a layer inside a model, as a dict of
        the two collections). A ``FrozenDict`` works too.
      count: the number of updates to record in ``state.count``.

    Returns:
      ``(BatchNormParams, BatchNormState)``; statistics in float32.

    Raises:
      ValueError: if ``batch_stats`` or its ``mean``/``var`` are missing (a layer
        that was never initialised, or a subtree of the wrong layer).

    Examples:
      >>> import jax.numpy as jnp
      >>> from dropnorm.interop import batch_norm_from_flax
      >>> v = {"params": {"scale": jnp.ones(2), "bias": jnp.zeros(2)},
      ...      "batch_stats": {"mean": jnp.zeros(2), "var": jnp.ones(2)}}
      >>> params, state = batch_norm_from_flax(v)
      >>> params.scale.tolist(), int(state.count)
      ([1.0, 1.0], 0)

    References:
      Flax documentation, ``flax.linen.BatchNorm``.
    """
    fn = "batch_norm_from_flax"
    if not isinstance(variables, Mapping):
        raise TypeError(f"{fn}: `variables` must be a mapping like {{'params': ..., "
                        f"'batch_stats': ...}}; got {type(variables).__name__}.")
    stats = variables.get("batch_stats")
    if not isinstance(stats, Mapping) or "mean" not in stats or "var" not in stats:
        raise ValueError(
            f"{fn}: `variables` must have variables['batch_stats']['mean'] and ['var'] (a "
            f"flax.linen.BatchNorm's variables); got top-level keys {sorted(variables)}. For a "
            f"layer inside a model pass {{'params': v['params']['<name>'], 'batch_stats': "
            f"v['batch_stats']['<name>']}}."
        )
    p = variables.get("params", {}) or {}
    unknown = sorted(set(p) - {"scale", "bias"})
    if unknown:
        raise ValueError(f"{fn}: variables['params'] has keys {unknown}; a BatchNorm has only "
                         f"'scale' and 'bias'. Pass the batch norm's own subtree.")
    scale = None if "scale" not in p else jnp.asarray(p["scale"])
    bias = None if "bias" not in p else jnp.asarray(p["bias"])
    state = BatchNormState(jnp.asarray(stats["mean"], jnp.float32),
                           jnp.asarray(stats["var"], jnp.float32),
                           jnp.asarray(count, jnp.int32))
    return BatchNormParams(scale, bias), state


def batch_norm_to_flax(params: BatchNormParams | None,
                       state: BatchNormState) -> dict[str, dict[str, Any]]:
    """Convert ``(params, state)`` to a ``flax.linen.BatchNorm`` variable tree.

    Returns ``{'params': {'scale', 'bias'}, 'batch_stats': {'mean', 'var'}}``,
    leaving out a parameter that is None (and ``'params'`` when both are, as
    Flax does for ``use_scale=False, use_bias=False``). ``state.count`` is
    dropped: Flax has nowhere to keep it.

    Args:
      params: ``BatchNormParams`` or None.
      state: ``BatchNormState``.

    Returns:
      A dict usable as ``module.apply(variables, x, use_running_average=True)``.

    Raises:
      TypeError: for arguments that are not dropnorm params/state.

    Examples:
      >>> import dropnorm
      >>> from dropnorm.interop import batch_norm_to_flax
      >>> v = batch_norm_to_flax(*dropnorm.batch_norm_init(3, use_bias=False))
      >>> sorted(v["params"]), sorted(v["batch_stats"])
      (['scale'], ['mean', 'var'])

    References:
      Flax documentation, ``flax.linen.BatchNorm``.
    """
    params, state = _check_pair("batch_norm_to_flax", params, state)
    out: dict[str, dict[str, Any]] = {}
    p = {name: jnp.asarray(value) for name, value in
         (("scale", params.scale), ("bias", params.bias)) if value is not None}
    if p:
        out["params"] = p
    out["batch_stats"] = {"mean": jnp.asarray(state.mean), "var": jnp.asarray(state.var)}
    return out
