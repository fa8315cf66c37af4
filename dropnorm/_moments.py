"""Batch moments: exact two-pass statistics, padding masks, one collective across devices.

The variance is computed in two passes (mean, then mean of squared deviations)
in at least float32. Unlike the one-pass ``E[x^2] - E[x]^2`` (Flax's default),
this stays accurate when ``|mean| >> std`` and can never be negative.

Across devices, each device contributes ``(count, mean, M2)`` where ``M2`` is its
centred sum of squares; one ``all_gather`` brings every device's triple to
every device, and Chan et al.'s pairwise formula combines them exactly:
``mean = sum(n_i mean_i) / N``, ``M2 = sum(M2_i) + sum(n_i (mean_i - mean)^2)``.
Devices with different numbers of valid (unmasked) elements are therefore
weighted correctly, and no device's local centring biases the result.
"""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
from jax import lax


def stats_dtype(dtype) -> jnp.dtype:
    """The dtype statistics are accumulated in: at least float32."""
    return jnp.promote_types(dtype, jnp.float32)


def batch_moments(x, reduction_axes, *, mask=None, axis_name=None, axis_index_groups=None):
    """Per-feature mean, biased variance and element count over ``reduction_axes``.

    Args:
      x: the input.
      reduction_axes: the axes to reduce (all non-feature axes).
      mask: None, or a boolean array of ``x``'s shape; False elements are left out.
      axis_name: a mapped or ``shard_map`` axis name (or tuple of names) to reduce
        over as well, or None for local statistics.
      axis_index_groups: optional groups of device indices along ``axis_name``;
        statistics are then global within each group.

    Returns:
      ``(mean, var, count)``, each with ``x``'s rank (size 1 along the reduced
      axes), in ``stats_dtype(x.dtype)``. Features with no valid element get mean
      0, variance 0 and count 0.
    """
    dt = stats_dtype(x.dtype)
    xf = x.astype(dt)
    if mask is None:
        n = math.prod(x.shape[a] for a in reduction_axes)
        count = jnp.full((1,) * x.ndim, n, dt)
        mean = jnp.mean(xf, reduction_axes, keepdims=True)
        m2 = jnp.sum(jnp.square(xf - mean), reduction_axes, keepdims=True)
    else:
        count = jnp.sum(mask, reduction_axes, keepdims=True, dtype=dt)
        safe = jnp.maximum(count, 1.0)
        mean = jnp.sum(jnp.where(mask, xf, 0.0), reduction_axes, keepdims=True) / safe
        m2 = jnp.sum(jnp.where(mask, jnp.square(xf - mean), 0.0), reduction_axes, keepdims=True)
    if axis_name is not None:
        count = jnp.broadcast_to(count, mean.shape)
        gathered = lax.all_gather(
            jnp.stack([count, mean, m2]), axis_name, axis_index_groups=axis_index_groups
        )
        # gathered: (devices, 3, *mean.shape), or (3, *mean.shape) if the axis has size 1.
        gathered = gathered.reshape((-1, 3) + mean.shape)
        counts, means, m2s = gathered[:, 0], gathered[:, 1], gathered[:, 2]
        count = jnp.sum(counts, 0)
        mean = jnp.sum(counts * means, 0) / jnp.maximum(count, 1.0)
        m2 = jnp.sum(m2s, 0) + jnp.sum(counts * jnp.square(means - mean), 0)
    var = m2 / jnp.maximum(count, 1.0)
    return mean, var, count
