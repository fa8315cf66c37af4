"""Drop-in ``flax.nnx`` modules: BatchNorm, Dropout and their family.

Change one import and keep everything else, checkpoints included::

    from dropnorm import nnx as dnx   # next to ``from flax import nnx``
    self.bn = dnx.BatchNorm(64, rngs=rngs)
    self.drop = dnx.Dropout(0.1, rngs=rngs)

The modules have ``flax.nnx``'s constructor and call signatures and attribute
names: ``nnx.Param`` ``scale`` / ``bias`` and ``nnx.BatchStat`` ``mean`` /
``var`` (Dropout: the forked ``rngs`` stream), so ``nnx.state`` has Flax's
structure and ``nnx.update(ours, nnx.state(theirs))`` works both ways;
``model.train()`` / ``model.eval()`` / ``nnx.view`` switch
``use_running_average`` and ``deterministic``; dropout advances its RNG stream
on every call, so it draws a fresh mask under ``nnx.jit`` and a different one per
member under ``nnx.vmap`` with split RNGs. The output dtype follows Flax's
``promote_dtype`` rule. The modules hold no arithmetic: they store variables and
call the pure functions (:func:`dropnorm.batch_norm`, :func:`dropnorm.dropout`,
...), which is where every difference from Flax comes from:

* the variance is always the accurate two-pass one (``use_fast_variance`` is
  accepted and ignored), and normalisation is computed in at least float32
  before casting to ``dtype`` (Flax computes in ``dtype``, e.g. bfloat16, and
  casts the running statistics to it);
* ``rate`` and ``deterministic`` / ``use_running_average`` may be traced;
* dropout's keep probability is quantised to ``2**-mask_bits`` and its masks
  differ from Flax's for the same key;
* a feature with no unmasked element keeps its running statistics; training on
  one value per feature is an error;
* extras: ``num_features`` may be a tuple (several feature axes),
  ``virtual_batch_size``, ``momentum=None`` (stores a ``count`` BatchStat),
  ``mask_bits``, and ``AlphaDropout``, ``GaussianDropout``, ``DropPath``,
  ``BatchRenorm``.
"""

from __future__ import annotations

from collections.abc import Sequence
from types import MappingProxyType
from typing import Any

import jax
import jax.numpy as jnp
from flax import nnx
from flax.nnx import rnglib
from flax.nnx.module import first_from
from flax.nnx.nn import dtypes, initializers

from dropnorm import _checks
from dropnorm._batch_norm import BatchNormParams, BatchNormState, batch_norm, batch_renorm
from dropnorm._dropout import alpha_dropout, drop_path, dropout, gaussian_dropout
from dropnorm._masks import DEFAULT_BITS

__all__ = ["AlphaDropout", "BatchNorm", "BatchRenorm", "DropPath", "Dropout", "GaussianDropout"]

_ZEROS = initializers.zeros_init()  # Flax's defaults, as module-level singletons
_ONES = initializers.ones_init()
_UNUSED_KEY_SEED = 0  # see Dropout: a static rate of 1 draws no key, as in Flax


def _train_from(flag: Any, fn: str, name: str) -> bool | jax.Array:
    """``not flag`` for a Python/NumPy/JAX boolean flag (traced flags stay traced)."""
    flag = _checks.check_train(flag, fn, name)
    return (not flag) if isinstance(flag, bool) else jnp.logical_not(flag)


def _feature_shape(num_features, fn):
    if isinstance(num_features, bool):
        num_features = None
    if isinstance(num_features, int):
        shape = (num_features,)
    elif isinstance(num_features, tuple) and all(
            isinstance(n, int) and not isinstance(n, bool) for n in num_features):
        shape = num_features
    else:
        shape = ()
    if not shape or any(n <= 0 for n in shape):
        raise ValueError(f"{fn}: `num_features` must be a positive int (or a tuple of them for "
                         f"several feature axes); got {num_features!r}.")
    return shape


class _BatchNormBase(nnx.Module):
    """Variables and call logic shared by :class:`BatchNorm` and :class:`BatchRenorm`."""

    def __init__(self, num_features, *, use_running_average: bool | None = False,
                 axis: int | Sequence[int] = -1, momentum: float | None = 0.99,
                 epsilon: float = 1e-5, dtype: Any = None, param_dtype: Any = jnp.float32,
                 use_bias: bool = True, use_scale: bool = True,
                 bias_init=_ZEROS, scale_init=_ONES,
                 axis_name: Any = None, axis_index_groups: Any = None,
                 use_fast_variance: bool = True, promote_dtype=dtypes.promote_dtype,
                 rngs: rnglib.Rngs, bias_metadata=MappingProxyType({}),
                 scale_metadata=MappingProxyType({})):
        feature_shape = _feature_shape(num_features, f"dropnorm.nnx.{type(self).__name__}")
        self.mean = nnx.BatchStat(jnp.zeros(feature_shape, jnp.float32))
        self.var = nnx.BatchStat(jnp.ones(feature_shape, jnp.float32))
        if momentum is None:  # the cumulative average needs the number of updates
            self.count = nnx.BatchStat(jnp.zeros((), jnp.int32))
        self.scale: nnx.Param | None
        if use_scale:
            self.scale = nnx.Param(scale_init(rngs.params(), feature_shape, param_dtype),
                                   **scale_metadata)
        else:
            self.scale = nnx.data(None)
        self.bias: nnx.Param | None
        if use_bias:
            self.bias = nnx.Param(bias_init(rngs.params(), feature_shape, param_dtype),
                                  **bias_metadata)
        else:
            self.bias = nnx.data(None)
        self.num_features = num_features
        self.use_running_average = use_running_average
        self.axis = axis
        self.momentum = momentum
        self.epsilon = epsilon
        self.dtype = dtype
        self.param_dtype = param_dtype
        self.use_bias = use_bias
        self.use_scale = use_scale
        self.axis_name = axis_name
        self.axis_index_groups = axis_index_groups
        self.use_fast_variance = use_fast_variance
        self.promote_dtype = promote_dtype

    def _pure(self, params, state, x, train, mask, out_dtype):
        raise NotImplementedError

    def __call__(self, x, use_running_average: bool | None = None, *, mask=None):
        """Normalise ``x`` by batch statistics (training) or running statistics.

        Args:
          x: the input, features along ``axis``.
          use_running_average: True to use the stored running statistics, False
            to use and update the batch's; overrides the attribute. A traced
            bool is accepted.
          mask: optional boolean array broadcastable to ``x``; True elements
            count towards the statistics.

        Returns:
          The normalised ``x``, in Flax's output dtype: ``dtype`` if given, else
          the result type of ``x``, the statistics, ``scale`` and ``bias``.
        """
        fn = f"dropnorm.nnx.{type(self).__name__}"
        use_running_average = first_from(
            use_running_average, self.use_running_average,
            error_msg=(f"{fn}: no `use_running_average` was given. Pass it to the constructor "
                       "or the call, or use model.train() / model.eval() / nnx.view."))
        train = _train_from(use_running_average, fn, "use_running_average")
        x = _checks.check_floating(x, fn)
        axes = _checks.normalize_axes(self.axis, x.ndim, fn)
        if tuple(x.shape[a] for a in axes) != tuple(self.mean[...].shape):
            n = tuple(x.shape[a] for a in axes)
            raise ValueError(
                f"{fn}: `x` of shape {tuple(x.shape)} has {n if len(n) > 1 else n[0]} features "
                f"along axis {self.axis!r}, but the layer was built with num_features="
                f"{self.num_features!r}. Build it with num_features={n if len(n) > 1 else n[0]}, "
                f"or set `axis` to the feature axis.")
        scale = self.scale[...] if self.scale is not None else None
        bias = self.bias[...] if self.bias is not None else None
        # Flax's dtype rule: promote x, statistics, scale and bias together (or cast them to
        # `dtype`). The stored statistics are passed as they are (float32): the pure function
        # computes in at least float32 and casts the output to that dtype.
        x, _, _, scale, bias = self.promote_dtype(
            (x, self.mean[...], self.var[...], scale, bias), dtype=self.dtype)
        count = self.count[...] if self.momentum is None else jnp.zeros((), jnp.int32)
        state = BatchNormState(self.mean[...], self.var[...], count)
        y, new_state = self._pure(BatchNormParams(scale, bias), state, x, train, mask, x.dtype)
        if train is not False:
            # Running statistics never carry gradients (Flax stops them for array refs).
            self.mean[...] = jax.lax.stop_gradient(new_state.mean)
            self.var[...] = jax.lax.stop_gradient(new_state.var)
            if self.momentum is None:
                self.count[...] = new_state.count
        return y

    def set_view(self, use_running_average: bool | None = None):
        """Used by ``nnx.view``: set ``use_running_average`` when given."""
        if use_running_average is not None:
            self.use_running_average = use_running_average


class BatchNorm(_BatchNormBase):
    """Batch normalisation; a drop-in replacement for ``flax.nnx.BatchNorm``.

    Same constructor (``num_features, *, use_running_average=False, axis=-1,
    momentum=0.99, epsilon=1e-5, dtype=None, param_dtype=float32, use_bias,
    use_scale, bias_init, scale_init, axis_name, axis_index_groups,
    use_fast_variance, promote_dtype, rngs, bias_metadata, scale_metadata``),
    call ``(x, use_running_average=None, *, mask=None)``, variables
    (``nnx.Param`` ``scale`` / ``bias``, ``nnx.BatchStat`` ``mean`` / ``var``)
    and output dtype; ``model.train()`` / ``model.eval()`` set
    ``use_running_average``. The arithmetic is :func:`dropnorm.batch_norm`'s.

    Differences from Flax (improvements): the variance is always the accurate
    two-pass one (``use_fast_variance`` is ignored); with ``dtype`` set (e.g.
    bfloat16), inputs and parameters are cast to it as in Flax but the
    normalisation is computed in float32 with float32 running statistics, then
    cast (Flax computes in ``dtype``); ``use_running_average`` may be traced; a
    feature with no unmasked element keeps its statistics; training on one value
    per feature raises an error. Extras: ``num_features`` may be a tuple for a
    tuple ``axis``; ``virtual_batch_size`` (ghost batches); ``momentum=None``
    (cumulative average, with a ``count`` BatchStat).

    Examples:
      >>> import jax.numpy as jnp
      >>> from flax import nnx
      >>> from dropnorm import nnx as dnx
      >>> bn = dnx.BatchNorm(2, momentum=0.9, rngs=nnx.Rngs(0))
      >>> y = bn(jnp.array([[1.0, 10.0], [3.0, 30.0]]))
      >>> y.round(3).tolist(), [round(m, 3) for m in bn.mean[...].tolist()]
      ([[-1.0, -1.0], [1.0, 1.0]], [0.2, 2.0])
      >>> bn.eval()
      >>> bn.use_running_average
      True

    References:
      Ioffe & Szegedy, "Batch Normalization: Accelerating Deep Network Training
      by Reducing Internal Covariate Shift", ICML 2015. Hoffer et al., "Train
      longer, generalize better", NeurIPS 2017 (ghost batches).
    """

    def __init__(self, num_features, *, virtual_batch_size: int | None = None, **kwargs):
        super().__init__(num_features, **kwargs)
        self.virtual_batch_size = virtual_batch_size

    def _pure(self, params, state, x, train, mask, out_dtype):
        return batch_norm(params, state, x, train, axis=self.axis, momentum=self.momentum,
                          epsilon=self.epsilon, mask=mask, axis_name=self.axis_name,
                          axis_index_groups=self.axis_index_groups,
                          virtual_batch_size=self.virtual_batch_size, dtype=out_dtype)


class BatchRenorm(_BatchNormBase):
    """Batch renormalisation (:func:`dropnorm.batch_renorm`); not in Flax.

    :class:`BatchNorm`'s constructor, variables and call (no
    ``virtual_batch_size``) plus ``r_max`` and ``d_max``, so an
    ``nnx.BatchNorm`` state loads into it. ``r_max=1, d_max=0`` is plain batch
    normalisation.

    Examples:
      >>> import jax.numpy as jnp
      >>> from flax import nnx
      >>> from dropnorm import nnx as dnx
      >>> bn = dnx.BatchRenorm(1, r_max=1.0, d_max=0.0, rngs=nnx.Rngs(0))
      >>> bn(jnp.array([[0.0], [4.0]])).round(3).ravel().tolist()
      [-1.0, 1.0]

    References:
      Ioffe, "Batch Renormalization: Towards Reducing Minibatch Dependence in
      Batch-Normalized Models", NeurIPS 2017.
    """

    def __init__(self, num_features, *, r_max: float = 3.0, d_max: float = 5.0, **kwargs):
        super().__init__(num_features, **kwargs)
        self.r_max = r_max
        self.d_max = d_max

    def _pure(self, params, state, x, train, mask, out_dtype):
        return batch_renorm(params, state, x, train, r_max=self.r_max, d_max=self.d_max,
                            axis=self.axis, momentum=self.momentum, epsilon=self.epsilon,
                            mask=mask, axis_name=self.axis_name,
                            axis_index_groups=self.axis_index_groups, dtype=out_dtype)


class Dropout(nnx.Module):
    """Inverted dropout; a drop-in replacement for ``flax.nnx.Dropout``.

    Same constructor ``(rate, *, broadcast_dims=(), deterministic=False,
    rng_collection='dropout', rngs=None)`` (the ``rng_collection`` stream of
    ``rngs`` is forked and stored as ``rngs``, as Flax does), call ``(inputs, *,
    deterministic=None, rngs=None)`` and RNG use: one key per training call
    (none when deterministic or at a static rate of 0 or 1), from the call's
    ``rngs`` (an ``Rngs``, a stream or a key) or the stored stream. The stream's
    counter is module state, so every call under ``nnx.jit`` draws a fresh mask,
    and ``nnx.vmap`` with split RNGs gives each member its own.
    ``model.train()`` / ``model.eval()`` set ``deterministic``. The arithmetic
    is :func:`dropnorm.dropout`'s.

    Differences from Flax: ``rate`` and ``deterministic`` may be traced; the
    keep probability is quantised to ``2**-mask_bits`` (extra keyword, default
    16); the masks differ from Flax's for the same key.

    Examples:
      >>> import jax.numpy as jnp
      >>> from flax import nnx
      >>> from dropnorm import nnx as dnx
      >>> drop = dnx.Dropout(0.5, rngs=nnx.Rngs(dropout=0))
      >>> y1, y2 = drop(jnp.ones(64)), drop(jnp.ones(64))
      >>> bool(jnp.all((y1 == 0) | (y1 == 2))), bool(jnp.any(y1 != y2))
      (True, True)
      >>> drop.eval()
      >>> drop(jnp.ones(3)).tolist()
      [1.0, 1.0, 1.0]

    References:
      Srivastava et al., "Dropout: A Simple Way to Prevent Neural Networks from
      Overfitting", JMLR 2014.
    """

    _pure_fn = staticmethod(dropout)
    _flax_rate_one = True

    def __init__(self, rate: float, *, broadcast_dims: Sequence[int] = (),
                 deterministic: bool | None = False, rng_collection: str = "dropout",
                 rngs: rnglib.Rngs | rnglib.RngStream | None = None, mask_bits: int = DEFAULT_BITS):
        self.rate = rate
        self.broadcast_dims = broadcast_dims
        self.deterministic = deterministic
        self.rng_collection = rng_collection
        self.mask_bits = mask_bits
        if isinstance(rngs, rnglib.Rngs):
            self.rngs = rngs[self.rng_collection].fork()
        elif isinstance(rngs, rnglib.RngStream):
            self.rngs = rngs.fork()
        elif rngs is None:
            self.rngs = nnx.data(None)
        else:
            raise TypeError(f"dropnorm.nnx.{type(self).__name__}: `rngs` must be an nnx.Rngs, "
                            f"an nnx.RngStream or None; got {type(rngs).__name__}.")

    def _extra(self) -> dict:
        return {"broadcast_dims": tuple(self.broadcast_dims), "mask_bits": self.mask_bits}

    def __call__(self, inputs, *, deterministic: bool | None = None, rngs=None):
        """Apply dropout.

        Args:
          inputs: the array to drop elements of.
          deterministic: True to return ``inputs`` unchanged; overrides the
            attribute. A traced bool is accepted.
          rngs: an ``nnx.Rngs``, ``nnx.RngStream`` or key to use instead of the
            stored stream.

        Returns:
          The array after dropout, same shape and dtype.
        """
        fn = f"dropnorm.nnx.{type(self).__name__}"
        deterministic = first_from(
            deterministic, self.deterministic,
            error_msg=(f"{fn}: no `deterministic` was given. Pass it to the constructor or "
                       "the call, or use model.train() / model.eval() / nnx.view."))
        train = _train_from(deterministic, fn, "deterministic")
        rate = _checks.check_rate(self.rate, fn)
        if train is False or (isinstance(rate, float) and rate == 0.0):
            return inputs
        if self._flax_rate_one and isinstance(rate, float) and rate == 1.0:
            key = jax.random.key(_UNUSED_KEY_SEED)  # drops everything whatever the key
        else:
            rngs = first_from(
                rngs, self.rngs,
                error_msg=(f"{fn}: the layer is training but has no RNG: pass `rngs` to the "
                           "constructor (e.g. rngs=nnx.Rngs(dropout=0)) or to the call."))
            if isinstance(rngs, rnglib.Rngs):
                key = rngs[self.rng_collection]()
            elif isinstance(rngs, rnglib.RngStream):
                key = rngs()
            elif isinstance(rngs, jax.Array):
                key = rngs
            else:
                raise TypeError(f"{fn}: `rngs` must be an nnx.Rngs, an nnx.RngStream or a key; "
                                f"got {type(rngs).__name__}.")
        return type(self)._pure_fn(key, inputs, self.rate, train, **self._extra())

    def set_view(self, deterministic: bool | None = None):
        """Used by ``nnx.view``: set ``deterministic`` when given."""
        if deterministic is not None:
            self.deterministic = deterministic


class AlphaDropout(Dropout):
    """Alpha dropout for SELU networks (:func:`dropnorm.alpha_dropout`); not in Flax.

    Constructor and call as :class:`Dropout`.

    Examples:
      >>> import jax
      >>> from flax import nnx
      >>> from dropnorm import nnx as dnx
      >>> x = jax.random.normal(jax.random.key(0), (100_000,))
      >>> y = dnx.AlphaDropout(0.2, rngs=nnx.Rngs(dropout=1))(x)
      >>> bool(abs(y.mean()) < 0.02 and abs(y.std() - 1) < 0.02)
      True

    References:
      Klambauer et al., "Self-Normalizing Neural Networks", NeurIPS 2017.
    """

    _pure_fn = staticmethod(alpha_dropout)
    _flax_rate_one = False


class GaussianDropout(Dropout):
    """Multiplicative Gaussian noise (:func:`dropnorm.gaussian_dropout`); not in Flax.

    Constructor and call as :class:`Dropout` (``mask_bits`` is ignored).

    Examples:
      >>> import jax.numpy as jnp
      >>> from flax import nnx
      >>> from dropnorm import nnx as dnx
      >>> y = dnx.GaussianDropout(0.5, rngs=nnx.Rngs(dropout=0))(jnp.ones(100_000))
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


class DropPath(Dropout):
    """Stochastic depth: drop whole examples of a residual branch; not in Flax.

    Constructor and call as :class:`Dropout` without ``broadcast_dims`` (every
    axis but the batch axis 0 shares the mask); see :func:`dropnorm.drop_path`.

    Examples:
      >>> import jax.numpy as jnp
      >>> from flax import nnx
      >>> from dropnorm import nnx as dnx
      >>> y = dnx.DropPath(0.5, rngs=nnx.Rngs(dropout=0))(jnp.ones((8, 3)))
      >>> bool(jnp.all(y.min(1) == y.max(1)))
      True

    References:
      Huang et al., "Deep Networks with Stochastic Depth", ECCV 2016.
    """

    _pure_fn = staticmethod(drop_path)
    _flax_rate_one = False

    def __init__(self, rate: float, *, deterministic: bool | None = False,
                 rng_collection: str = "dropout",
                 rngs: rnglib.Rngs | rnglib.RngStream | None = None, mask_bits: int = DEFAULT_BITS):
        super().__init__(rate, deterministic=deterministic, rng_collection=rng_collection,
                         rngs=rngs, mask_bits=mask_bits)

    def _extra(self):
        return {"mask_bits": self.mask_bits}
