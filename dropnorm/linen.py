"""Drop-in ``flax.linen`` modules: BatchNorm, Dropout and their family.

Change one import and keep everything else, checkpoints included::

    from dropnorm import linen as dnn   # instead of ``from flax import linen as nn``
    x = dnn.BatchNorm(use_running_average=not train)(x)
    x = dnn.Dropout(0.1, deterministic=not train)(x)

The modules have Flax's dataclass fields, defaults, call signatures, variable
collections, names, shapes and dtypes (``params/scale``, ``params/bias``,
``batch_stats/mean``, ``batch_stats/var``), use the same ``dropout`` RNG stream
the same way, do not update statistics while initialising, and keep Flax's
output-dtype rule. They hold no arithmetic: they create and store variables and
call the pure functions :func:`dropnorm.batch_norm`, :func:`dropnorm.dropout`
and their family, which is where every difference from Flax comes from:

* the variance is always the accurate two-pass one (``use_fast_variance`` is
  accepted and ignored), so results differ from Flax's default by rounding, and
  stay right when ``|mean| >> std`` where Flax's lose all precision;
* ``rate`` and ``deterministic`` / ``use_running_average`` may be traced;
* dropout's keep probability is quantised to ``2**-mask_bits`` (16 bits by
  default: rate 0.1 drops 10.0006%; the kept values are scaled by exactly its
  inverse, so ``E[y] = x``), and the masks differ from Flax's for the same key;
* a feature whose elements are all masked out keeps its running statistics
  (Flax writes NaN into them), and training on a single value per feature is an
  error (Flax silently normalises it to 0);
* extras: ``virtual_batch_size`` (ghost batches), ``momentum=None`` (cumulative
  average, stored with a ``batch_stats/count``), ``mask_bits``, and
  ``AlphaDropout``, ``GaussianDropout``, ``DropPath``, ``BatchRenorm``.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

import jax
import jax.numpy as jnp
from flax import linen as nn
from flax.linen import dtypes
from jax.nn import initializers

from dropnorm import _checks
from dropnorm._batch_norm import BatchNormParams, BatchNormState, batch_norm, batch_renorm
from dropnorm._dropout import alpha_dropout, drop_path, dropout, gaussian_dropout
from dropnorm._masks import DEFAULT_BITS

__all__ = ["AlphaDropout", "BatchNorm", "BatchRenorm", "DropPath", "Dropout", "GaussianDropout"]

Initializer = Any

# A key for the one case where Flax draws no key but the pure function needs one: a static
# rate of 1 drops everything whatever the key, and Flax returns zeros without touching the
# RNG stream, so ours must not touch it either.
_UNUSED_KEY_SEED = 0


def _train_from(flag: Any, fn: str, name: str) -> bool | jax.Array:
    """``not flag`` for a Python/NumPy/JAX boolean flag (traced flags stay traced)."""
    flag = _checks.check_train(flag, fn, name)
    return (not flag) if isinstance(flag, bool) else jnp.logical_not(flag)


class _BatchNormBase(nn.Module):
    """Fields and variable handling shared by :class:`BatchNorm` and :class:`BatchRenorm`."""

    use_running_average: bool | None = None
    axis: int | Sequence[int] = -1
    momentum: float | None = 0.99
    epsilon: float = 1e-5
    dtype: Any = None
    param_dtype: Any = jnp.float32
    use_bias: bool = True
    use_scale: bool = True
    bias_init: Initializer = initializers.zeros
    scale_init: Initializer = initializers.ones
    axis_name: Any = None
    axis_index_groups: Any = None
    use_fast_variance: bool = True
    force_float32_reductions: bool = True

    def _pure(self, params, state, x, train, *, mask, axis_name, groups, initializing,
              out_dtype):
        raise NotImplementedError

    @nn.compact
    def __call__(self, x, use_running_average: bool | None = None, *, mask=None):
        """Normalise ``x`` by batch statistics (training) or running statistics.

        Args:
          x: the input, features along ``axis``.
          use_running_average: True to use the stored running statistics, False
            to use (and update) the batch's; overrides the field. A traced bool
            is accepted (``batch_stats`` must then be mutable).
          mask: optional boolean array broadcastable to ``x``; True elements
            count towards the statistics.

        Returns:
          The normalised ``x``, in Flax's output dtype: ``dtype`` if given, else
          the result type of ``x``, ``scale`` and ``bias``.
        """
        fn = f"dropnorm.linen.{type(self).__name__}"
        use_running_average = nn.merge_param(
            "use_running_average", self.use_running_average, use_running_average)
        train = _train_from(use_running_average, fn, "use_running_average")
        x = _checks.check_floating(x, fn)
        feature_axes = _checks.normalize_axes(self.axis, x.ndim, fn)
        feature_shape = [x.shape[a] for a in feature_axes]
        stat_dtype = jnp.float32 if self.force_float32_reductions else self.param_dtype
        ra_mean = self.variable("batch_stats", "mean",
                                lambda s: jnp.zeros(s, stat_dtype), feature_shape)
        ra_var = self.variable("batch_stats", "var",
                               lambda s: jnp.ones(s, stat_dtype), feature_shape)
        # The update count is only kept when a feature needs it: momentum=None.
        ra_count = (self.variable("batch_stats", "count", lambda: jnp.zeros((), jnp.int32))
                    if self.momentum is None else None)
        scale = (self.param("scale", self.scale_init, feature_shape, self.param_dtype)
                 if self.use_scale else None)
        bias = (self.param("bias", self.bias_init, feature_shape, self.param_dtype)
                if self.use_bias else None)
        out_dtype = dtypes.canonicalize_dtype(x, scale, bias, dtype=self.dtype)
        state = BatchNormState(
            ra_mean.value, ra_var.value,
            ra_count.value if ra_count is not None else jnp.zeros((), jnp.int32))
        initializing = self.is_initializing()
        y, new_state = self._pure(
            BatchNormParams(scale, bias), state, x, train, mask=mask,
            # Like Flax: no collective while initialising (the axis need not exist yet).
            axis_name=None if initializing else self.axis_name,
            groups=None if initializing else self.axis_index_groups,
            initializing=initializing, out_dtype=out_dtype)
        if train is not False and not initializing:
            ra_mean.value = new_state.mean
            ra_var.value = new_state.var
            if ra_count is not None:
                ra_count.value = new_state.count
        return y

    def _init_train(self, x, train, virtual_batch_size, initializing):
        """While initialising, a batch too small for statistics (a common dummy input of
        one example) normalises by the initial running statistics instead of raising; the
        statistics are not updated then anyway. Ghost batches that do not divide it are off."""
        if not initializing or train is False:
            return train, virtual_batch_size
        if virtual_batch_size is not None and x.shape[0] % virtual_batch_size:
            virtual_batch_size = None
        feature_axes = _checks.normalize_axes(self.axis, x.ndim, "BatchNorm")
        n = math.prod(x.shape[a] for a in range(x.ndim) if a not in feature_axes)
        if virtual_batch_size is not None:
            n = n // x.shape[0] * virtual_batch_size
        return (train if n >= 2 else False), virtual_batch_size


class BatchNorm(_BatchNormBase):
    """Batch normalisation; a drop-in replacement for ``flax.linen.BatchNorm``.

    Same fields, defaults, call signature ``(x, use_running_average=None, *,
    mask=None)``, variables (``params/scale``, ``params/bias``,
    ``batch_stats/mean``, ``batch_stats/var``: shapes and dtypes as Flax's) and
    output dtype (``dtype``, else the result type of ``x``, ``scale`` and
    ``bias``), so a Flax checkpoint loads unchanged. Statistics are not updated
    while initialising. The arithmetic is :func:`dropnorm.batch_norm`'s.

    Differences from Flax (improvements): the variance is always the accurate
    two-pass one (``use_fast_variance`` is accepted for compatibility and
    ignored); statistics are always computed in at least float32 (with
    ``force_float32_reductions=False`` the stored statistics still get
    ``param_dtype``, as Flax's do); ``use_running_average`` may be a traced
    bool; a feature with no unmasked element keeps its running statistics
    (Flax stores NaN); training on one value per feature raises an error
    (Flax outputs zeros), except while initialising, where such a batch is
    normalised by the initial running statistics.

    Attributes:
      use_running_average: True to normalise by the stored running statistics.
      axis: the feature axis or axes (int or tuple).
      momentum: decay of the running averages; None keeps a cumulative average
        (then a ``batch_stats/count`` variable is stored, unlike Flax).
      epsilon: added to the variance.
      dtype: output dtype (default: inferred as Flax does).
      param_dtype: dtype of ``scale`` and ``bias``.
      use_bias, use_scale: learn a bias / a scale.
      bias_init, scale_init: their initialisers.
      axis_name, axis_index_groups: cross-device statistics (``pmap``,
        ``shard_map``); not used while initialising.
      use_fast_variance: accepted and ignored (always the two-pass variance).
      force_float32_reductions: Flax's field; statistics are always >= float32.
      virtual_batch_size: ghost batch normalisation (dropnorm extra): statistics
        per chunk of this many examples along axis 0.

    Examples:
      >>> import jax, jax.numpy as jnp
      >>> from dropnorm import linen as dnn
      >>> bn = dnn.BatchNorm(momentum=0.9)
      >>> x = jnp.array([[1.0, 10.0], [3.0, 30.0]])
      >>> variables = bn.init(jax.random.key(0), x, use_running_average=False)
      >>> jax.tree.map(jnp.shape, variables)
      {'batch_stats': {'mean': (2,), 'var': (2,)}, 'params': {'bias': (2,), 'scale': (2,)}}
      >>> y, upd = bn.apply(variables, x, use_running_average=False, mutable=['batch_stats'])
      >>> y.round(3).tolist(), [round(m, 3) for m in upd['batch_stats']['mean'].tolist()]
      ([[-1.0, -1.0], [1.0, 1.0]], [0.2, 2.0])

    References:
      Ioffe & Szegedy, "Batch Normalization: Accelerating Deep Network Training
      by Reducing Internal Covariate Shift", ICML 2015. Hoffer et al., "Train
      longer, generalize better", NeurIPS 2017 (ghost batches).
    """

    virtual_batch_size: int | None = None

    def _pure(self, params, state, x, train, *, mask, axis_name, groups, initializing,
              out_dtype):
        train, vbs = self._init_train(x, train, self.virtual_batch_size, initializing)
        return batch_norm(params, state, x, train, axis=self.axis, momentum=self.momentum,
                          epsilon=self.epsilon, mask=mask, axis_name=axis_name,
                          axis_index_groups=groups, virtual_batch_size=vbs,
                          dtype=out_dtype)


class BatchRenorm(_BatchNormBase):
    """Batch renormalisation: :class:`BatchNorm` whose training statistics are corrected.

    Flax has no batch renormalisation; this module has ``BatchNorm``'s fields
    and variables (so a ``flax.linen.BatchNorm`` checkpoint loads into it) plus
    ``r_max`` and ``d_max``; see :func:`dropnorm.batch_renorm` for the formula.
    ``r_max=1, d_max=0`` is plain batch normalisation.

    Attributes:
      r_max: bound on the scale correction ``r`` (>= 1).
      d_max: bound on the shift correction ``|d|`` (>= 0).
      Everything else: as :class:`BatchNorm` (no ``virtual_batch_size``).

    Examples:
      >>> import jax, jax.numpy as jnp
      >>> from dropnorm import linen as dnn
      >>> x = jnp.array([[0.0], [4.0]])
      >>> bn = dnn.BatchRenorm(use_running_average=False, r_max=1.0, d_max=0.0)
      >>> variables = bn.init(jax.random.key(0), x)
      >>> y, _ = bn.apply(variables, x, mutable=['batch_stats'])
      >>> y.round(3).ravel().tolist()
      [-1.0, 1.0]

    References:
      Ioffe, "Batch Renormalization: Towards Reducing Minibatch Dependence in
      Batch-Normalized Models", NeurIPS 2017.
    """

    r_max: float = 3.0
    d_max: float = 5.0

    def _pure(self, params, state, x, train, *, mask, axis_name, groups, initializing,
              out_dtype):
        train, _ = self._init_train(x, train, None, initializing)
        return batch_renorm(params, state, x, train, r_max=self.r_max, d_max=self.d_max,
                            axis=self.axis, momentum=self.momentum, epsilon=self.epsilon,
                            mask=mask, axis_name=axis_name,
                            axis_index_groups=groups, dtype=out_dtype)


class _RandomBase(nn.Module):
    """Shared call logic of the dropout family."""

    _pure_fn = None  # set by subclasses (a staticmethod)
    _flax_rate_one = False  # True for Dropout: rate 1 draws no key, as in Flax

    def _extra(self) -> dict:
        return {}

    def _run(self, inputs, deterministic, rng):
        fn = f"dropnorm.linen.{type(self).__name__}"
        deterministic = nn.merge_param("deterministic", self.deterministic, deterministic)
        train = _train_from(deterministic, fn, "deterministic")
        rate = _checks.check_rate(self.rate, fn)
        if train is False or (isinstance(rate, float) and rate == 0.0):
            return inputs
        if rng is None:
            if self._flax_rate_one and isinstance(rate, float) and rate == 1.0:
                rng = jax.random.key(_UNUSED_KEY_SEED)
            else:
                rng = self.make_rng(self.rng_collection)
        return type(self)._pure_fn(rng, inputs, self.rate, train, **self._extra())


class Dropout(_RandomBase):
    """Inverted dropout; a drop-in replacement for ``flax.linen.Dropout``.

    Same fields (``rate``, ``broadcast_dims``, ``deterministic``,
    ``rng_collection``), call signature ``(inputs, deterministic=None,
    rng=None)`` and RNG use: one key from ``make_rng(rng_collection)`` per
    training call, none when deterministic or when the rate is 0 or 1. The
    arithmetic is :func:`dropnorm.dropout`'s.

    Differences from Flax: ``rate`` and ``deterministic`` may be traced (Flax
    raises); the keep probability is quantised to ``2**-mask_bits`` (default
    16 bits; ``mask_bits=32`` for finer rates); the masks differ from Flax's
    for the same key; gradients at a traced rate of 1 are zeros, not NaN.

    Attributes:
      rate: the probability of dropping an element.
      broadcast_dims: axes that share one mask value.
      deterministic: True to return the input unchanged.
      rng_collection: the RNG stream to draw keys from.
      mask_bits: 8, 16 or 32: the resolution of the keep probability (extra; default 16).

    Examples:
      >>> import jax, jax.numpy as jnp
      >>> from dropnorm import linen as dnn
      >>> layer = dnn.Dropout(0.5)
      >>> x = jnp.ones((2, 4))
      >>> layer.apply({}, x, deterministic=True).tolist()
      [[1.0, 1.0, 1.0, 1.0], [1.0, 1.0, 1.0, 1.0]]
      >>> y = layer.apply({}, x, deterministic=False, rngs={'dropout': jax.random.key(1)})
      >>> bool(jnp.all((y == 0) | (y == 2)))
      True

    References:
      Srivastava et al., "Dropout: A Simple Way to Prevent Neural Networks from
      Overfitting", JMLR 2014.
    """

    rate: float
    broadcast_dims: Sequence[int] = ()
    deterministic: bool | None = None
    rng_collection: str = "dropout"
    mask_bits: int = DEFAULT_BITS

    _pure_fn = staticmethod(dropout)
    _flax_rate_one = True

    def _extra(self):
        return {"broadcast_dims": tuple(self.broadcast_dims), "mask_bits": self.mask_bits}

    @nn.compact
    def __call__(self, inputs, deterministic: bool | None = None, rng=None):
        """Apply dropout.

        Args:
          inputs: the array to drop elements of.
          deterministic: True to return ``inputs`` unchanged; overrides the field.
            A traced bool is accepted.
          rng: a key to use instead of ``make_rng(rng_collection)``.

        Returns:
          The array after dropout, same shape and dtype.
        """
        return self._run(inputs, deterministic, rng)


class AlphaDropout(Dropout):
    """Alpha dropout for SELU networks (:func:`dropnorm.alpha_dropout`); not in Flax.

    Fields and call as :class:`Dropout`. Dropped units take SELU's negative
    saturation value and an affine map keeps zero mean and unit variance.

    Examples:
      >>> import jax, jax.numpy as jnp
      >>> from dropnorm import linen as dnn
      >>> x = jax.random.normal(jax.random.key(0), (100_000,))
      >>> y = dnn.AlphaDropout(0.2).apply({}, x, False, rngs={'dropout': jax.random.key(1)})
      >>> bool(abs(y.mean()) < 0.02 and abs(y.std() - 1) < 0.02)
      True

    References:
      Klambauer et al., "Self-Normalizing Neural Networks", NeurIPS 2017.
    """

    _pure_fn = staticmethod(alpha_dropout)
    _flax_rate_one = False


class GaussianDropout(Dropout):
    """Multiplicative Gaussian noise (:func:`dropnorm.gaussian_dropout`); not in Flax.

    Fields and call as :class:`Dropout` (``mask_bits`` is ignored: the noise is
    normal). The noise has mean 1 and variance ``rate / (1 - rate)``.

    Examples:
      >>> import jax, jax.numpy as jnp
      >>> from dropnorm import linen as dnn
      >>> y = dnn.GaussianDropout(0.5).apply({}, jnp.ones(100_000), False,
      ...                                    rngs={'dropout': jax.random.key(0)})
      >>> bool(abs(y.mean() - 1) < 0.02)
      True

    References:
      Srivastava et al., "Dropout: A Simple Way to Prevent Neural Networks from
      Overfitting", JMLR 2014, section 10.
    """

    _pure_fn = staticmethod(gaussian_dropout)
    _flax_rate_one = False

    def _extra(self):
        return {"broadcast_dims": tuple(self.broadcast_dims)}


class DropPath(_RandomBase):
    """Stochastic depth: drop whole examples of a residual branch; not in Flax.

    Fields as :class:`Dropout` without ``broadcast_dims`` (every axis but the
    batch axis 0 shares the mask); see :func:`dropnorm.drop_path`. Use it as
    ``x = x + DropPath(rate)(branch(x), deterministic=not train)``.

    Examples:
      >>> import jax, jax.numpy as jnp
      >>> from dropnorm import linen as dnn
      >>> y = dnn.DropPath(0.5).apply({}, jnp.ones((8, 3)), False,
      ...                             rngs={'dropout': jax.random.key(0)})
      >>> bool(jnp.all(y.min(1) == y.max(1)))
      True

    References:
      Huang et al., "Deep Networks with Stochastic Depth", ECCV 2016.
    """

    rate: float
    deterministic: bool | None = None
    rng_collection: str = "dropout"
    mask_bits: int = DEFAULT_BITS

    _pure_fn = staticmethod(drop_path)

    def _extra(self):
        return {"mask_bits": self.mask_bits}

    @nn.compact
    def __call__(self, inputs, deterministic: bool | None = None, rng=None):
        """Apply drop-path; arguments as :meth:`Dropout.__call__`."""
        return self._run(inputs, deterministic, rng)
