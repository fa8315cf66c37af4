"""Batch moments: exact statistics at Flax's cost, padding masks, one collective across devices.

The sums of ``x`` and of ``|x|^2`` in one pass over ``x``, as Flax's ``E[x]``, ``E[x^2]``:
``mean = S1 / n`` and ``M2 = S2 - n |mean|^2``. Across devices they cost one collective,
``2 x features`` numbers (plus the counts when a mask makes them data-dependent), whatever
the number of devices and whatever the parallelism: an ``axis_name`` ``psum``, or the
all-reduce that XLA's partitioner inserts for a batch-sharded ``jit``. Nothing is sliced
out of the batch, so nothing is shipped between devices.

How much the correction ``n |mean|^2`` cancels depends on ``r = |mean|^2 / var``: the
variance's relative rounding error is about ``(1 + r) u`` (``u`` the summation's), which is
why Flax's formula loses every digit when ``|mean| >> std``. Here, when ``r > POOR`` (64:
some feature's mean more than 8 standard deviations from 0), a second round sums the
deviations from the first round's mean and their squares (the corrected two-pass
algorithm, Chan, Golub & LeVeque 1983), in a ``lax.cond`` whose predicate comes from the
all-reduced sums, so every device takes the same branch; its ``r`` is only the first
round's rounding, so it cancels nothing. So the variance's relative error is at most
about ``65 u`` for any data, never amplified by the data's magnitude; it is never
negative; and a constant feature gets exactly its value as mean and exactly 0 as variance.
Devices with different numbers of valid (unmasked) elements are weighted correctly, and
devices whose data sit at very different means do not bias the variance: every device
sums about the same centre, so the sums simply add.

``axis_index_groups`` is implemented here rather than passed to JAX, because JAX
supports it in ``pmap`` only (``vmap`` collectives and ``psum`` under ``shard_map``
raise ``NotImplementedError`` for it in JAX 0.10): each device writes its sums into
its group's row of a ``(groups, ...)`` array and the same ``psum`` runs on that,
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

    def group_size(self):
        """How many devices this device's sums run over: a Python int, or (groups of
        unequal sizes) an int32 scalar looked up by the device's index; no communication."""
        if self.names is None:
            return 1
        if self.ids is None:
            return self.size
        if self.span > 1:
            return self.span
        sizes = np.bincount(self.ids, minlength=self.n_groups)
        if len(set(sizes.tolist())) == 1:
            return int(sizes[0])
        return jnp.asarray(sizes[list(self.ids)], jnp.int32)[lax.axis_index(self.names)]

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


def _sums(x, dt, reduction_axes, mask, centre):
    """``(S1, S2)``: the sums of ``d = x - centre`` and ``|d|^2`` over the valid elements,
    in ``dt``; ``centre`` None: of ``x`` and ``|x|^2`` themselves (Flax's sums).

    The two subtractions are spelled apart on purpose: XLA would otherwise merge them and,
    the difference then having two consumers, write it out as an input-sized temporary;
    spelled apart, each sum fuses its own subtraction and reads only x (XLA CPU, (4096,
    4096) float32: 7.4 ms instead of 25 ms for the statistics; BENCHMARKS.md). For the
    same reason each sum converts its own x, the two taken apart by one optimisation
    barrier of the pair ``(x, x)``: a bfloat16 x's float32 copy would otherwise be shared by
    the two sums and written out in full (the statistics of a (4096, 4096) bfloat16 x:
    9.3 ms against 37 ms with the copy, XLA CPU; two separate barriers are merged).
    """
    xa, xb = lax.optimization_barrier((x, x)) if x.dtype != dt else (x, x)
    d, d_sq = xa.astype(dt), xb.astype(dt)
    if centre is not None:
        d, d_sq = d - centre, d_sq + (-centre)
    if mask is not None:
        zero = jnp.zeros((), dt)
        d, d_sq = jnp.where(mask, d, zero), jnp.where(mask, d_sq, zero)
    return (jnp.sum(d, reduction_axes, keepdims=True),
            jnp.sum(abs2(d_sq), reduction_axes, keepdims=True))


# The second round runs when, for some feature, |mean - shift|^2 > POOR * var: the first
# round's variance then carries a relative rounding error of up to (1 + POOR) u (u: the float32
# summation's relative error), the same bound the statistics have always had.
POOR = 64.0


def _total(red: Reducer, parts):
    """``red.total`` of several per-feature arrays in one collective (a stack, or a tuple
    when the dtypes differ: one tuple all-reduce). Without ``axis_name`` nothing to do: under
    a sharded ``jax.jit`` XLA reduces the sums across devices itself (and fuses them)."""
    if red.names is None:
        return parts
    if len({p.dtype for p in parts}) == 1:
        packed = red.total(jnp.stack(parts))
        return [packed[i] for i in range(len(parts))]
    return list(red.total(tuple(parts)))


def shifted_moments(x, reduction_axes, shift=None, *, mask=None, red: Reducer | None = None):
    """Per-feature ``(count, mean, M2)`` from the sums of ``x - shift`` and its squares.

    ``shift`` None (the training path): the sums of ``x`` and ``|x|^2`` themselves, Flax's
    (no subtraction per element: on XLA CPU a broadcast subtraction inside the reductions
    cost 1.5-1.9x their time at 32 features, 1.4x at 64). Otherwise a centre every device
    holds (x's rank, size 1 along ``reduction_axes``; a non-finite value counts as 0).
    One pass over ``x`` and one collective of the sums (and of the counts, with a mask):
    ``mean = shift + S1 / n`` and ``M2 = S2 - n |S1 / n|^2``. The variance's relative
    rounding error is about ``(1 + r) u`` with ``r = |mean - shift|^2 / var``; when
    ``r > POOR`` for some feature, a second round sums the deviations from the now-known
    mean, which every device holds too (it comes from all-reduced sums), in a ``lax.cond``
    whose predicate comes from all-reduced values as well, so every device takes the same
    branch. Its ``r`` is only the first round's rounding, so it cancels nothing. A constant
    feature gets exactly its value as mean and exactly 0 as ``M2``: its deviations from the
    second round's centre are all one float32 ``delta`` of a few significant bits, whose
    sums are exact.
    """
    red = Reducer() if red is None else red
    dt, rdt = stats_dtype(x.dtype), real_dtype(x.dtype)
    if shift is not None:
        shift = jnp.asarray(shift).astype(dt)
        shift = lax.stop_gradient(jnp.where(jnp.isfinite(shift), shift, jnp.zeros((), dt)))

    def round_sums(centre, with_count):
        # x.astype here, in each round: the cond's branch then takes x itself as its operand,
        # not a float32 copy of a bfloat16 x that XLA would write out in full to pass it
        # ((4096, 4096) bfloat16 forward: 0.70x Flax's time with the copy).
        s1, s2 = _sums(x, dt, reduction_axes, mask, centre)
        parts = [s1, s2]
        if with_count:
            parts.append(jnp.sum(mask, reduction_axes, keepdims=True, dtype=rdt))
        return _total(red, parts)

    if mask is not None:  # data-dependent counts travel with the sums
        s1, s2, count = round_sums(shift, True)
    else:  # known without communication, even for groups of unequal sizes
        s1, s2 = round_sums(shift, False)
        n = math.prod(x.shape[a] for a in reduction_axes) * red.group_size()
        count = jnp.broadcast_to(jnp.asarray(n, rdt), s2.shape)
    safe = jnp.maximum(count, 1.0)
    mean_d = s1 / safe
    m2 = s2 - count * abs2(mean_d)
    poor = jnp.any(abs2(mean_d) * safe > POOR * m2)  # r > POOR (m2 <= 0 with mean_d != 0 too)

    mean = mean_d if shift is None else shift + mean_d

    def second_round():
        centre = lax.stop_gradient(mean)
        t1, t2 = round_sums(centre, False)
        md = t1 / safe
        return centre + md, t2 - count * abs2(md)

    mean, m2 = lax.cond(poor, second_round, lambda: (mean, m2))
    mean = jnp.where(count > 0, mean, jnp.zeros((), mean.dtype))
    return count, mean, jnp.maximum(m2, 0.0)


def batch_moments(x, reduction_axes, *, mask=None, red: Reducer | None = None, shift=None):
    """Per-feature mean, biased variance and element count over ``reduction_axes``.

    Args:
      x: the input (real or complex floating).
      reduction_axes: the axes to reduce (all non-feature axes; may be empty when the
        batch is a mapped axis, e.g. one example per ``vmap`` lane).
      mask: None, or a boolean array of ``x``'s shape; False elements are left out.
      red: a :class:`Reducer` (from :func:`reducer`): statistics over devices as well.
      shift: None, or a guess of the mean that every device holds (broadcastable to the
        statistics' shape): see :func:`shifted_moments`. Any value gives exact statistics;
        a good one saves the second round, a costly one the subtraction.

    Returns:
      ``(mean, var, count)``, each with ``x``'s rank (size 1 along the reduced axes):
      the mean in ``stats_dtype(x.dtype)`` (complex for complex ``x``), the variance
      ``E|x - mean|^2`` and the count real. Features with no valid element get mean 0,
      variance 0 and count 0.
    """
    if shift is not None:
        stats_shape = tuple(1 if a in reduction_axes else n for a, n in enumerate(x.shape))
        shift = jnp.broadcast_to(shift, stats_shape)
    count, mean, m2 = shifted_moments(x, reduction_axes, shift, mask=mask, red=red)
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
