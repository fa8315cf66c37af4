"""Dropout and its family: inverted, alpha and Gaussian dropout, and drop-path.

Every member is one elementwise map ``y = x * m + c`` whose multiplier ``m``
and offset ``c`` are drawn from the key. The map has a ``jax.custom_jvp`` rule
whose tangent ``t * m`` is computed inside ``jax.checkpoint``: reverse mode then
keeps only the key as a residual and regenerates ``m`` in the backward pass,
while forward mode (``jax.jvp``, ``jax.hessian``) keeps working.
"""

from __future__ import annotations

import functools
import math
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax

from dropnorm import _checks, _masks

# SELU's constants (Klambauer et al. 2017): alpha' = -scale * alpha.
_SELU_ALPHA = 1.6732632423543772848170429916717
_SELU_SCALE = 1.0507009873554804934193349852946
_ALPHA_PRIME = -_SELU_SCALE * _SELU_ALPHA


class _Static(NamedTuple):
    kind: str  # "dropout" | "alpha" | "gaussian" | "block"
    mask_shape: tuple[int, ...]
    bits: int
    rate: float | None  # the rate when it is a Python number, else None (traced)
    seeded: bool  # the key argument is the hash's seed (_masks.seed_words), not a key
    block: tuple[int, ...] | None = None  # DropBlock: the block's extent along each axis


def _block_keep(r, static: _Static):
    """DropBlock's seed threshold ``k`` and the keep probability ``p`` of an interior element.

    An element away from the borders is dropped when any of the ``B = prod(block)`` seeds
    whose block covers it is dropped; seeds are kept with probability ``q``, so the element
    is kept with probability ``q**B``. ``q = (1 - rate)**(1 / B)``, quantised to
    ``k / 2**bits``, makes that ``rate`` (to the mask resolution); ``p = (k / 2**bits)**B``
    exactly, and survivors are scaled by ``1 / p``.
    """
    n = math.prod(static.block)
    if isinstance(r, float):
        q = (1.0 - r) ** (1.0 / n) if r < 1.0 else 0.0
        k = int(round(q * 2**static.bits))
        return k, (k / 2**static.bits) ** n
    q = jnp.where(r < 1.0, jnp.power(jnp.maximum(1.0 - r, 0.0), 1.0 / n), 0.0)
    k = jnp.round(q * jnp.float32(2**static.bits))
    # exp(n log q), not q ** n: XLA CPU rewrites (k / 2**bits) ** n as k ** n / 2**(bits n),
    # which overflows float32 to inf / inf = NaN (jax 0.10.2); log(0) = -inf gives p = 0.
    return k, jnp.exp(n * jnp.log(k / jnp.float32(2**static.bits)))


def _blocks(dropped_seeds, block):
    """Every element within a block of a dropped seed: a max over ``block`` windows."""
    pad = [((b - 1) // 2, b // 2) for b in block]
    return lax.reduce_window(dropped_seeds, False, lax.bitwise_or, block, (1,) * len(block),
                             pad)


def _noise(key, rate, static: _Static, dtype=jnp.float32):
    """The multiplier ``m`` and offset ``c`` (None for 0) of ``y = x * m + c``, in float32.

    Inverted dropout's multiplier is in ``dtype`` (the compute dtype), so that for float64
    inputs the scale ``1 / p`` is not rounded to float32 (``E[y] = x`` exactly).
    """
    r = static.rate if static.rate is not None else rate
    if static.kind == "gaussian":
        z = jax.random.normal(key, static.mask_shape, jnp.float32)
        if isinstance(r, float):
            if r >= 1.0:
                return jnp.zeros(static.mask_shape, jnp.float32), None
            return 1.0 + math.sqrt(r / (1.0 - r)) * z, None
        sigma = jnp.sqrt(r / jnp.maximum(1.0 - r, 1e-30))
        return jnp.where(r < 1.0, 1.0 + sigma * z, 0.0), None
    if static.kind == "block":
        k, p = _block_keep(r, static)
        seeds = _masks.keep_mask(key, static.mask_shape, k, static.bits, static.seeded)
        dropped = _blocks(jnp.logical_not(seeds), static.block)
        if isinstance(p, float):
            inv = jnp.asarray(1.0 / p if p > 0 else 0.0, dtype)
        else:
            inv = jnp.where(p > 0, 1.0 / jnp.maximum(p, 1e-30), 0.0).astype(dtype)
        return jnp.where(dropped, jnp.zeros((), dtype), inv), None
    k = _masks.keep_threshold(r, static.bits)
    keep = _masks.keep_mask(key, static.mask_shape, k, static.bits, static.seeded)
    if static.kind == "dropout":
        inv = jnp.asarray(_masks.inverse_keep(k, static.bits), dtype)
        return jnp.where(keep, inv, jnp.zeros((), dtype)), None
    # Alpha dropout: dropped units are set to SELU's negative saturation alpha', then an
    # affine map a * (.) + b restores zero mean and unit variance.
    q = (k / 2**static.bits) if isinstance(k, int) else k / jnp.float32(2**static.bits)
    if isinstance(q, float):
        a = 0.0 if q == 0.0 else (q + _ALPHA_PRIME**2 * q * (1.0 - q)) ** -0.5
    else:
        var = jnp.maximum(q + _ALPHA_PRIME**2 * q * (1.0 - q), 1e-30)
        a = jnp.where(q > 0, lax.rsqrt(var), 0.0)
    b = -a * _ALPHA_PRIME * (1.0 - q)
    m = jnp.where(keep, jnp.float32(a), 0.0)
    c = jnp.where(keep, jnp.float32(b), jnp.float32(a * _ALPHA_PRIME + b))
    return m, c


def _apply(x, key, rate, static: _Static, with_offset: bool):
    cdt = jnp.promote_types(x.dtype, jnp.float32)
    m, c = _noise(key, rate, static, cdt)
    y = x.astype(cdt) * m.astype(cdt)
    if with_offset and c is not None:
        y = y + c.astype(cdt)
    if static.rate is None:
        # A traced rate cannot raise: an invalid one (NaN, < 0, > 1) poisons the output.
        y = _checks.poison_unless(_checks.in_unit_interval(rate), y)
    return y.astype(x.dtype)


@functools.partial(jax.custom_jvp, nondiff_argnums=(3,))
def _noisy(x, key, rate, static):
    return _cached_apply(x, key, rate, static, True)


@_noisy.defjvp
def _noisy_jvp(static, primals, tangents):
    x, key, rate = primals
    y = _cached_apply(x, key, rate, static, True)
    # The tangent is linear in t; under jax.checkpoint reverse mode saves (seed, rate) and
    # regenerates the multiplier, instead of keeping a mask alive until the backward pass.
    # Measured on CPU (BENCHMARKS.md), this is also the fastest of the three policies:
    # regenerating beat keeping a bool mask and keeping a bit-packed mask.
    tangent = _checkpointed_apply(tangents[0], key, rate, static, False)
    return y, tangent


# One checkpoint wrapper for every call (made per call, it was traced anew each time); the
# forward inside the rule is a jit, whose trace is cached too: a model's layers of one shape
# trace the mask once (the 12-layer step's trace time: 12 hashes instead of 24).
_checkpointed_apply = jax.checkpoint(_apply, static_argnums=(3, 4))
_cached_apply = jax.jit(_apply, static_argnums=(3, 4))


_KINDS = {"dropout": "dropout", "alpha": "alpha", "gaussian": "gaussian", "drop_path": "dropout",
          "block": "block"}


def _check_not_swapped(caller: _checks.Caller, key, x):
    """``dropout(x, key, ...)`` is an easy slip: say so instead of "x must be floating"."""
    x_is_key = _checks.is_key(x) or (
        isinstance(x, (jax.Array, np.ndarray)) and x.dtype == np.uint32
        and tuple(x.shape) == _checks.default_raw_key_shape())
    key_is_data = isinstance(key, (jax.Array, np.ndarray)) and (
        jnp.issubdtype(key.dtype, jnp.floating))
    if x_is_key and (key_is_data or key is None):
        raise TypeError(
            f"{caller.fn}: `{caller.x_name}` is a PRNG key and `key` is "
            f"{'None' if key is None else 'a floating array'}: the two look swapped. The key "
            f"comes first: {caller.fn}(key, {caller.x_name}, rate, train)."
        )


def random_map_as(caller, kind, key, x, rate, train, *, broadcast_dims=(),
                  mask_bits: int = _masks.DEFAULT_BITS, block=None):
    """The family's validation and static / traced dispatch, errors in ``caller``'s terms.

    ``kind`` is "dropout", "alpha", "gaussian" or "drop_path" (dropout with every axis but
    0 broadcast). The Flax modules call this with their own :class:`~dropnorm._checks.Caller`.
    """
    caller = _checks.as_caller(caller)
    fn, xn = caller.fn, caller.x_name
    _check_not_swapped(caller, key, x)
    x = _checks.check_floating(x, fn, xn)
    if kind == "drop_path":
        if x.ndim == 0:
            raise ValueError(f"{fn}: `{xn}` must have a batch axis (axis 0); got a scalar.")
        broadcast_dims = tuple(range(1, x.ndim))
    rate = _checks.check_rate(rate, fn)
    train = _checks.check_train(train, fn)
    mask_bits = _masks.check_mask_bits(mask_bits, fn)
    bdims = _checks.normalize_axes(broadcast_dims, x.ndim, fn, "broadcast_dims")
    if train is False or (isinstance(rate, float) and rate == 0.0):
        return x
    key = _checks.check_key(key, fn, caller.train_off)
    mask_shape = tuple(1 if i in bdims else d for i, d in enumerate(x.shape))
    # Threefry only derives the hash's 64-bit seed; deriving it here, outside the custom rule,
    # makes the seed (8 bytes) the residual, so the backward pass regenerates the mask with
    # the cheap hash alone, and threefry is traced and compiled once per layer, not twice.
    seeded = _KINDS[kind] != "gaussian"
    static = _Static(_KINDS[kind], mask_shape, mask_bits,
                     rate if isinstance(rate, float) else None, seeded, block)
    dyn_rate = jnp.float32(0.0) if isinstance(rate, float) else rate
    rng = _masks.seed_words(key) if seeded else key

    def drop(x):
        return _noisy(x, rng, dyn_rate, static)

    if train is True:
        return drop(x)
    return lax.cond(train, drop, lambda x: x, x)


def dropout(key, x, rate, train, *, broadcast_dims=(),
            mask_bits: int = _masks.DEFAULT_BITS) -> jax.Array:
    """Inverted dropout: drop each element with probability ``rate``, scale the rest.

    ``y = x * keep / p`` with ``keep ~ Bernoulli(p)``, ``p = 1 - rate``, so that
    ``E[y] = x`` and the layer is the identity at evaluation time (no rescaling
    needed then, unlike the original formulation that scaled at test time).

    The keep probability is quantised to ``2**-mask_bits``: ``p = k / 2**mask_bits``
    with ``k = round((1 - rate) * 2**mask_bits)``, and kept values are scaled by
    exactly ``1 / p``, so ``E[y] = x`` holds exactly. With the default 16 bits a
    rate of 0.1 drops 6554/65536 = 10.0006% of elements; ``mask_bits=32`` is
    finer still (the float32 rate's own resolution). One 32-bit random word feeds
    ``32 // mask_bits`` elements; the words come from a cheap keyed hash
    (``dropnorm._masks``), so on CPU 16 and 32 bits cost about the same (8-bit masks
    were removed: slower than 16 bits and only coarser; BENCHMARKS.md). The word's index
    is a 64-bit counter: any size, one generator. The mask a key gives is a contract,
    the same on every release, platform and sharding (docs/guides/conventions.md).

    Args:
      key: a PRNG key (``jax.random.key(seed)``); may be None when ``train`` is False.
      x: floating array. The output has the same shape and dtype.
      rate: probability of DROPPING an element, in [0, 1]. A Python float takes a
        static path (rate 0 returns ``x``); a traced scalar is accepted, so one
        compiled function serves every rate. A traced rate that is NaN or outside
        [0, 1] cannot raise an error, so it turns the output into NaN.
      train: True to apply dropout, False to return ``x``. A traced boolean is
        accepted (the choice is made with ``lax.cond``).
      broadcast_dims: axes along which one mask value is shared (spatial or
        variational dropout, e.g. ``(1, 2)`` for NHWC feature maps).
      mask_bits: 16 or 32: the resolution of the keep probability (default 16).

    Returns:
      The array after dropout. Rate 1 gives zeros and zero gradients (never NaN).

    Raises:
      ValueError: for a concrete rate outside [0, 1] or NaN, bad ``broadcast_dims``
        or ``mask_bits``.
      TypeError: for a missing or malformed key while training, a non-boolean
        ``train``, an integer ``x``, or ``key`` and ``x`` swapped (``dropout(x, key,
        ...)``). Keys may be typed keys of any implementation (``jax.random.key(seed,
        impl=...)``) or raw ``jax.random.PRNGKey`` keys of the default implementation
        (``uint32[2]``, or ``uint32[4]`` under ``jax_default_prng_impl='rbg'``).

    Examples:
      >>> import jax, jax.numpy as jnp, dropnorm
      >>> y = dropnorm.dropout(jax.random.key(0), jnp.ones((2, 4)), 0.5, train=True)
      >>> sorted(set(y.ravel().tolist())) in ([0.0, 2.0], [2.0], [0.0])
      True
      >>> dropnorm.dropout(None, jnp.ones(3), 0.5, train=False).tolist()
      [1.0, 1.0, 1.0]

    References:
      Srivastava et al., "Dropout: A Simple Way to Prevent Neural Networks from
      Overfitting", JMLR 2014. Gal & Ghahramani, "A Theoretically Grounded
      Application of Dropout in Recurrent Neural Networks", NeurIPS 2016.
    """
    return random_map_as("dropout", "dropout", key, x, rate, train,
                         broadcast_dims=broadcast_dims, mask_bits=mask_bits)


def alpha_dropout(key, x, rate, train, *, broadcast_dims=(),
                  mask_bits: int = _masks.DEFAULT_BITS) -> jax.Array:
    """Alpha dropout for self-normalising (SELU) networks.

    Dropped units are set to SELU's negative saturation value
    ``alpha' = -scale * alpha ~= -1.7581`` instead of 0, then the affine map
    ``y = a * (x * keep + alpha' * (1 - keep)) + b`` with
    ``a = (p + alpha'^2 p (1 - p))^(-1/2)`` and ``b = -a alpha' (1 - p)``
    (``p`` the exact quantised keep probability) keeps zero mean and unit
    variance. ``broadcast_dims`` gives PyTorch's FeatureAlphaDropout.

    Args:
      key: a PRNG key; may be None when ``train`` is False.
      x: floating array (SELU activations, mean 0 and variance 1).
      rate: probability of dropping an element, in [0, 1]; may be traced (an
        invalid traced rate makes the output NaN).
      train: True to apply alpha dropout, False to return ``x``; may be traced.
      broadcast_dims: axes that share one mask value (``(2, 3)`` for NCHW gives
        PyTorch's FeatureAlphaDropout).
      mask_bits: 16 or 32: the resolution of the keep probability.

    Returns:
      The array after alpha dropout, same shape and dtype. Rate 1 returns zeros
      (the limit of the map as ``p -> 0``), with zero gradients.

    Raises:
      ValueError: a concrete rate outside [0, 1] or NaN, bad ``broadcast_dims`` or
        ``mask_bits``.
      TypeError: a missing or malformed key while training, a non-boolean
        ``train``, a non-floating ``x``, or ``key`` and ``x`` swapped.

    Examples:
      >>> import jax, jax.numpy as jnp, dropnorm
      >>> x = jax.random.normal(jax.random.key(0), (100_000,))
      >>> y = dropnorm.alpha_dropout(jax.random.key(1), x, 0.2, train=True)
      >>> bool(abs(y.mean()) < 0.02 and abs(y.std() - 1) < 0.02)
      True

    References:
      Klambauer et al., "Self-Normalizing Neural Networks", NeurIPS 2017.
    """
    return random_map_as("alpha_dropout", "alpha", key, x, rate, train,
                         broadcast_dims=broadcast_dims, mask_bits=mask_bits)


def gaussian_dropout(key, x, rate, train, *, broadcast_dims=()) -> jax.Array:
    """Multiplicative Gaussian noise with mean 1 and variance ``rate / (1 - rate)``.

    ``y = x * (1 + sqrt(rate / (1 - rate)) * z)``, ``z ~ N(0, 1)``: the noise has
    the same mean and variance as inverted dropout's multiplier at that rate. The
    normal draws use ``jax.random.normal`` (32 bits each). Rate 1 would need
    infinite variance; it returns zeros, the all-dropped convention of
    :func:`dropout`.

    Args:
      key: a PRNG key; may be None when ``train`` is False.
      x: floating array.
      rate: in [0, 1]; the noise variance is ``rate / (1 - rate)``. May be traced.
      train: True to apply the noise, False to return ``x``; may be traced.
      broadcast_dims: axes that share one noise value.

    Returns:
      ``x`` times the noise, same shape and dtype (zeros at rate 1).

    Raises:
      ValueError: a concrete rate outside [0, 1] or NaN, bad ``broadcast_dims``.
      TypeError: a missing or malformed key while training, a non-boolean
        ``train``, a non-floating ``x``, or ``key`` and ``x`` swapped.

    Examples:
      >>> import jax, jax.numpy as jnp, dropnorm
      >>> y = dropnorm.gaussian_dropout(jax.random.key(0), jnp.ones(100_000), 0.5, train=True)
      >>> bool(abs(y.mean() - 1) < 0.02 and abs(y.var() - 1) < 0.03)
      True

    References:
      Srivastava et al., "Dropout: A Simple Way to Prevent Neural Networks from
      Overfitting", JMLR 2014, section 10.
    """
    return random_map_as("gaussian_dropout", "gaussian", key, x, rate, train,
                         broadcast_dims=broadcast_dims, mask_bits=32)


def drop_path(key, x, rate, train, *, mask_bits: int = _masks.DEFAULT_BITS) -> jax.Array:
    """Stochastic depth: drop whole examples (axis 0) of a residual branch.

    Each example's slice ``x[i]`` is zeroed with probability ``rate`` and the
    survivors are scaled by the inverse keep probability, so ``E[y] = x``. Use it
    on the residual branch: ``out = shortcut + drop_path(key, branch(x), rate, train)``.
    Conventions are those of :func:`dropout`.

    Args:
      key: a PRNG key; may be None when ``train`` is False.
      x: floating array with the batch along axis 0.
      rate: probability of dropping an example's branch, in [0, 1]; may be traced.
      train: True to drop, False to return ``x``; may be traced.
      mask_bits: 16 or 32: the resolution of the keep probability.

    Returns:
      The array with dropped examples zeroed and the rest scaled by the inverse
      keep probability, same shape and dtype.

    Raises:
      ValueError: a scalar ``x`` (no batch axis), a concrete rate outside [0, 1] or
        NaN, bad ``mask_bits``.
      TypeError: a missing or malformed key while training, a non-boolean
        ``train``, a non-floating ``x``, or ``key`` and ``x`` swapped.

    Examples:
      >>> import jax, jax.numpy as jnp, dropnorm
      >>> y = dropnorm.drop_path(jax.random.key(0), jnp.ones((8, 3)), 0.5, train=True)
      >>> bool(jnp.all((y == 0) | (y == 2)) and jnp.all(y.min(1) == y.max(1)))
      True

    References:
      Huang et al., "Deep Networks with Stochastic Depth", ECCV 2016.
    """
    return random_map_as("drop_path", "drop_path", key, x, rate, train, mask_bits=mask_bits)


def _check_drop_block_args(fn, x, block_size, spatial_axes, channel_axis, x_name="x"):
    """The block's extent along every axis of x, and the axes that share the mask."""
    spatial = _checks.normalize_axes(spatial_axes, x.ndim, fn, "spatial_axes")
    if not spatial:
        raise ValueError(f"{fn}: `spatial_axes` must name at least one axis; got "
                         f"{spatial_axes!r}.")
    channel = None
    if channel_axis is not None:
        (channel,) = _checks.normalize_axes(channel_axis, x.ndim, fn, "channel_axis")
        if channel in spatial:
            raise ValueError(f"{fn}: `channel_axis`={channel_axis!r} is also one of "
                             f"`spatial_axes`={spatial_axes!r}; they must differ.")
    sizes = (block_size,) * len(spatial) if isinstance(block_size, (int, np.integer)) else (
        block_size)
    if (isinstance(block_size, bool) or not isinstance(sizes, (tuple, list))
            or len(sizes) != len(spatial)
            or any(isinstance(b, bool) or not isinstance(b, (int, np.integer)) or b < 1
                   for b in sizes)):
        raise ValueError(
            f"{fn}: `block_size` must be a positive int, or a tuple of {len(spatial)} positive "
            f"ints (one per spatial axis); got {block_size!r}.")
    for a, b in zip(spatial, sizes, strict=True):
        # A symbolic size (jax.export) cannot be compared: not checked (drop_block's docstring).
        if not jax.export.is_symbolic_dim(x.shape[a]) and b > x.shape[a]:
            raise ValueError(
                f"{fn}: `block_size`={block_size!r} is larger than the feature map: axis {a} "
                f"has size {x.shape[a]} ({x_name}.shape={tuple(x.shape)}). Use a block of at most "
                f"{x.shape[a]}, or check `spatial_axes`={spatial_axes!r}.")
    block = [1] * x.ndim
    for a, b in zip(spatial, sizes, strict=True):
        block[a] = int(b)
    return tuple(block), channel


def drop_block(key, x, rate, train, *, block_size, spatial_axes=(1, 2), channel_axis=-1,
               share_channels: bool = False, mask_bits: int = _masks.DEFAULT_BITS) -> jax.Array:
    """DropBlock: drop contiguous ``block_size x block_size`` regions of feature maps.

    Seeds are drawn at every position of every feature map (each example and, unless
    ``share_channels``, each channel on its own) and each dropped seed drops the block
    centred on it (clipped at the borders). An element away from the borders is dropped
    when any of the ``B = block_size**2`` seeds whose blocks cover it is, so seeds are
    dropped with probability ``gamma = 1 - (1 - rate)**(1 / B)``: then exactly a fraction
    ``rate`` of the interior is dropped (to the mask resolution, as :func:`dropout`), and
    survivors are scaled by ``1 / (1 - rate)`` so that ``E[y] = x`` there. (The paper and
    timm's ``DropBlock2d`` take ``gamma ~ rate / B`` times an area ratio, an approximation
    that ignores overlapping blocks, and rescale by the kept fraction of the batch; near the
    borders fewer seeds cover an element, so fewer are dropped there.)

    The mask comes from the key and is regenerated in the backward pass (nothing per
    element is kept), rates and ``train`` may be traced, and rate 1 gives zeros with zero
    gradients, as for the rest of the family.

    Args:
      key: a PRNG key; may be None when ``train`` is False.
      x: floating array, e.g. NHWC feature maps.
      rate: the fraction of the (interior) feature map to drop, in [0, 1]; may be traced.
      train: True to drop, False to return ``x``; may be traced.
      block_size: the block's size: an int (the same along every spatial axis) or a
        tuple, one per spatial axis. At most the feature map's size; a spatial size that
        is symbolic (``jax.export``) cannot be checked, and a block larger than the map at
        run time is then what a block near the border is: fewer seeds cover each element,
        so less than ``rate`` is dropped.
      spatial_axes: the axes of the feature map (default ``(1, 2)``, NHWC; ``(2, 3)``
        for NCHW).
      channel_axis: the channel axis (default -1; 1 for NCHW), or None.
      share_channels: one mask for every channel of an example (the paper's variant
        that drops whole blocks across channels) instead of one per channel.
      mask_bits: 16 or 32: the resolution of the seeds' keep probability.

    Returns:
      The array after DropBlock, same shape and dtype.

    Raises:
      ValueError: a ``block_size`` larger than the feature map or not positive, bad or
        overlapping ``spatial_axes`` / ``channel_axis``, a concrete rate outside [0, 1].
      TypeError: a missing or malformed key while training, a non-boolean ``train``, a
        non-floating ``x``, or ``key`` and ``x`` swapped.

    Examples:
      >>> import jax, jax.numpy as jnp, dropnorm
      >>> x = jnp.ones((8, 32, 32, 4))
      >>> y = dropnorm.drop_block(jax.random.key(0), x, 0.2, True, block_size=5)
      >>> sorted(set(jnp.round(y, 3).ravel().tolist()))  # survivors scaled by 1 / (1 - rate)
      [0.0, 1.25]
      >>> bool(abs(float((y[:, 8:24, 8:24] == 0).mean()) - 0.2) < 0.03)
      True

    References:
      Ghiasi, Lin & Le, "DropBlock: A regularization method for convolutional networks",
      NeurIPS 2018.
    """
    return drop_block_as("drop_block", key, x, rate, train, block_size=block_size,
                         spatial_axes=spatial_axes, channel_axis=channel_axis,
                         share_channels=share_channels, mask_bits=mask_bits)


def drop_block_as(caller, key, x, rate, train, *, block_size, spatial_axes=(1, 2),
                  channel_axis=-1, share_channels: bool = False,
                  mask_bits: int = _masks.DEFAULT_BITS) -> jax.Array:
    """:func:`drop_block` with errors in ``caller``'s terms (the Flax modules call this)."""
    caller = _checks.as_caller(caller)
    _check_not_swapped(caller, key, x)
    x = _checks.check_floating(x, caller.fn, caller.x_name)
    block, channel = _check_drop_block_args(caller.fn, x, block_size, spatial_axes,
                                            channel_axis, caller.x_name)
    if share_channels and channel is None:
        raise ValueError(f"{caller.fn}: `share_channels`=True needs a `channel_axis`.")
    bdims = (channel,) if share_channels else ()
    return random_map_as(caller, "block", key, x, rate, train, broadcast_dims=bdims,
                         mask_bits=mask_bits, block=block)
