"""Batch moments: exact two-pass statistics, padding masks, one collective across devices.

The variance is computed in two passes (mean, then mean of squared deviations)
in at least float32, on deviations from a data-derived shift (each feature's
first valid element). Unlike the one-pass ``E[x^2] - E[x]^2`` (Flax's default),
this stays accurate when ``|mean| >> std`` and can never be negative; a constant
feature gets exactly its value as mean and exactly 0 as variance.

Across devices, each device contributes ``(count, shift, mean_d, M2)``, its mean
being ``shift + mean_d`` and ``M2`` its centred sum of squares; one collective
brings every device's numbers to every device, and Chan et al.'s pairwise
formula combines them exactly: ``mean = sum(n_i mean_i) / N``,
``M2 = sum(M2_i) + sum(n_i (mean_i - mean)^2)``, with every ``mean_i`` taken
relative to one reference shift so that none is rounded at the magnitude of the
data first. Devices with different numbers of valid (unmasked) elements are
therefore weighted correctly, and no device's local centring biases the result.

Over device axes (``shard_map``, ``pmap``) the collective is one ``lax.psum``
of the triples placed at each device's linear index, which every device receives
whole: ``4 * devices * features`` numbers, small next to the activations for the
usual tens to hundreds of devices. A ``psum`` (unlike ``all_gather``) gives a
replicated result, so the new running statistics can leave ``shard_map`` with
``out_specs=P()``. Over ``vmap`` axes the triples are gathered with
``lax.all_gather``, which costs no communication.

``axis_index_groups`` is implemented here rather than passed to JAX, because JAX
supports it in ``pmap`` only (``vmap`` collectives and ``psum`` under ``shard_map``
raise ``NotImplementedError`` for it in JAX 0.10): after the one
collective, each device gives weight 0 to the triples of devices outside its
group. The same code therefore gives per-group statistics under ``shard_map``,
``pmap`` and ``vmap`` alike, and groups may have different sizes.

References:
  Chan, Golub & LeVeque, "Updating Formulae and a Pairwise Algorithm for
  Computing Sample Variances", 1979. Hoffer, Hubara & Soudry, "Train longer,
  generalize better: closing the generalization gap in large batch training of
  neural networks" (ghost batch normalisation), NeurIPS 2017.
"""

from __future__ import annotations

import math
from collections.abc import Hashable, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax


def stats_dtype(dtype) -> jnp.dtype:
    """The dtype statistics are accumulated in: at least float32."""
    return jnp.promote_types(dtype, jnp.float32)


def check_axis_name(axis_name, fn: str) -> tuple[Hashable, ...] | None:
    """None, or the axis names as a non-empty tuple (a single name becomes a 1-tuple)."""
    if axis_name is None:
        return None
    names = axis_name if isinstance(axis_name, tuple) else (axis_name,)
    bad = not names or any(
        n is None or isinstance(n, (list, dict, set, tuple)) or not isinstance(n, Hashable)
        for n in names
    )
    if bad:
        raise TypeError(
            f"{fn}: `axis_name` must be the name of a mapped axis (a string, as given to "
            f"shard_map's mesh, pmap or vmap) or a non-empty tuple of names; got {axis_name!r}. "
            f"Under a sharded jax.jit leave it None: XLA then reduces across devices by itself."
        )
    return names


def check_axis_index_groups(groups, names, fn: str) -> tuple[tuple[int, ...], ...] | None:
    """Structural check of ``axis_index_groups`` (the axis size is checked once known)."""
    if groups is None:
        return None
    if names is None:
        raise ValueError(
            f"{fn}: `axis_index_groups`={groups!r} needs `axis_name`: groups are sets of "
            f"device indices along that mapped axis."
        )
    msg = (f"{fn}: `axis_index_groups` must be a non-empty sequence of non-empty sequences of "
           f"device indices, e.g. [[0, 1], [2, 3]]; got {groups!r}.")
    if isinstance(groups, (str, bytes)) or not isinstance(groups, Sequence) or not groups:
        raise TypeError(msg)
    out = []
    for g in groups:
        if isinstance(g, (str, bytes)) or not isinstance(g, (Sequence, np.ndarray)) or not len(g):
            raise TypeError(msg)
        for i in g:
            if isinstance(i, (bool, np.bool_)) or not isinstance(i, (int, np.integer)):
                raise TypeError(msg)
        out.append(tuple(int(i) for i in g))
    return tuple(out)


def _axis_size(names, fn: str) -> int:
    try:
        return int(lax.axis_size(names))
    except NameError:
        raise ValueError(
            f"{fn}: `axis_name`={names if len(names) > 1 else names[0]!r} is not bound: call "
            f"it inside shard_map, pmap or vmap over an axis of that name. Under a plain or "
            f"sharded jax.jit leave `axis_name` None: XLA then reduces across devices by itself."
        ) from None


def _group_ids(groups, size: int, fn: str) -> np.ndarray:
    """``ids[d]`` is the group of device ``d``; every index must appear exactly once."""
    ids = np.full(size, -1, np.int32)
    for k, g in enumerate(groups):
        for i in g:
            if not 0 <= i < size:
                raise ValueError(
                    f"{fn}: `axis_index_groups`={groups!r} contains index {i}, but the axis "
                    f"has {size} devices (indices 0 to {size - 1})."
                )
            if ids[i] >= 0:
                raise ValueError(
                    f"{fn}: `axis_index_groups`={groups!r} lists device {i} twice; each device "
                    f"must be in exactly one group."
                )
            ids[i] = k
    missing = [int(i) for i in np.flatnonzero(ids < 0)]
    if missing:
        raise ValueError(
            f"{fn}: `axis_index_groups`={groups!r} leaves out devices {missing}; the groups must "
            f"cover all {size} devices of the axis, each exactly once."
        )
    return ids


def _local(x, reduction_axes, mask):
    """This device's ``(count, shift, mean_d, M2)``, each of x's rank (size 1 when reduced).

    The corrected two-pass algorithm (Chan, Golub & LeVeque 1983): the first pass
    gives a rough mean, the ``shift``; the second sums the deviations ``d = x - shift``
    and their squares. The mean is ``shift + mean(d)`` and
    ``M2 = sum(d^2) - n mean(d)^2``, where ``mean(d)`` is only the rounding error
    of the first pass, so the correction cancels nothing. A constant feature gets
    exactly its value as mean and 0 as M2, deviations stay of the order of the
    spread when ``|mean| >> std``, and both sums read the same deviations (one
    temporary, as in the textbook two-pass form). The pair is kept apart until
    the end, so that combining devices does not round each device's mean first.
    """
    dt = stats_dtype(x.dtype)
    xf = x.astype(dt)
    if mask is None:
        n = math.prod(x.shape[a] for a in reduction_axes)
        count = jnp.full((1,) * x.ndim, n, dt)
        shift = lax.stop_gradient(jnp.mean(xf, reduction_axes, keepdims=True))
        d, d_sq = xf - shift, xf + (-shift)
    else:
        count = jnp.sum(mask, reduction_axes, keepdims=True, dtype=dt)
        total = jnp.sum(jnp.where(mask, xf, 0.0), reduction_axes, keepdims=True)
        shift = lax.stop_gradient(total / jnp.maximum(count, 1.0))
        d, d_sq = jnp.where(mask, xf - shift, 0.0), jnp.where(mask, xf + (-shift), 0.0)
    # ``d_sq`` equals ``d`` but is spelled differently on purpose: XLA would otherwise merge
    # the two and, the subtraction then having two consumers, write it out as an input-sized
    # temporary; spelled apart, each sum fuses its own subtraction and reads only x (XLA CPU,
    # (4096, 4096) float32: 7.4 ms instead of 25 ms for the statistics; BENCHMARKS.md).
    safe = jnp.maximum(count, 1.0)
    mean_d = jnp.sum(d, reduction_axes, keepdims=True) / safe
    m2 = jnp.sum(jnp.square(d_sq), reduction_axes, keepdims=True) - count * jnp.square(mean_d)
    count = jnp.broadcast_to(count, mean_d.shape)
    return count, shift, mean_d, jnp.maximum(m2, 0.0)


def _manual_axes() -> frozenset:
    """Names of the device axes of an enclosing ``shard_map`` or ``pmap`` (not ``vmap`` axes)."""
    get = getattr(jax.sharding, "get_abstract_mesh", None)
    return frozenset(getattr(get(), "manual_axes", ()) if get is not None else ())


def _gather(triple, names, size: int):
    """``(size, *triple.shape)``: device ``d``'s triple at its linear index ``d`` over ``names``.

    Device axes (``shard_map``, ``pmap``) are gathered by ONE ``psum`` of the triple placed
    at the device's index: unlike ``all_gather``, whose result ``shard_map`` types as varying,
    a ``psum`` is replicated, so the new state can leave ``shard_map`` with ``out_specs=P()``.
    ``vmap`` axes are gathered with ``all_gather``, which ``vmap`` turns into a reshape (no
    communication, and no ``size``-fold copy per lane).
    """
    manual = _manual_axes()
    dev = tuple(n for n in names if n in manual)
    out, lead = triple, []
    if dev:
        n_dev = math.prod(lax.axis_size(n) for n in dev)
        onehot = jnp.arange(n_dev) == lax.axis_index(dev)
        out = lax.psum(jnp.where(onehot.reshape((n_dev,) + (1,) * triple.ndim), triple, 0.0), dev)
        out = out.reshape(tuple(lax.axis_size(n) for n in dev) + triple.shape)
        lead = list(dev)
    for n in reversed([n for n in names if n not in manual]):
        out = lax.all_gather(out, n)
        lead.insert(0, n)
    perm = [lead.index(n) for n in names]
    out = jnp.transpose(out, perm + list(range(len(lead), out.ndim)))
    return out.reshape((size,) + triple.shape)


def _combine(counts, shifts, mean_ds, m2s, axis: int):
    """Chan's exact pairwise combination along ``axis``: ``(count, mean, M2)``.

    Each part's mean is ``shift + mean_d``; all are taken relative to one reference
    shift (the first part with data), ``(shift - ref) + mean_d``, which is exact for
    shifts within a factor 2 of each other, so no part's mean is rounded at the
    magnitude of the data before the deviations between parts are formed.
    """
    count = jnp.sum(counts, axis)
    has = counts > 0
    first = jnp.expand_dims(jnp.argmax(has, axis), axis)
    ref = jnp.take_along_axis(shifts, first, axis)
    dev = jnp.where(has, (shifts - ref) + mean_ds, 0.0)
    mean_rel = jnp.sum(counts * dev, axis) / jnp.maximum(count, 1.0)
    m2 = jnp.sum(m2s, axis) + jnp.sum(
        counts * jnp.square(dev - jnp.expand_dims(mean_rel, axis)), axis)
    mean = jnp.where(count > 0, jnp.squeeze(ref, axis) + mean_rel, 0.0)
    return count, mean, m2


def _finish(count, mean, m2):
    return mean, m2 / jnp.maximum(count, 1.0), count


def batch_moments(x, reduction_axes, *, mask=None, axis_name=None, axis_index_groups=None,
                  fn: str = "batch_norm"):
    """Per-feature mean, biased variance and element count over ``reduction_axes``.

    Args:
      x: the input.
      reduction_axes: the axes to reduce (all non-feature axes; may be empty when
        ``axis_name`` is given, e.g. one example per ``vmap`` lane).
      mask: None, or a boolean array of ``x``'s shape; False elements are left out.
      axis_name: a mapped or ``shard_map`` axis name (or tuple of names) to reduce
        over as well, or None for local statistics.
      axis_index_groups: optional groups of device indices along ``axis_name``
        (linear indices for a tuple of names); statistics are then global within
        each group.
      fn: the public function's name, for error messages.

    Returns:
      ``(mean, var, count)``, each with ``x``'s rank (size 1 along the reduced
      axes), in ``stats_dtype(x.dtype)``. Features with no valid element get mean
      0, variance 0 and count 0.

    Raises:
      TypeError: malformed ``axis_name`` or ``axis_index_groups``.
      ValueError: an unbound ``axis_name``, or groups that do not partition the axis.
    """
    names = check_axis_name(axis_name, fn)
    groups = check_axis_index_groups(axis_index_groups, names, fn)
    count, shift, mean_d, m2 = _local(x, reduction_axes, mask)
    if names is None:
        return _finish(count, shift + mean_d, m2)
    size = _axis_size(names, fn)
    ids = None if groups is None else _group_ids(groups, size, fn)
    gathered = _gather(jnp.stack([count, shift, mean_d, m2]), names, size)  # (size, 4, ...)
    counts, shifts, mean_ds, m2s = (gathered[:, i] for i in range(4))
    if ids is not None:
        mine = jnp.asarray(ids)[lax.axis_index(names)]
        member = (jnp.asarray(ids) == mine).astype(counts.dtype).reshape((size,) + (1,) * x.ndim)
        counts, m2s = counts * member, m2s * member
    return _finish(*_combine(counts, shifts, mean_ds, m2s, 0))


def ghost_moments(x, reduction_axes, virtual_batch_size: int, *, mask=None, axis_name=None,
                  axis_index_groups=None, fn: str = "batch_norm"):
    """Ghost batch moments: statistics per consecutive chunk of the (global) batch axis 0.

    The ghost batches are consecutive chunks of ``virtual_batch_size`` examples of
    the global batch, wherever its pieces live: with ``axis_name``, device ``d``
    holds the ``d``-th consecutive piece of the batch (as ``shard_map`` with
    ``P(axis_name)`` and ``pmap`` over a reshaped batch lay it out), so the result
    equals the single-device computation on the whole batch. When the local batch
    is a multiple of ``virtual_batch_size`` each device's chunks are its own; when
    ``virtual_batch_size`` is a multiple of the local batch, each ghost batch spans
    that many consecutive devices.

    Args:
      x: the input; axis 0 is the batch axis.
      reduction_axes: the non-feature axes of ``x`` (must include 0).
      virtual_batch_size: the ghost batch size (a positive int).
      mask, axis_name, axis_index_groups, fn: as :func:`batch_moments`.
        ``axis_index_groups`` cannot be combined with ghost batches.

    Returns:
      ``(local, chunks)``. ``local`` is ``(mean, var, count)`` for this device's
      ghost batches, each of shape ``(c, *stats_shape)``, where ``c`` is the number
      of chunks ``x`` is split into (``x.reshape((c, -1) + x.shape[1:])``).
      ``chunks`` is ``(mean, var, count)`` of every ghost batch of the global
      batch, shape ``(chunks, *stats_shape)``, for the running-average update.

    Raises:
      ValueError: a batch that does not divide into ghost batches, or
        ``axis_index_groups`` together with ghost batches.
    """
    names = check_axis_name(axis_name, fn)
    check_axis_index_groups(axis_index_groups, names, fn)
    if axis_index_groups is not None:
        raise ValueError(
            f"{fn}: `virtual_batch_size` cannot be combined with `axis_index_groups`: ghost "
            f"batches already define which examples share statistics. Drop one of them."
        )
    b, v = x.shape[0], virtual_batch_size
    size = 1 if names is None else _axis_size(names, fn)
    where = "" if names is None else " on each device"
    if b % v == 0:  # every ghost batch lies on one device
        c = b // v
        span = 1
    elif names is not None and v % b == 0 and size % (v // b) == 0:  # one spans `span` devices
        c = 1
        span = v // b
    else:
        hint = f"; pick a divisor of {b}" if names is None else (
            f" and the {size} devices do not group into ghost batches of {v} either; pick a "
            f"divisor of {b}, or a multiple of {b} that divides the global batch of {b * size}")
        raise ValueError(
            f"{fn}: the batch of {b}{where} does not divide into ghost batches of "
            f"`virtual_batch_size`={v}{hint}."
        )
    chunked = (c, b // c) + x.shape[1:]
    xs = x.reshape(chunked)
    ms = None if mask is None else mask.reshape(chunked)
    red = tuple(a + 1 for a in reduction_axes)
    count, shift, mean_d, m2 = _local(xs, red, ms)  # (c, *stats_shape) each
    if names is None:
        local = _finish(count, shift + mean_d, m2)
        return local, local
    gathered = _gather(jnp.stack([count, shift, mean_d, m2], 1), names, size)  # (size, c, 4, .)
    if span == 1:
        chunks = gathered.reshape((size * c,) + gathered.shape[2:])
        allc = _finish(chunks[:, 0], chunks[:, 1] + chunks[:, 2], chunks[:, 3])
        return _finish(count, shift + mean_d, m2), allc
    grouped = gathered.reshape((size // span, span) + gathered.shape[2:])  # c == 1
    allc = _combine(*(grouped[:, :, i] for i in range(4)), 1)
    mine = lax.axis_index(names) // span
    local = tuple(lax.dynamic_index_in_dim(a, mine, 0, keepdims=True) for a in allc)
    return _finish(*local), _finish(*allc)
