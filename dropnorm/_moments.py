"""Batch moments: exact shifted statistics, padding masks, O(features) across devices.

Locally, the sums of the deviations from a shift and of their squares, in one pass over
``x``; the shift (the mean of the batch's first 1/64) is within 8 standard
deviations of the mean whatever the data, so the correction amplifies the sums'
rounding by at most a factor 65, never by the data's magnitude: a constant feature gets exactly its
value as mean and exactly 0 as variance, the variance stays accurate when
``|mean| >> std`` and is never negative. The one-pass ``E[x^2] - E[x]^2`` (Flax's
default) reads ``x`` as often and loses every digit when ``|mean| >> std``.

Across devices, two ``psum``s of O(features) numbers, whatever the number of devices:
the weighted means (and the counts, when a mask makes them data-dependent) give a
common centre ``c``; then each device's centred first and second moments about ``c``
combine exactly (Chan et al.'s pairwise formula, written about ``c``), with every
device's mean kept as ``shift + mean_d`` so that nothing is rounded at the data's
magnitude before the deviations between devices are formed. Devices with different
numbers of valid (unmasked) elements are weighted correctly, and devices whose data
sit at very different means do not bias the variance. A ``psum`` is replicated, so the
new running statistics can leave ``shard_map`` with ``out_specs=P()``; over ``vmap``
axes it costs no communication.

``axis_index_groups`` is implemented here rather than passed to JAX, because JAX
supports it in ``pmap`` only (``vmap`` collectives and ``psum`` under ``shard_map``
raise ``NotImplementedError`` for it in JAX 0.10): each device writes its sums into
its group's row of a ``(groups, ...)`` array and the same two ``psum``s run on that,
so groups (of any sizes) cost O(groups x features), never O(devices x features), and
work the same under ``shard_map``, ``pmap`` and ``vmap``. Ghost batches that span
several devices are groups of consecutive devices; when they span a power of two of
them, their sums take ``log2(span)`` pairwise exchanges (``ppermute``) of O(features)
numbers instead, independent of the device count.

References:
  Chan, Golub & LeVeque, "Updating Formulae and a Pairwise Algorithm for
  Computing Sample Variances", 1979; "Algorithms for computing the sample variance:
  analysis and recommendations", 1983. Hoffer, Hubara & Soudry, "Train longer,
  generalize better: closing the generalization gap in large batch training of
  neural networks" (ghost batch normalisation), NeurIPS 2017.
"""

from __future__ import annotations

import math
from collections.abc import Hashable, Sequence
from typing import NamedTuple

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


def real_dtype(dtype) -> jnp.dtype:
    """The real dtype of the statistics: float32 for float32 and complex64 alike."""
    return jnp.finfo(stats_dtype(dtype)).dtype


def abs2(d):
    """``|d|^2``, real, for real and complex ``d``."""
    if jnp.iscomplexobj(d):
        return jnp.square(d.real) + jnp.square(d.imag)
    return jnp.square(d)


def re_dot(a, t):
    """``Re(conj(a) t)``: the real inner product's summand, for real and complex arrays."""
    if jnp.iscomplexobj(a) or jnp.iscomplexobj(t):
        return a.real * t.real + a.imag * t.imag
    return a * t


class Reducer(NamedTuple):
    """How per-feature local sums become global ones (static, hashable).

    ``names`` None: local statistics. Otherwise sums run over the devices of ``names``;
    with ``ids`` (the group of each device, by linear index over ``names``) they run over
    the device's group only, as one ``psum`` of a ``(n_groups, ...)`` array. Groups of
    ``span`` consecutive devices (ghost batches that span devices), ``span`` a power of
    two, are summed by recursive doubling instead: ``log2(span)`` exchanges of the
    O(features) sums with a partner device (``ppermute``), whatever the device count.
    """

    names: tuple[Hashable, ...] | None = None
    ids: tuple[int, ...] | None = None
    n_groups: int = 1
    size: int = 1  # devices along names
    span: int = 1  # groups are blocks of `span` consecutive devices (ghost batches)

    def total(self, v):
        """The sum of ``v`` (a pytree of arrays) over this device's group."""
        if self.names is None:
            return v
        if self.ids is None:
            return lax.psum(v, self.names)
        if self.span > 1 and self.span & (self.span - 1) == 0:
            step = 1
            while step < self.span:  # after round r, each holds its block of 2**r's sum
                perm = [(i, i ^ step) for i in range(self.size)]
                v = jax.tree.map(lambda a, p=perm: a + lax.ppermute(a, self.names, p), v)
                step *= 2
            return v
        mine = jnp.asarray(self.ids, jnp.int32)[lax.axis_index(self.names)]
        full = self.total_by_group(v, mine)
        return jax.tree.map(lambda a: lax.dynamic_index_in_dim(a, mine, 0, keepdims=False),
                            full)

    def total_by_group(self, v, mine=None):
        """``(n_groups, ...)``: every group's sum of ``v``, on every device (one ``psum``)."""
        if mine is None:
            mine = jnp.asarray(self.ids, jnp.int32)[lax.axis_index(self.names)]
        onehot = jnp.arange(self.n_groups) == mine
        return lax.psum(jax.tree.map(
            lambda a: jnp.where(onehot.reshape((-1,) + (1,) * a.ndim), a[None],
                                jnp.zeros((), a.dtype)), v), self.names)


def reducer(axis_name, axis_index_groups, fn: str, span: int = 1) -> Reducer:
    """The :class:`Reducer` for ``axis_name`` (checked and bound) and its groups.

    ``span > 1``: groups of ``span`` consecutive devices (ghost batches spanning devices).
    """
    names = check_axis_name(axis_name, fn)
    groups = check_axis_index_groups(axis_index_groups, names, fn)
    if names is None:
        return Reducer()
    size = _axis_size(names, fn)
    if groups is not None:
        ids = _group_ids(groups, size, fn)
        return Reducer(names, tuple(int(i) for i in ids), len(groups), size)
    if span > 1:
        return Reducer(names, tuple(d // span for d in range(size)), size // span, size, span)
    return Reducer(names, None, 1, size)


def _sums(xf, reduction_axes, mask, centre):
    """``(S1, S2)``: the sums of ``d = x - centre`` and ``|d|^2`` over the valid elements.

    The two subtractions are spelled apart on purpose: XLA would otherwise merge them and,
    the difference then having two consumers, write it out as an input-sized temporary;
    spelled apart, each sum fuses its own subtraction and reads only x (XLA CPU, (4096,
    4096) float32: 7.4 ms instead of 25 ms for the statistics; BENCHMARKS.md).
    """
    d, d_sq = xf - centre, xf + (-centre)
    if mask is not None:
        zero = jnp.zeros((), xf.dtype)
        d, d_sq = jnp.where(mask, d, zero), jnp.where(mask, d_sq, zero)
    return (jnp.sum(d, reduction_axes, keepdims=True),
            jnp.sum(abs2(d_sq), reduction_axes, keepdims=True))


# The shift of the unmasked statistics is the mean of the first 1/SUBSAMPLE of the batch (at
# least one row): see local_moments. 16 cost 0.88x Flax's forward at (256, 56, 56, 64) float32
# against 0.94x for 64 (the slice is copied before it is summed); the bound below is 64.
SUBSAMPLE = 64


def _subsample_shift(x, reduction_axes):
    """A per-feature shift within ``sqrt(SUBSAMPLE) * std`` of the mean, from a slice of x.

    The mean of the first ``ceil(b / SUBSAMPLE)`` rows along the first reduction axis (of
    size ``b``), written as ``x0 + mean(rows - x0)`` with ``x0`` the first element, so
    that a constant feature gets exactly its value. For any ``m`` of the ``n`` elements,
    ``(mean_m - mean)^2 <= (1/m) sum_m (x_i - mean)^2 <= (n/m) var`` (Cauchy-Schwarz), and
    ``n/m <= SUBSAMPLE`` here.

    The slices are taken from ``x`` behind an optimisation barrier: a second user of ``x``
    otherwise makes XLA CPU share ``x.astype(float32)`` between the slice and the
    statistics, and write that float32 copy of a bfloat16 input out in full (one more
    input-sized pass; (4096, 4096) bfloat16 forward: 0.5-0.6x Flax's time instead of 1x).
    """
    dt = stats_dtype(x.dtype)
    a = reduction_axes[0]
    rows = -(-x.shape[a] // SUBSAMPLE)
    xb = lax.optimization_barrier(x)
    head = lax.slice_in_dim(xb, 0, rows, axis=a).astype(dt)
    x0 = lax.slice(head, (0,) * x.ndim, tuple(1 if i in reduction_axes else n
                                              for i, n in enumerate(head.shape)))
    if rows == 1 and head.shape == x0.shape:
        return x0
    return x0 + jnp.mean(head - x0, reduction_axes, keepdims=True)


def local_moments(x, reduction_axes, mask):
    """This device's ``(count, shift, mean_d, M2)``, each of x's rank (size 1 when reduced).

    Sums of the deviations ``d = x - shift`` and of their squares: the mean is
    ``shift + mean(d)`` and ``M2 = sum(|d|^2) - n |mean(d)|^2``, kept as the pair
    ``(shift, mean_d)`` so that combining devices does not round each device's mean first.
    How much the correction ``n |mean(d)|^2`` cancels depends on how far ``shift`` is
    from the mean, in units of the spread: the variance's relative rounding error is
    about ``(1 + r) u`` (``u`` the summation's relative error) with
    ``r = |mean - shift|^2 / var``.

    Without a mask, one pass over ``x``: ``shift`` is the mean of the first
    ``1/SUBSAMPLE`` of the batch (:func:`_subsample_shift`), so ``r <= SUBSAMPLE = 64``
    whatever the data (Cauchy-Schwarz; typically ``r ~ 1/m``), which keeps the variance
    accurate when ``|mean| >> std`` (Flax's ``E[x^2] - E[x]^2`` has ``r = mean^2 / var``)
    and reads ``x`` ``1 + 1/64`` times instead of twice. A constant feature gets exactly
    its value as mean and 0 as M2.

    With a mask, the corrected two-pass algorithm (Chan, Golub & LeVeque 1983): the
    shift is the mean of the valid elements (a first pass), so ``r`` is only that
    pass's rounding (no bound like the one above holds for a slice of a masked batch).

    (Two designs measured and dropped: the two-pass form for every input reads ``x`` a
    third time, 0.68-0.85x Flax's forward on this CPU; a one-pass variant around one
    data element with a ``lax.cond`` for a second pass when that element is an outlier
    added 14 fusions per layer to the compiled 12-layer training step, 642 against
    Flax's 474.)
    """
    dt = stats_dtype(x.dtype)
    rdt = real_dtype(x.dtype)
    xf = x.astype(dt)
    if mask is None:
        n = math.prod(x.shape[a] for a in reduction_axes)
        count = jnp.full((1,) * x.ndim, n, rdt)
        if reduction_axes:
            shift = lax.stop_gradient(_subsample_shift(x, reduction_axes))
        else:
            shift = lax.stop_gradient(xf)
    else:
        count = jnp.sum(mask, reduction_axes, keepdims=True, dtype=rdt)
        total = jnp.sum(jnp.where(mask, xf, jnp.zeros((), dt)), reduction_axes, keepdims=True)
        shift = lax.stop_gradient(total / jnp.maximum(count, 1.0))
    s1, s2 = _sums(xf, reduction_axes, mask, shift)
    mean_d = s1 / jnp.maximum(count, 1.0)
    m2 = s2 - count * abs2(mean_d)
    count = jnp.broadcast_to(count, mean_d.shape)
    return count, shift, mean_d, jnp.maximum(m2, 0.0)


def _stack_or_tuple(parts):
    """One array (one collective) when the dtypes agree, else a tuple."""
    if len({p.dtype for p in parts}) == 1:
        return jnp.stack(parts)
    return tuple(parts)


def _unstack(packed, n):
    return tuple(packed[i] for i in range(n)) if not isinstance(packed, tuple) else packed


def combine(local, red: Reducer, masked: bool, by_group: bool = False):
    """Global ``(count, mean, M2)`` from every device's ``(count, shift, mean_d, M2)``.

    Two collectives of O(features) numbers, whatever the number of devices:

    1. ``c = sum(n_i m_i) / N`` with ``m_i = shift_i + mean_d_i`` (one ``psum`` of the
       weighted sums, plus the counts when a mask makes them data-dependent). ``c`` is
       the global mean up to rounding at the data's magnitude.
    2. With ``e_i = (shift_i - c) + mean_d_i`` (exact where it matters: ``shift_i - c``
       is exact for values within a factor 2 of each other), one ``psum`` of
       ``n_i e_i`` and ``M2_i + n_i |e_i|^2``: ``mean = c + E1 / N`` and
       ``M2 = E2 - N |E1 / N|^2``, Chan et al.'s exact combination written about ``c``;
       the correction ``|E1 / N|`` is only the rounding of step 1, so it cancels nothing.

    With ``by_group`` the result has a leading ``(n_groups,)`` axis: every group's
    statistics on every device (ghost batches need them all for the running average).
    """
    count, shift, mean_d, m2 = local
    mean_i = shift + mean_d
    if red.names is None:
        return count, mean_i, m2
    total = red.total_by_group if by_group else red.total
    if masked or (red.ids is not None and red.span == 1):  # data- or group-dependent counts
        n_total, weighted = _unstack(total(_stack_or_tuple([count, count * mean_i])), 2)
    else:  # the count is the same static number on every device (of every group)
        n_total = count * (red.size if red.ids is None else red.span)
        weighted = total(count * mean_i)
    n_total = n_total.real if jnp.iscomplexobj(n_total) else n_total
    safe = jnp.maximum(n_total, 1.0)
    centre = lax.stop_gradient(weighted / safe)
    e = (shift - centre) + mean_d
    e = jnp.where(count > 0, e, jnp.zeros((), e.dtype))
    e1, e2 = _unstack(total(_stack_or_tuple([count * e, (m2 + count * abs2(e)).astype(e.dtype)])),
                      2)
    e2 = e2.real if jnp.iscomplexobj(e2) else e2
    mean_rel = e1 / safe
    mean = jnp.where(n_total > 0, centre + mean_rel, jnp.zeros((), mean_rel.dtype))
    return n_total, mean, jnp.maximum(e2 - n_total * abs2(mean_rel), 0.0)


def batch_moments(x, reduction_axes, *, mask=None, red: Reducer | None = None):
    """Per-feature mean, biased variance and element count over ``reduction_axes``.

    Args:
      x: the input (real or complex floating).
      reduction_axes: the axes to reduce (all non-feature axes; may be empty when the
        batch is a mapped axis, e.g. one example per ``vmap`` lane).
      mask: None, or a boolean array of ``x``'s shape; False elements are left out.
      red: a :class:`Reducer` (from :func:`reducer`): statistics over devices as well.

    Returns:
      ``(mean, var, count)``, each with ``x``'s rank (size 1 along the reduced axes):
      the mean in ``stats_dtype(x.dtype)`` (complex for complex ``x``), the variance
      ``E|x - mean|^2`` and the count real. Features with no valid element get mean 0,
      variance 0 and count 0.
    """
    red = Reducer() if red is None else red
    count, mean, m2 = combine(local_moments(x, reduction_axes, mask), red, mask is not None)
    return mean, m2 / jnp.maximum(count, 1.0), count


def ghost_layout(x_shape, reduction_axes, virtual_batch_size: int, size: int, distributed: bool,
                 fn: str):
    """``(chunks, span)`` for ghost batches of ``virtual_batch_size`` along axis 0.

    The ghost batches are consecutive chunks of the (global) batch, wherever its pieces
    live: with ``axis_name``, device ``d`` holds the ``d``-th consecutive piece of the
    batch (as ``shard_map`` with ``P(axis_name)`` and ``pmap`` over a reshaped batch lay
    it out). When the local batch is a multiple of ``virtual_batch_size`` each device's
    ``chunks`` are its own (``span`` 1); when ``virtual_batch_size`` is a multiple of the
    local batch, each ghost batch spans ``span`` consecutive devices (``chunks`` 1).
    """
    b, v = x_shape[0], virtual_batch_size
    if b % v == 0:
        return b // v, 1
    if distributed and v % b == 0 and size % (v // b) == 0:
        return 1, v // b
    where = " on each device" if distributed else ""
    hint = f"; pick a divisor of {b}" if not distributed else (
        f" and the {size} devices do not group into ghost batches of {v} either; pick a "
        f"divisor of {b}, or a multiple of {b} that divides the global batch of {b * size}")
    raise ValueError(
        f"{fn}: the batch of {b}{where} does not divide into ghost batches of "
        f"`virtual_batch_size`={v}{hint}."
    )


def merge_moments(count_a, mean_a, m2_a, count_b, mean_b, m2_b):
    """Chan's pairwise update: ``(count, mean, M2)`` of two sets of values together.

    Per feature, both means taken about the same centre (the caller subtracts it from
    the data first, so that no mean is rounded at the data's magnitude). With
    ``n = n_a + n_b`` and ``delta = mean_b - mean_a``: ``mean = mean_a + delta n_b / n``
    and ``M2 = M2_a + M2_b + |delta|^2 n_a n_b / n`` (Chan, Golub & LeVeque 1979), a sum
    of non-negative terms: nothing cancels. An empty set (count 0) changes nothing.
    """
    n = count_a + count_b
    delta = mean_b - mean_a
    w = count_b / jnp.maximum(n, 1.0)
    return n, mean_a + delta * w, m2_a + m2_b + abs2(delta) * (count_a * w)
