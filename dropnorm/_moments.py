"""Batch moments: exact statistics in one pass, padding masks, one collective across devices.

The sums of the deviations from a shift and of their squares, in one pass over ``x``:
``mean = shift + S1 / n`` and ``M2 = S2 - n |S1 / n|^2``. The shift is the running mean,
a value every device already holds (replicated under a sharded ``jax.jit``, and under
``shard_map``, ``pmap`` and ``vmap`` alike), so across devices the statistics cost one
collective of the sums, ``2 x features`` numbers (plus the counts when a mask makes them
data-dependent), whatever the number of devices and whatever the parallelism: an
``axis_name`` ``psum``, or the all-reduce that XLA's partitioner inserts for a batch-sharded
``jit``. Nothing is sliced out of the batch, so nothing is shipped between devices.

How much the correction ``n |S1 / n|^2`` cancels depends on ``r = |mean - shift|^2 / var``:
the variance's relative rounding error is about ``(1 + r) u`` (``u`` the summation's). Once
training has run a while the running mean sits within a fraction of a standard deviation of
the batch's mean, whatever the data's magnitude, so ``r`` is small. When ``r > POOR`` (4)
for some feature (at the first steps of training on uncentred data, or after a shift of the
data), a second round sums the deviations from the first round's mean (the corrected
two-pass algorithm, Chan, Golub & LeVeque 1983), in a ``lax.cond`` whose predicate comes
from the all-reduced sums, so every device takes the same branch; its ``r`` is only the
first round's rounding, so it cancels nothing. So the variance's relative error is at most
about ``5 u`` for any data and any running state, never amplified by the data's magnitude
(Flax's ``E[x^2] - E[x]^2`` has ``r = mean^2 / var`` and loses every digit when
``|mean| >> std``); it is never negative; and a constant feature gets exactly its value as
mean and exactly 0 as variance. Devices with different numbers of valid (unmasked)
elements are weighted correctly, and devices whose data sit at very different means do not
bias the variance: every device sums deviations from the same shift, so the sums add.

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
        return self.total_and_every_group(v)[0]

    def total_and_every_group(self, v):
        """``(mine, every)``: the sum of ``v`` over this device's group, and, when groups are
        summed by one ``psum`` of all of them, every group's sums (a pytree of
        ``(n_groups, ...)`` arrays, the same on every device; else None). Same collective."""
        if self.names is None:
            return v, None
        if self.ids is None:
            return lax.psum(v, self.names), None
        if self.butterfly:
            step = 1
            while step < self.span:  # after round r, each holds its block of 2**r's sum
                perm = [(i, i ^ step) for i in range(self.size)]
                v = jax.tree.map(lambda a, p=perm: a + lax.ppermute(a, self.names, p), v)
                step *= 2
            return v, None
        mine = jnp.asarray(self.ids, jnp.int32)[lax.axis_index(self.names)]
        full = self.total_by_group(v, mine)
        return jax.tree.map(lambda a: lax.dynamic_index_in_dim(a, mine, 0, keepdims=False),
                            full), full

    @property
    def butterfly(self) -> bool:
        """Groups of ``span`` consecutive devices, ``span`` a power of two."""
        return self.span > 1 and self.span & (self.span - 1) == 0

    def group_sizes(self) -> np.ndarray:
        """The number of devices of each group (``ids`` not None)."""
        return np.bincount(self.ids, minlength=self.n_groups)

    def any(self, flag):
        """``flag`` (a boolean scalar, from this device's group's sums) or-ed over every
        device of ``names``, so that all take the same ``lax.cond`` branch: a branch whose
        collective spans all devices must not be taken by some only (they would wait for
        the others forever). Without groups the flag comes from values every device holds
        alike: no cost. Groups summed by recursive doubling: one ``psum`` of an int32
        scalar (grouped sums of one ``psum`` give every group's flag at no cost instead:
        :func:`shifted_moments`)."""
        if self.ids is None:
            return flag
        return lax.psum(flag.astype(jnp.int32), self.names) > 0

    def group_size(self):
        """How many devices this device's sums run over: a Python int, or (groups of
        unequal sizes) an int32 scalar looked up by the device's index; no communication."""
        if self.names is None:
            return 1
        if self.ids is None:
            return self.size
        if self.span > 1:
            return self.span
        sizes = self.group_sizes()
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
# round's variance carries a relative rounding error of up to (1 + POOR) u (u: the float32
# summation's). 4 keeps it within the running statistics' tests (1e-5 relative for up to 625
# float16/float32 values: 1.3e-6 measured at r just below 4, against 1.1e-5 at r = 16).
POOR = 4.0


def _total(red: Reducer, parts):
    """``red.total_and_every_group`` of several per-feature arrays in one collective (a
    stack, or a tuple when the dtypes differ: one tuple all-reduce): ``(mine, every)``, lists
    of arrays (``every`` None, or each part's ``(n_groups, ...)`` sums). Without
    ``axis_name`` nothing to do: under a sharded ``jax.jit`` XLA reduces the sums across
    devices itself (and fuses them)."""
    if red.names is None:
        return parts, None
    if len({p.dtype for p in parts}) == 1:
        mine, every = red.total_and_every_group(jnp.stack(parts))
        unstack = (lambda a, i: a[i]) if every is None else (lambda a, i: a[:, i])
        return ([mine[i] for i in range(len(parts))],
                None if every is None else [unstack(every, i) for i in range(len(parts))])
    mine, every = red.total_and_every_group(tuple(parts))
    return list(mine), None if every is None else list(every)


def _poor(s1, s2, count):
    """``(mean_d, m2, poor)``: the mean of the deviations, ``M2`` and whether, for some
    feature, ``r = |mean_d|^2 n / M2 > POOR`` (``M2 <= 0`` with ``mean_d != 0`` too)."""
    safe = jnp.maximum(count, 1.0)
    mean_d = s1 / safe
    m2 = s2 - count * abs2(mean_d)
    return mean_d, m2, jnp.any(abs2(mean_d) * safe > POOR * m2)


def shifted_moments(x, reduction_axes, shift=None, *, mask=None, red: Reducer | None = None):
    """Per-feature ``(count, mean, M2)`` from the sums of ``x - shift`` and its squares.

    ``shift`` (x's rank, size 1 along ``reduction_axes``; a non-finite value counts as 0) is
    a value every device holds (the running mean, under ``jit``, ``shard_map``, ``pmap`` and
    ``vmap`` alike); None: 0, and no subtraction. One pass over ``x`` and one collective of
    the sums (and of the counts, with a mask): ``mean = shift + S1 / n`` and
    ``M2 = S2 - n |S1 / n|^2``. The variance's relative rounding error is about ``(1 + r) u``
    with ``r = |mean - shift|^2 / var``; when ``r > POOR`` for some feature, a second round
    sums the deviations from the now-known mean, which every device holds too (it comes
    from all-reduced sums), in a ``lax.cond`` whose predicate comes from all-reduced values
    as well, so every device takes the same branch. Its ``r`` is only the first round's
    rounding, so it cancels nothing. A constant feature gets exactly its value as mean and
    exactly 0 as ``M2``: its deviations from the second round's centre are all one float32
    ``delta`` of a few significant bits, whose sums are exact.

    (Measured on XLA CPU: the per-element subtraction costs the fused reductions 1.4x their
    time at 64 features and 1.9x at 32. Flax's sums of ``x`` and ``x^2`` with the same
    second round were faster there, but their ``r = mean^2 / var`` stays large for
    uncentred features all through training, which made the first round's error (1 + r) u
    too large, or the second round frequent; see BENCHMARKS.md, runs 11, 12 and 14.)
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

    n = math.prod(x.shape[a] for a in reduction_axes)
    if mask is not None:  # data-dependent counts travel with the sums
        (s1, s2, count), every = round_sums(shift, True)
    else:  # known without communication, even for groups of unequal sizes
        (s1, s2), every = round_sums(shift, False)
        count = jnp.broadcast_to(jnp.asarray(n * red.group_size(), rdt), s2.shape)
        if every is not None:  # each group's count: n times its number of devices
            sizes = red.group_sizes().reshape((-1,) + (1,) * s2.ndim)
            every.append(jnp.broadcast_to(jnp.asarray(n * sizes, rdt), every[1].shape))
    mean_d, m2, poor = _poor(s1, s2, count)
    # Every device must take the same branch (the second round's collective spans them
    # all): with groups, the flag of every group, from the sums one psum gave all devices,
    # or (groups by recursive doubling) or-ed in one more scalar psum.
    poor = _poor(*every)[2] if every is not None else red.any(poor)

    mean = mean_d if shift is None else shift + mean_d

    def second_round():
        centre = lax.stop_gradient(mean)
        (t1, t2), _ = round_sums(centre, False)
        md = t1 / jnp.maximum(count, 1.0)
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
      shift: None (0), or a guess of the mean that every device holds (broadcastable to
        the statistics' shape): see :func:`shifted_moments`. Any value gives exact
        statistics; a good one saves the second round.

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
