"""Drop-in ``flax.nnx`` modules: BatchNorm, Dropout and their family.

Change one import and keep everything else, checkpoints included::

    from dropnorm import nnx as dnx   # next to ``from flax import nnx``
    self.bn = dnx.BatchNorm(64, rngs=rngs)
    self.drop = dnx.Dropout(0.1, rngs=rngs)

:class:`BatchNorm` and :class:`BatchRenorm` subclass ``flax.nnx.BatchNorm``;
:class:`Dropout` and the rest of the family subclass ``flax.nnx.Dropout``. So
``isinstance``, ``model.set_attributes(nnx.Dropout, ...)``,
``nnx.view(model, only=nnx.BatchNorm, ...)``, ``nnx.view_info``,
``nnx.display`` and ``nnx.tabulate`` treat them as Flax's own. The modules have
``flax.nnx``'s constructor and call signatures (written out: ``help`` and
``inspect.signature`` show them) and attribute names: ``nnx.Param`` ``scale`` /
``bias`` and ``nnx.BatchStat`` ``mean`` / ``var`` (Dropout: the forked ``rngs``
stream), so ``nnx.state`` has Flax's structure and
``nnx.update(ours, nnx.state(theirs))`` works both ways; ``model.train()`` /
``model.eval()`` / ``nnx.view`` switch ``use_running_average`` and
``deterministic``; dropout advances its RNG stream on every call, so it draws a
fresh mask under ``nnx.jit`` and a different one per member under ``nnx.vmap``
with split RNGs. One value per feature in training is normalised as Flax does
(to the bias), so ``nnx.scan`` / ``nnx.vmap`` with a per-step batch of 1 and
``nnx.tabulate`` on a one-example input work. The output dtype follows Flax's
rule (``promote_dtype``, then ``dtype`` or the result type of the input, scale
and bias). Errors name the module and its own arguments. The modules hold no
arithmetic: they store variables and call the pure functions
(:func:`dropnorm.batch_norm`, :func:`dropnorm.dropout`, ...), which is where
every difference from Flax comes from:

* the variance is always the accurate shifted one (``use_fast_variance`` is
  accepted and ignored), and normalisation is computed in at least float32
  before casting to ``dtype`` (Flax computes in ``dtype``, e.g. bfloat16, and
  casts the running statistics to it);
* ``rate`` and ``deterministic`` / ``use_running_average`` may be traced;
* dropout's keep probability is quantised to ``2**-mask_bits`` and its masks
  differ from Flax's for the same key;
* a feature with no unmasked element is normalised by the running statistics
  and keeps them (Flax outputs NaN and stores it);
* complex inputs: the running ``mean`` becomes complex and keeps the whole
  batch mean (Flax casts it into its float32 variable, dropping the imaginary
  part); the variance and the training output are Flax's;
* extras: ``num_features`` may be a tuple (several feature axes),
  ``virtual_batch_size``, ``momentum=None`` (stores a ``count`` BatchStat),
  ``mask_bits``, and ``AlphaDropout``, ``GaussianDropout``, ``DropPath``,
  ``BatchRenorm``.
"""

from __future__ import annotations

import inspect
from collections.abc import Mapping, Sequence
from types import MappingProxyType
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

try:
    from flax import nnx
    from flax.nnx import rnglib
    from flax.nnx.module import first_from
    from flax.nnx.nn import dtypes, initializers
except ModuleNotFoundError as _err:  # only a missing Flax gets the install hint
    if (_err.name or "").partition(".")[0] != "flax":
        raise
    raise ImportError(
        'dropnorm.nnx needs Flax, which is not installed. Install it with: '
        'pip install "dropnorm[flax]"') from _err

from dropnorm import _checks
from dropnorm._batch_norm import BatchNormParams, BatchNormState, batch_norm_as, batch_renorm_as
from dropnorm._checks import Caller
from dropnorm._dropout import drop_block_as, random_map_as
from dropnorm._masks import DEFAULT_BITS
from dropnorm._moments import real_dtype
from dropnorm._population import cached_step, empty_stats, finalize, fold_batches, unreached

__all__ = ["AlphaDropout", "BatchNorm", "BatchRenorm", "DropBlock", "DropPath", "Dropout",
           "GaussianDropout", "mc_dropout_fn", "recompute_batch_norm"]

_ZEROS = initializers.zeros_init()  # Flax's defaults
_ONES = initializers.ones_init()
_UNUSED_KEY_SEED = 0  # see Dropout: a static rate of 1 draws no key, as in Flax


class _ConstructorSignature:
    """``inspect.signature(cls)`` (and ``help``) show ``__init__``'s arguments instead of
    the ``(*args, **kwargs)`` of NNX's metaclass; instances keep their ``__call__``'s."""

    def __get__(self, obj, cls):
        if obj is not None:
            raise AttributeError("__signature__")
        sig = inspect.signature(cls.__init__)
        return sig.replace(parameters=list(sig.parameters.values())[1:])


def _name(module) -> str:
    """``dropnorm.nnx.<class>`` for the first dropnorm class of ``module``."""
    for cls in type(module).__mro__:
        if cls.__module__ == __name__:
            return f"dropnorm.nnx.{cls.__name__}"
    return f"dropnorm.nnx.{type(module).__name__}"  # pragma: no cover


_train_from = _checks.train_from_off_flag  # one check for both shells (dropnorm._checks)


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


def _unpromoted(promoted, original):
    """``original`` where ``promote_dtype`` only made a real parameter complex, else
    ``promoted``."""
    if (original is not None and jnp.iscomplexobj(promoted)
            and not jnp.iscomplexobj(original)):
        return original.astype(jnp.finfo(promoted.dtype).dtype)
    return promoted


def _batch_of_one(x, mask, feature_axes):
    """``x`` (and ``mask``) with a leading batch axis of size 1 and the feature axes moved
    past it: the pure function needs an axis to reduce over, Flax reduces over none."""
    if mask is not None:
        mask = jnp.broadcast_to(jnp.asarray(mask), x.shape)[None]
    return x[None], mask, tuple(a + 1 for a in feature_axes)


def _promoted(layer, x):
    """``(x, scale, bias, out_dtype)`` of a BatchNorm layer under Flax's dtype rule.

    Flax promotes x, the statistics, scale and bias together (or casts them to ``dtype``)
    and gives the output ``dtype``, else the result type of x, scale and bias. The stored
    statistics are passed as they are (float32): the pure function computes in at least
    float32 and casts the output to that dtype. A complex input promotes real parameters
    to complex (zero imaginary part); the pure function takes them real, as they are.
    """
    scale = layer.scale[...] if layer.scale is not None else None
    bias = layer.bias[...] if layer.bias is not None else None
    x, _, _, scale_p, bias_p = layer.promote_dtype(
        (x, layer.mean[...], layer.var[...], scale, bias), dtype=layer.dtype)
    out_dtype = dtypes.canonicalize_dtype(x, scale_p, bias_p, dtype=layer.dtype)
    scale, bias = (_unpromoted(p, v) for p, v in ((scale_p, scale), (bias_p, bias)))
    return x, scale, bias, out_dtype


def _store(variable, value):
    """Write a new running statistic: in place when the dtype is unchanged; replaced when a
    complex input turns a real running mean complex (writing in place would drop the
    imaginary part)."""
    value = jax.lax.stop_gradient(value)  # running statistics never carry gradients
    if value.dtype == variable[...].dtype:
        variable[...] = value
    else:
        variable.set_value(value)


def _init_batch_norm(self, num_features, *, use_running_average, axis, momentum, epsilon,
                     dtype, param_dtype, use_bias, use_scale, bias_init, scale_init, axis_name,
                     axis_index_groups, use_fast_variance, promote_dtype, rngs, bias_metadata,
                     scale_metadata):
    """Flax's ``nnx.BatchNorm.__init__`` for a feature shape (a tuple ``num_features``) and
    a cumulative average (``momentum=None`` stores a ``count``)."""
    feature_shape = _feature_shape(num_features, _name(self))
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


class _BatchNormShell(nnx.BatchNorm):
    """The call shared by :class:`BatchNorm` and :class:`BatchRenorm` (``set_view`` is
    Flax's)."""

    __signature__ = _ConstructorSignature()

    def _pure(self, caller, params, state, x, train, **kw):
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
          the result type of ``x``, ``scale`` and ``bias`` after
          ``promote_dtype``.
        """
        fn = _name(self)
        caller = Caller(fn, train_off="use_running_average=True (or model.eval())",
                        x_name="x", flax_small_batch=True)
        use_running_average = first_from(
            use_running_average, self.use_running_average,
            error_msg=(f"{fn}: no `use_running_average` was given. Pass it to the constructor "
                       "or the call, or use model.train() / model.eval() / nnx.view."))
        train = _train_from(use_running_average, caller, "use_running_average")
        if _checks.is_key(x):  # a swapped argument: the core's message, before Flax's dtype rules
            _checks.check_floating(x, caller.fn)
        x = jnp.asarray(x)
        axes = _checks.normalize_axes(self.axis, x.ndim, fn)
        n = tuple(x.shape[a] for a in axes)
        if n != tuple(self.var[...].shape):
            n = n if len(n) > 1 else n[0]
            raise ValueError(
                f"{fn}: `x` of shape {tuple(x.shape)} has {n} features along axis "
                f"{self.axis!r}, but the layer was built with num_features="
                f"{self.num_features!r}. Build it with num_features={n}, or set `axis` to the "
                f"feature axis.")
        x, scale, bias, out_dtype = _promoted(self, x)
        count = self.count[...] if self.momentum is None else jnp.zeros((), jnp.int32)
        state = BatchNormState(self.mean[...], self.var[...], count)
        xb, maskb, axis = x, mask, self.axis
        if train is not False and self.axis_name is None and len(axes) == x.ndim:
            # Every axis a feature axis (a 1-D input with axis=-1): Flax normalises it as a
            # batch of one.
            xb, maskb, axis = _batch_of_one(x, mask, axes)
        y, new_state = self._pure(
            caller, BatchNormParams(scale, bias), state, xb, train, axis=axis,
            momentum=self.momentum, epsilon=self.epsilon, mask=maskb, axis_name=self.axis_name,
            axis_index_groups=self.axis_index_groups, dtype=out_dtype)
        y = y.reshape(x.shape)
        if train is not False:
            _store(self.mean, new_state.mean)
            _store(self.var, new_state.var)
            if self.momentum is None:
                self.count[...] = new_state.count
        return y


class BatchNorm(_BatchNormShell):
    """Batch normalisation; a drop-in replacement for ``flax.nnx.BatchNorm``.

    A subclass of ``flax.nnx.BatchNorm`` with the same constructor
    (``num_features, *, use_running_average=False, axis=-1, momentum=0.99,
    epsilon=1e-5, dtype=None, param_dtype=float32, use_bias, use_scale,
    bias_init, scale_init, axis_name, axis_index_groups, use_fast_variance,
    promote_dtype, rngs, bias_metadata, scale_metadata``), call ``(x,
    use_running_average=None, *, mask=None)``, variables (``nnx.Param``
    ``scale`` / ``bias``, ``nnx.BatchStat`` ``mean`` / ``var``), ``set_view``
    and output dtype; ``model.train()`` / ``model.eval()`` set
    ``use_running_average``. One value per feature in training is normalised
    as Flax does (to ``bias``). The arithmetic is :func:`dropnorm.batch_norm`'s.

    Differences from Flax (improvements): the variance is always the accurate
    shifted one (``use_fast_variance`` is ignored); with ``dtype`` set (e.g.
    bfloat16), inputs and parameters are cast to it as in Flax but the
    normalisation is computed in float32 with float32 running statistics, then
    cast (Flax computes in ``dtype``); ``use_running_average`` may be traced; a
    feature with no unmasked element is normalised by the running statistics
    and keeps them (Flax: NaN); a complex input makes the running ``mean``
    complex, keeping the whole batch mean (Flax keeps only its real part).
    Extras: ``num_features`` may be a tuple for a tuple ``axis``;
    ``virtual_batch_size`` (ghost batches); ``momentum=None`` (cumulative
    average, with a ``count`` BatchStat).

    Args:
      num_features: the number of features, or a tuple of them for a tuple
        ``axis``.
      virtual_batch_size: ghost batch normalisation (dropnorm extra):
        statistics per chunk of this many examples along axis 0.

    The other arguments are ``flax.nnx.BatchNorm``'s.

    Examples:
      >>> import jax.numpy as jnp
      >>> from flax import nnx
      >>> from dropnorm import nnx as dnx
      >>> bn = dnx.BatchNorm(2, momentum=0.9, rngs=nnx.Rngs(0))
      >>> isinstance(bn, nnx.BatchNorm)
      True
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

    def __init__(
        self,
        num_features: int | tuple[int, ...],
        *,
        use_running_average: bool | None = False,
        axis: int | Sequence[int] = -1,
        momentum: float | None = 0.99,
        epsilon: float = 1e-5,
        dtype: Any = None,
        param_dtype: Any = jnp.float32,
        use_bias: bool = True,
        use_scale: bool = True,
        bias_init: Any = _ZEROS,
        scale_init: Any = _ONES,
        axis_name: Any = None,
        axis_index_groups: Any = None,
        use_fast_variance: bool = True,
        promote_dtype: Any = dtypes.promote_dtype,
        rngs: rnglib.Rngs,
        bias_metadata: Mapping[str, Any] = MappingProxyType({}),
        scale_metadata: Mapping[str, Any] = MappingProxyType({}),
        virtual_batch_size: int | None = None,
    ):
        _init_batch_norm(
            self, num_features, use_running_average=use_running_average, axis=axis,
            momentum=momentum, epsilon=epsilon, dtype=dtype, param_dtype=param_dtype,
            use_bias=use_bias, use_scale=use_scale, bias_init=bias_init, scale_init=scale_init,
            axis_name=axis_name, axis_index_groups=axis_index_groups,
            use_fast_variance=use_fast_variance, promote_dtype=promote_dtype, rngs=rngs,
            bias_metadata=bias_metadata, scale_metadata=scale_metadata)
        self.virtual_batch_size = virtual_batch_size

    def _pure(self, caller, params, state, x, train, **kw):
        return batch_norm_as(caller, params, state, x, train,
                             virtual_batch_size=self.virtual_batch_size, **kw)


class BatchRenorm(_BatchNormShell):
    """Batch renormalisation (:func:`dropnorm.batch_renorm`); not in Flax.

    A ``flax.nnx.BatchNorm`` subclass with its constructor, variables and call
    (no ``virtual_batch_size``) plus ``r_max`` and ``d_max``, so an
    ``nnx.BatchNorm`` state loads into it. ``r_max=1, d_max=0`` is plain batch
    normalisation.

    The other arguments are :class:`BatchNorm`'s.

    Args:
      r_max: bound on the scale correction ``r`` (>= 1).
      d_max: bound on the shift correction ``|d|`` (>= 0).

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

    def __init__(
        self,
        num_features: int | tuple[int, ...],
        *,
        use_running_average: bool | None = False,
        axis: int | Sequence[int] = -1,
        momentum: float | None = 0.99,
        epsilon: float = 1e-5,
        dtype: Any = None,
        param_dtype: Any = jnp.float32,
        use_bias: bool = True,
        use_scale: bool = True,
        bias_init: Any = _ZEROS,
        scale_init: Any = _ONES,
        axis_name: Any = None,
        axis_index_groups: Any = None,
        use_fast_variance: bool = True,
        promote_dtype: Any = dtypes.promote_dtype,
        rngs: rnglib.Rngs,
        bias_metadata: Mapping[str, Any] = MappingProxyType({}),
        scale_metadata: Mapping[str, Any] = MappingProxyType({}),
        r_max: float = 3.0,
        d_max: float = 5.0,
    ):
        _init_batch_norm(
            self, num_features, use_running_average=use_running_average, axis=axis,
            momentum=momentum, epsilon=epsilon, dtype=dtype, param_dtype=param_dtype,
            use_bias=use_bias, use_scale=use_scale, bias_init=bias_init, scale_init=scale_init,
            axis_name=axis_name, axis_index_groups=axis_index_groups,
            use_fast_variance=use_fast_variance, promote_dtype=promote_dtype, rngs=rngs,
            bias_metadata=bias_metadata, scale_metadata=scale_metadata)
        self.r_max = r_max
        self.d_max = d_max

    def _pure(self, caller, params, state, x, train, **kw):
        return batch_renorm_as(caller, params, state, x, train, r_max=self.r_max,
                               d_max=self.d_max, **kw)


class Dropout(nnx.Dropout):
    """Inverted dropout; a drop-in replacement for ``flax.nnx.Dropout``.

    A subclass of ``flax.nnx.Dropout`` with the same constructor ``(rate, *,
    broadcast_dims=(), deterministic=False, rng_collection='dropout',
    rngs=None)`` (the ``rng_collection`` stream of ``rngs`` is forked and
    stored as ``rngs``, as Flax does), call ``(inputs, *, deterministic=None,
    rngs=None)``, ``set_view`` and RNG use: one key per training call (none
    when deterministic or at a static rate of 0 or 1), from the call's ``rngs``
    (an ``Rngs``, a stream or a key) or the stored stream. The stream's counter
    is module state, so every call under ``nnx.jit`` draws a fresh mask, and
    ``nnx.vmap`` with split RNGs gives each member its own. ``model.train()`` /
    ``model.eval()`` set ``deterministic``. The arithmetic is
    :func:`dropnorm.dropout`'s.

    Differences from Flax: ``rate`` and ``deterministic`` may be traced; the
    keep probability is quantised to ``2**-mask_bits`` (extra keyword, default
    16); the masks differ from Flax's for the same key; a rate outside [0, 1]
    is an error.

    Args:
      rate: the probability of dropping an element.
      broadcast_dims: axes that share one mask value.
      deterministic: True to return the input unchanged.
      rng_collection: the stream of ``rngs`` to fork.
      rngs: an ``nnx.Rngs`` or ``nnx.RngStream`` (or None: pass one at call time).
      mask_bits: 16 or 32: the resolution of the keep probability (extra).

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

    __signature__ = _ConstructorSignature()
    _kind = "dropout"  # the pure function: dropout, alpha, gaussian, drop_path

    def __init__(
        self,
        rate: float,
        *,
        broadcast_dims: Sequence[int] = (),
        deterministic: bool | None = False,
        rng_collection: str = "dropout",
        rngs: rnglib.Rngs | rnglib.RngStream | None = None,
        mask_bits: int = DEFAULT_BITS,
    ):
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
            raise TypeError(f"{_name(self)}: `rngs` must be an nnx.Rngs, an nnx.RngStream or "
                            f"None; got {type(rngs).__name__}.")

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
        fn = _name(self)
        caller = Caller(fn, train_off="deterministic=True (or model.eval())", x_name="inputs")
        deterministic = first_from(
            deterministic, self.deterministic,
            error_msg=(f"{fn}: no `deterministic` was given. Pass it to the constructor or "
                       "the call, or use model.train() / model.eval() / nnx.view."))
        train = _train_from(deterministic, caller, "deterministic")
        rate = _checks.check_rate(self.rate, fn)
        if _checks.is_key(inputs):
            raise TypeError(
                f"{fn}: `inputs` is a PRNG key ({inputs.dtype}), not data: were `inputs` and "
                f"`rngs` swapped? Call the layer on the array to drop, and pass the key as "
                f"`rngs`.")
        self._check_args(caller, inputs)
        if train is False or (isinstance(rate, float) and rate == 0.0):
            return inputs
        if self._kind == "dropout" and isinstance(rate, float) and rate == 1.0:
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
            elif isinstance(rngs, (jax.Array, np.ndarray)):
                try:  # the core's check, naming this call's argument
                    key = _checks.check_key(rngs, fn, caller.train_off)
                except TypeError as err:
                    raise TypeError(str(err).replace("`key`", "`rngs`", 1)) from None
            else:
                raise TypeError(f"{fn}: `rngs` must be an nnx.Rngs, an nnx.RngStream or a key; "
                                f"got {type(rngs).__name__}.")
        return self._drop(caller, key, inputs, train)

    def _check_args(self, caller, inputs) -> None:
        """Checks of the layer's arguments that run in evaluation too (none here)."""

    def _drop(self, caller, key, inputs, train):
        return random_map_as(caller, self._kind, key, inputs, self.rate, train, **self._extra())


class AlphaDropout(Dropout):
    """Alpha dropout for SELU networks (:func:`dropnorm.alpha_dropout`); not in Flax.

    Constructor and call as :class:`Dropout` (an ``nnx.Dropout`` subclass too).

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

    _kind = "alpha"


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

    _kind = "gaussian"

    def _extra(self):  # normal noise: the resolution of a mask does not apply
        return {"broadcast_dims": tuple(self.broadcast_dims), "mask_bits": 32}


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

    _kind = "drop_path"

    def __init__(
        self,
        rate: float,
        *,
        deterministic: bool | None = False,
        rng_collection: str = "dropout",
        rngs: rnglib.Rngs | rnglib.RngStream | None = None,
        mask_bits: int = DEFAULT_BITS,
    ):
        super().__init__(rate, deterministic=deterministic, rng_collection=rng_collection,
                         rngs=rngs, mask_bits=mask_bits)

    def _extra(self):
        return {"mask_bits": self.mask_bits}


# --- population statistics (PreciseBN): recomputed over many batches, written in place ------

_RECOMPUTE = "dropnorm.nnx.recompute_batch_norm"
_GATHERING: dict[int, list] = {}  # while a step traces: id(layer of the copy) -> [name, stats]
_SWAPPED: dict[tuple[type, bool], type] = {}


def _population_call(self, x, use_running_average=None, *, mask=None):
    """A BatchNorm layer (Flax's or dropnorm's) while recomputing: normalised by the batch's
    statistics, which are added to the layer's PopulationStats."""
    del use_running_average  # the batch's statistics whatever the flag (PreciseBN)
    entry = _GATHERING.get(id(self))
    if entry is None:
        raise NotImplementedError(
            f"{_RECOMPUTE}: a BatchNorm layer was called inside an NNX transform (nnx.scan, "
            f"nnx.vmap, nnx.remat, ...) of the model's forward, where its statistics cannot "
            f"be followed; call the layers directly in `call`.")
    name, stats = entry
    caller = Caller(f"{_RECOMPUTE} (layer {name})", x_name="x", flax_small_batch=True)
    if _checks.is_key(x):
        _checks.check_floating(x, caller.fn)
    x = jnp.asarray(x)
    axes = _checks.normalize_axes(self.axis, x.ndim, caller.fn)
    x, scale, bias, out_dtype = _promoted(self, x)  # as the modules apply it
    if stats is None:
        stats = empty_stats(tuple(x.shape[a] for a in axes), x.dtype, real_dtype(x.dtype))
    xb, maskb, axis = x, mask, self.axis
    if len(axes) == x.ndim:  # as the module: a batch of one
        xb, maskb, axis = _batch_of_one(x, mask, axes)
    y, entry[1] = batch_norm_as(caller, BatchNormParams(scale, bias), stats, xb, True,
                                axis=axis, epsilon=self.epsilon, mask=maskb, dtype=out_dtype)
    return y.reshape(x.shape)


def _identity_call(self, inputs, *args, **kwargs):
    """A dropout layer while recomputing: off, whatever its flags (evaluation's inputs)."""
    return inputs


def _swap(module, batch_norm: bool) -> None:
    """Give ``module`` (a layer of the step's private copy) the recomputing ``__call__``.

    Its class becomes a subclass that overrides only ``__call__``: that catches every call,
    however the model reaches the layer (attributes, lists, shared layers, closures).
    """
    cls = type(module)
    key = (cls, batch_norm)
    if key not in _SWAPPED:
        _SWAPPED[key] = type(cls)(cls.__name__, (cls,), {
            "__call__": _population_call if batch_norm else _identity_call,
            "__module__": cls.__module__, "__qualname__": cls.__qualname__})
    object.__setattr__(module, "__class__", _SWAPPED[key])


def _call_model(model, batch):
    return model(batch)


def _population_step(graphdef, call):
    """One batch on a private copy of the model: every BatchNorm gathers, dropout is off."""

    def step(state, stats, batch):
        copy = nnx.merge(graphdef, state)
        copy.set_attributes(deterministic=True, raise_if_not_found=False)
        gathering = {}
        for path, m in nnx.iter_modules(copy):
            if isinstance(m, nnx.BatchNorm) and id(m) not in gathering:
                name = _layer_name(path)
                gathering[id(m)] = [name, stats[name]]
                _swap(m, True)
            elif isinstance(m, nnx.Dropout):
                _swap(m, False)
        _GATHERING.update(gathering)
        try:
            call(copy, batch)
        finally:
            for k in gathering:
                del _GATHERING[k]
        return {name: s for name, s in gathering.values()}

    return step


def _layer_name(path) -> str:
    return ".".join(str(p) for p in path) or "(the model itself)"


def recompute_batch_norm(model: nnx.Module, batches: Any, *, call=None) -> None:
    """Recompute every BatchNorm layer's statistics over ``batches``, in place (PreciseBN).

    Runs ``call(model, batch)`` (default ``model(batch)``) on each batch, with
    every ``nnx.BatchNorm`` (Flax's, :class:`BatchNorm`, :class:`BatchRenorm`)
    normalising by its batch's statistics and adding the batch's moments to
    exact population statistics; then sets each layer's ``mean`` and ``var``
    to the mean and biased variance of all its inputs over all batches (and
    ``count``, where a layer keeps one, to the number of batches), as NNX
    updates state: in place. See :func:`dropnorm.recompute_batch_norm` for the
    formula and how it differs from PyTorch's ``update_bn``.

    Each step runs under ``jax.jit`` on a private copy of the model (``nnx.split``
    / ``nnx.merge``), so nothing else in ``model`` changes: not its flags, RNG
    counters or other state. In the copy every BatchNorm uses its batch's
    statistics whatever ``use_running_average``, over the whole batch it is
    given (no ``axis_name``, ``axis_index_groups`` or ghost batches; batch
    renormalisation without its corrections), and dropout is off
    (``nnx.Dropout`` and its subclasses are the identity; every other layer
    gets ``deterministic=True``): at evaluation the layers see inputs without
    dropout, so their statistics should too. The layers must be called
    directly by the forward, not inside an NNX transform (``nnx.scan``, ...).

    Args:
      model: the ``flax.nnx`` Module (e.g. with averaged weights).
      batches: a non-empty iterable of batches.
      call: ``(model, batch) -> anything``, how to run the model on a batch;
        default ``model(batch)``.

    Returns:
      None: ``model``'s BatchNorm statistics are updated in place.

    Raises:
      ValueError: ``batches`` empty; ``model`` without an ``nnx.BatchNorm``;
        a BatchNorm layer the forward did not call.
      TypeError: ``model`` not an NNX Module; ``batches`` an array or not
        iterable.
      NotImplementedError: a BatchNorm layer called inside an NNX transform.

    Examples:
      >>> import jax, jax.numpy as jnp
      >>> from flax import nnx
      >>> from dropnorm import nnx as dnx
      >>> model = nnx.Sequential(nnx.Linear(5, 4, rngs=nnx.Rngs(0)),
      ...                        dnx.BatchNorm(4, rngs=nnx.Rngs(0)))
      >>> xs = jax.random.normal(jax.random.key(0), (3, 8, 5))  # three batches of 8
      >>> dnx.recompute_batch_norm(model, list(xs))
      >>> h = model.layers[0](xs.reshape(24, 5))
      >>> bool(jnp.allclose(model.layers[1].mean[...], h.mean(0), atol=1e-5))
      True

    References:
      Wu & Johnson, "Rethinking 'Batch' in BatchNorm", 2021 (PreciseBN).
      Izmailov et al., "Averaging Weights Leads to Wider Optima and Better
      Generalization", UAI 2018 (SWA).
    """
    if not isinstance(model, nnx.Module):
        raise TypeError(f"{_RECOMPUTE}: `model` must be a flax.nnx Module; got "
                        f"{type(model).__name__}.")
    call = _call_model if call is None else call
    if not callable(call):
        raise TypeError(f"{_RECOMPUTE}: `call` must be a function (model, batch) -> output, "
                        f"or None for model(batch); got {call!r}.")
    layers = {}
    for path, m in nnx.iter_modules(model):
        if isinstance(m, nnx.BatchNorm) and all(m is not n for n in layers.values()):
            layers[_layer_name(path)] = m
    if not layers:
        raise ValueError(
            f"{_RECOMPUTE}: `model` ({type(model).__name__}) has no BatchNorm layer "
            f"(flax.nnx.BatchNorm, dropnorm.nnx.BatchNorm or BatchRenorm), so there are no "
            f"statistics to recompute.")
    graphdef, state = nnx.split(model)
    step, jitted = cached_step(("nnx", graphdef, call),
                               lambda: _population_step(graphdef, call))

    def start(first):
        none = {name: None for name in layers}
        shapes = jax.eval_shape(step, state, none, first)
        return {name: empty_stats(m.mean[...].shape, m.mean[...].dtype, jnp.float32)
                if shapes[name] is None else
                jax.tree.map(lambda s: jnp.zeros(s.shape, s.dtype), shapes[name])
                for name, m in layers.items()}

    stats, _ = fold_batches(_RECOMPUTE, batches, start, lambda s, b: jitted(state, s, b))
    missing = unreached(stats)
    if missing:
        raise ValueError(
            f"{_RECOMPUTE}: the BatchNorm layers {', '.join(missing)} of `model` were not "
            f"called on the batches, so they have no statistics to recompute: make `call` run "
            f"every BatchNorm layer of the model.")
    for name, m in layers.items():
        count = getattr(m, "count", None)
        counted = isinstance(count, nnx.Variable)
        old = BatchNormState(m.mean[...], m.var[...],
                             count[...] if counted else jnp.zeros((), jnp.int32))
        new = finalize(stats[name], old, False, _RECOMPUTE)
        _store(m.mean, new.mean)
        _store(m.var, new.var)
        if counted:
            count[...] = new.count


class DropBlock(Dropout):
    """DropBlock: drop contiguous regions of feature maps (:func:`dropnorm.drop_block`); not in
    Flax.

    Every position of every feature map is a seed; each dropped seed drops the
    ``block_size x block_size`` block centred on it, with the seed probability chosen so
    that a fraction ``rate`` of the interior is dropped, and the survivors are scaled by
    ``1 / (1 - rate)``. An ``nnx.Dropout`` subclass with :class:`Dropout`'s RNG use and
    call, so ``model.train()`` / ``model.eval()``, ``nnx.view(model, only=nnx.Dropout,
    deterministic=...)`` and ``set_attributes(nnx.Dropout, ...)`` switch it. The block's
    arguments are checked in evaluation too, so a model that evaluates also trains.

    Args:
      rate: the fraction of the (interior) feature map to drop, in [0, 1].
      block_size: the block's size: an int, or a tuple of one per spatial axis; at most
        the feature map's size.
      spatial_axes: the feature map's axes (default ``(1, 2)``: NHWC).
      channel_axis: the channel axis (default -1), or None.
      share_channels: one mask for every channel of an example, instead of one per
        channel.
      deterministic: True to return the input unchanged.
      rng_collection: the stream of ``rngs`` to fork.
      rngs: an ``nnx.Rngs`` or ``nnx.RngStream`` (or None: pass one at call time).
      mask_bits: 16 or 32: the resolution of the seeds' keep probability.

    Examples:
      >>> import jax.numpy as jnp
      >>> from flax import nnx
      >>> from dropnorm import nnx as dnx
      >>> drop = dnx.DropBlock(0.2, block_size=5, rngs=nnx.Rngs(dropout=0))
      >>> x = jnp.ones((2, 16, 16, 3))
      >>> sorted(set(jnp.round(drop(x), 3).ravel().tolist()))  # scaled by 1 / (1 - rate)
      [0.0, 1.25]
      >>> drop.eval()
      >>> bool(jnp.all(drop(x) == x))
      True

    References:
      Ghiasi, Lin & Le, "DropBlock: A regularization method for convolutional networks",
      NeurIPS 2018.
    """

    _kind = "block"

    def __init__(
        self,
        rate: float,
        *,
        block_size: int | tuple[int, ...],
        spatial_axes: Sequence[int] = (1, 2),
        channel_axis: int | None = -1,
        share_channels: bool = False,
        deterministic: bool | None = False,
        rng_collection: str = "dropout",
        rngs: rnglib.Rngs | rnglib.RngStream | None = None,
        mask_bits: int = DEFAULT_BITS,
    ):
        super().__init__(rate, deterministic=deterministic, rng_collection=rng_collection,
                         rngs=rngs, mask_bits=mask_bits)
        self.block_size = block_size
        self.spatial_axes = spatial_axes
        self.channel_axis = channel_axis
        self.share_channels = share_channels

    def _block(self) -> dict:
        return {"block_size": self.block_size, "spatial_axes": self.spatial_axes,
                "channel_axis": self.channel_axis, "share_channels": self.share_channels,
                "mask_bits": self.mask_bits}

    def _check_args(self, caller, inputs) -> None:
        drop_block_as(caller, None, inputs, 0.0, False, **self._block())

    def _drop(self, caller, key, inputs, train):
        return drop_block_as(caller, key, inputs, self.rate, train, **self._block())


# --- Monte-Carlo dropout: dropout on, statistics frozen, the model left untouched ----------


def _reseed_every_stream(model, key) -> None:
    """Give every RNG stream of ``model`` its own key derived from ``key`` (count 0).

    Every stream, not only those tagged ``'dropout'``: a layer built with ``nnx.Rngs(0)``
    forks the ``'default'`` stream. Each gets ``fold_in(key, i)``, so two layers never
    share a key (``nnx.reseed(model, dropout=key)`` gives one per stream of a tag but
    the same ones to streams of two tags).
    """
    for i, (_, stream) in enumerate(
            (p, s) for p, s in nnx.iter_graph(model) if isinstance(s, nnx.RngStream)):
        new = jax.random.fold_in(key, i)
        shape = tuple(stream.key[...].shape)
        if shape:  # a stream split for nnx.vmap: one key per member
            new = jax.random.split(new, shape)
        stream.key.set_value(new)
        stream.count.set_value(jnp.zeros(shape, jnp.uint32))


def mc_dropout_fn(model: nnx.Module, **kwargs: Any):
    """An NNX model as a pure function of a key, with dropout on and statistics frozen.

    Returns ``fn(key, *args, **more)``: a copy of ``model`` (``nnx.clone(model)``: new
    variables sharing the arrays, made inside the call, so under ``vmap`` / ``jit`` too)
    set like ``model.train()`` for dropout and ``model.eval()`` for statistics, that is
    ``set_attributes(deterministic=False, use_running_average=True)`` on every layer that
    has them (what ``nnx.view(model, deterministic=False, use_running_average=True)``
    does), with every RNG stream reseeded from ``key``, called on ``(*args, **kwargs,
    **more)``. The one-liner for Monte-Carlo dropout with :func:`dropnorm.mc_dropout`::

        pred = dropnorm.mc_dropout(dnx.mc_dropout_fn(model), key, 32, x)

    ``model`` itself is not changed: its flags, running statistics and RNG counters stay
    as they are, and the same key gives the same sample. The layers switched are those
    Flax's ``train()`` / ``eval()`` switch: ``nnx.Dropout`` and its subclasses (all of
    dropnorm's dropouts, :class:`DropPath`, :class:`DropBlock`), ``nnx.BatchNorm`` and
    its subclasses, and any layer with a ``deterministic`` attribute (the attention
    dropout of ``nnx.MultiHeadAttention``).

    Args:
      model: an NNX module (after training).
      **kwargs: keyword arguments of every call of the model.

    Returns:
      ``fn(key, *args, **more) -> model(*args, **kwargs, **more)`` of the copy, a pure
      function of the key, to use with :func:`dropnorm.mc_dropout`, ``jax.vmap`` or
      ``jax.jit``.

    Raises:
      TypeError: ``model`` is not an NNX module.

    Examples:
      >>> import jax, jax.numpy as jnp, dropnorm
      >>> from flax import nnx
      >>> from dropnorm import nnx as dnx
      >>> class Net(nnx.Module):
      ...     def __init__(self, rngs):
      ...         self.dense, self.bn = nnx.Linear(5, 8, rngs=rngs), dnx.BatchNorm(8, rngs=rngs)
      ...         self.drop, self.out = dnx.Dropout(0.5, rngs=rngs), nnx.Linear(8, 3, rngs=rngs)
      ...     def __call__(self, x):
      ...         return self.out(self.drop(nnx.relu(self.bn(self.dense(x)))))
      >>> model = Net(nnx.Rngs(0))
      >>> model.eval()  # as after training; mc_dropout_fn turns dropout back on
      >>> x = jax.random.normal(jax.random.key(1), (4, 5))
      >>> pred = dropnorm.mc_dropout(dnx.mc_dropout_fn(model), jax.random.key(2), 16, x)
      >>> pred.mean.shape, bool(jnp.all(pred.std > 0)), model.drop.deterministic
      ((4, 3), True, True)

    References:
      Gal & Ghahramani, "Dropout as a Bayesian Approximation: Representing Model
      Uncertainty in Deep Learning", ICML 2016.
    """
    if not isinstance(model, nnx.Module):
        raise TypeError(f"dropnorm.nnx.mc_dropout_fn: `model` must be a flax.nnx Module; got "
                        f"{type(model).__name__}.")

    def fn(key, *args, **more):
        copy = nnx.clone(model)  # new Variables at this trace level, the same arrays
        copy.set_attributes(deterministic=False, use_running_average=True,
                            raise_if_not_found=False)
        if not _checks.is_key(key):  # a raw uint32 key: NNX streams hold typed keys
            key = jax.random.wrap_key_data(jnp.asarray(key))
        _reseed_every_stream(copy, key)
        return copy(*args, **kwargs, **more)

    return fn
