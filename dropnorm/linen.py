"""Drop-in ``flax.linen`` modules: BatchNorm, Dropout and their family.

Change one import and keep everything else, checkpoints included::

    from dropnorm import linen as dnn   # instead of ``from flax import linen as nn``
    x = dnn.BatchNorm(use_running_average=not train)(x)
    x = dnn.Dropout(0.1, deterministic=not train)(x)

:class:`BatchNorm` and :class:`BatchRenorm` subclass ``flax.linen.BatchNorm``,
and :class:`Dropout`, :class:`AlphaDropout` and :class:`GaussianDropout`
subclass ``flax.linen.Dropout``, so ``isinstance`` checks, method interceptors
and ``nn.tabulate`` treat them as Flax's own. They have Flax's dataclass fields,
defaults, call signatures, variable collections, names, shapes and dtypes
(``params/scale``, ``params/bias``, ``batch_stats/mean``, ``batch_stats/var``),
use the same ``dropout`` RNG stream the same way, do not update statistics
while initialising, normalise a single value per feature as Flax does (to the
bias), and keep Flax's output-dtype rule. Errors name the module and its own
arguments (``use_running_average``, ``deterministic``, ``inputs``). The modules
hold no arithmetic: they create and store variables and call the pure functions
:func:`dropnorm.batch_norm`, :func:`dropnorm.dropout` and their family, which is
where every difference from Flax comes from:

* the variance is always the accurate shifted one (``use_fast_variance`` is
  accepted and ignored), so results differ from Flax's default by rounding, and
  stay right when ``|mean| >> std`` where Flax's lose all precision;
* ``rate`` and ``deterministic`` / ``use_running_average`` may be traced;
* dropout's keep probability is quantised to ``2**-mask_bits`` (16 bits by
  default: rate 0.1 drops 10.0006%; the kept values are scaled by exactly its
  inverse, so ``E[y] = x``), and the masks differ from Flax's for the same key;
* a feature whose elements are all masked out is normalised by the running
  statistics, which it leaves unchanged (Flax outputs NaN and writes NaN into
  them);
* complex inputs: ``batch_stats/mean`` is created complex, so it has one dtype
  from the start (Flax creates it float32 and turns it complex at the first
  update); the variance and the outputs are Flax's;
* extras: ``virtual_batch_size`` (ghost batches), ``momentum=None`` (cumulative
  average, stored with a ``batch_stats/count``), ``mask_bits``, and
  ``AlphaDropout``, ``GaussianDropout``, ``DropPath``, ``BatchRenorm``.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import jax
import jax.numpy as jnp

try:
    from flax import linen as nn
    from flax.core import unfreeze
    from flax.linen import dtypes
except ModuleNotFoundError as _err:  # only a missing Flax gets the install hint
    if (_err.name or "").partition(".")[0] != "flax":
        raise
    raise ImportError(
        'dropnorm.linen needs Flax, which is not installed. Install it with: '
        'pip install "dropnorm[flax]"') from _err

from dropnorm import _checks
from dropnorm._batch_norm import BatchNormParams, BatchNormState, batch_norm_as, batch_renorm_as
from dropnorm._checks import Caller
from dropnorm._dropout import drop_block_as, random_map_as
from dropnorm._masks import DEFAULT_BITS
from dropnorm._moments import real_dtype
from dropnorm._population import cached_step, empty_stats, finalize, fold_batches

__all__ = ["AlphaDropout", "BatchNorm", "BatchRenorm", "DropBlock", "DropPath", "Dropout",
           "GaussianDropout", "mc_dropout_fn", "recompute_batch_norm"]

# A key for the one case where Flax draws no key but the pure function needs one: a static
# rate of 1 drops everything whatever the key, and Flax returns zeros without touching the
# RNG stream, so ours must not touch it either.
_UNUSED_KEY_SEED = 0


def _name(module) -> str:
    """``dropnorm.linen.<class>`` for the first dropnorm class of ``module`` (users'
    subclasses keep the name of the layer they extend)."""
    for cls in type(module).__mro__:
        if cls.__module__ == __name__:
            return f"dropnorm.linen.{cls.__name__}"
    return f"dropnorm.linen.{type(module).__name__}"  # pragma: no cover


_train_from = _checks.train_from_off_flag  # one check for both shells (dropnorm._checks)


def _check_not_swapped(caller: Caller, inputs: Any, rng: Any, name: str) -> None:
    """``layer(key, rng=x)``: say that the two look swapped, in the layer's own terms."""
    if _checks.is_key(inputs):
        raise TypeError(
            f"{caller.fn}: `inputs` is a PRNG key ({inputs.dtype}), not data: were `inputs` and "
            f"`{name}` swapped? Call the layer on the array to drop, and pass the key as "
            f"`{name}`.")


def _check_rng(caller: Caller, rng: Any, name: str) -> jax.Array:
    """A key passed to the call: the core's check, naming the layer's argument."""
    try:
        return _checks.check_key(rng, caller.fn, caller.train_off)
    except TypeError as err:
        raise TypeError(str(err).replace("`key`", f"`{name}`", 1)) from None


def _batch_of_one(x, mask, feature_axes):
    """``x`` (and ``mask``) with a leading batch axis of size 1 and the feature axes moved
    past it: the pure function needs an axis to reduce over, Flax reduces over none."""
    if mask is not None:
        mask = jnp.broadcast_to(jnp.asarray(mask), x.shape)[None]
    return x[None], mask, tuple(a + 1 for a in feature_axes)


class _BatchNormShell(nn.BatchNorm):
    """Variable handling shared by :class:`BatchNorm` and :class:`BatchRenorm`."""

    def _pure(self, caller, params, state, x, train, **kw):
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
        caller = Caller(_name(self), train_off="use_running_average=True", x_name="x",
                        flax_small_batch=True,
                        state_hint="initialise the variables with an input of this shape "
                                   "(module.init)")
        use_running_average = nn.merge_param(
            "use_running_average", self.use_running_average, use_running_average)
        train = _train_from(use_running_average, caller, "use_running_average")
        if _checks.is_key(x):  # a swapped argument: the core's message, before Flax's dtype rules
            _checks.check_floating(x, caller.fn)
        x = jnp.asarray(x)
        feature_axes = _checks.normalize_axes(self.axis, x.ndim, caller.fn)
        feature_shape = [x.shape[a] for a in feature_axes]
        stat_dtype = jnp.float32 if self.force_float32_reductions else self.param_dtype
        # A complex input has a complex mean: store it whole (the variance stays real).
        mean_dtype = (jnp.promote_types(stat_dtype, x.dtype)
                      if jnp.issubdtype(x.dtype, jnp.complexfloating) else stat_dtype)
        ra_mean = self.variable("batch_stats", "mean",
                                lambda s: jnp.zeros(s, mean_dtype), feature_shape)
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
        if not jnp.issubdtype(x.dtype, jnp.inexact):
            # Flax takes integer input (e.g. uint8 pixels): statistics in >= float32.
            x = x.astype(jnp.promote_types(out_dtype, jnp.float32))
        state = BatchNormState(
            ra_mean.value, ra_var.value,
            ra_count.value if ra_count is not None else jnp.zeros((), jnp.int32))
        initializing = self.is_initializing()
        # Like Flax: no collective while initialising (the axis need not exist yet).
        axis_name = None if initializing else self.axis_name
        xb, maskb, axis = x, mask, self.axis
        if train is not False and axis_name is None and len(feature_axes) == x.ndim:
            # Every axis a feature axis (a 1-D input with axis=-1, or one example inside a
            # per-example vmap while initialising): Flax normalises it as a batch of one.
            xb, maskb, axis = _batch_of_one(x, mask, feature_axes)
        y, new_state = self._pure(
            caller, BatchNormParams(scale, bias), state, xb, train, axis=axis,
            momentum=self.momentum, epsilon=self.epsilon, mask=maskb, axis_name=axis_name,
            axis_index_groups=None if initializing else self.axis_index_groups,
            dtype=out_dtype)
        y = y.reshape(x.shape)
        if train is not False and not initializing:  # like Flax: init updates nothing
            ra_mean.value = new_state.mean
            ra_var.value = new_state.var
            if ra_count is not None:
                ra_count.value = new_state.count
        return y


class BatchNorm(_BatchNormShell):
    """Batch normalisation; a drop-in replacement for ``flax.linen.BatchNorm``.

    A subclass of ``flax.linen.BatchNorm`` with the same fields, defaults, call
    signature ``(x, use_running_average=None, *, mask=None)``, variables
    (``params/scale``, ``params/bias``, ``batch_stats/mean``,
    ``batch_stats/var``: shapes and dtypes as Flax's) and output dtype
    (``dtype``, else the result type of ``x``, ``scale`` and ``bias``), so a
    Flax checkpoint loads unchanged. Statistics are not updated while
    initialising, and one value per feature in training is normalised as Flax
    does (batch mean = the value, variance 0: the output is ``bias``). The
    arithmetic is :func:`dropnorm.batch_norm`'s.

    Differences from Flax (improvements): the variance is always the accurate
    shifted one (``use_fast_variance`` is accepted for compatibility and
    ignored); statistics are always computed in at least float32 (with
    ``force_float32_reductions=False`` the stored statistics still get
    ``param_dtype``, as Flax's do); ``use_running_average`` may be a traced
    bool; a feature with no unmasked element is normalised by the running
    statistics and keeps them (Flax outputs and stores NaN); for a complex
    ``x`` the ``batch_stats/mean`` variable is created complex (Flax creates it
    float32 and makes it complex at the first update; a float32 checkpoint
    still loads).

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
      use_fast_variance: accepted and ignored (always the accurate shifted variance).
      force_float32_reductions: Flax's field; statistics are always >= float32.
      virtual_batch_size: ghost batch normalisation (dropnorm extra): statistics
        per chunk of this many examples along axis 0. While initialising, a
        batch it does not divide (a dummy input) is normalised as one batch.

    Examples:
      >>> import jax, jax.numpy as jnp
      >>> import flax.linen as nn
      >>> from dropnorm import linen as dnn
      >>> bn = dnn.BatchNorm(momentum=0.9)
      >>> isinstance(bn, nn.BatchNorm)
      True
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

    def _pure(self, caller, params, state, x, train, **kw):
        vbs = self.virtual_batch_size
        # A dummy init batch that ghost batches do not divide is normalised as one batch
        # (init updates nothing, and Flax, which has no ghost batches, accepts any batch).
        if (self.is_initializing() and isinstance(vbs, int) and not isinstance(vbs, bool)
                and vbs > 0 and x.ndim and x.shape[0] % vbs):
            vbs = None
        return batch_norm_as(caller, params, state, x, train, virtual_batch_size=vbs, **kw)


class BatchRenorm(_BatchNormShell):
    """Batch renormalisation: :class:`BatchNorm` whose training statistics are corrected.

    Flax has no batch renormalisation; this module subclasses
    ``flax.linen.BatchNorm`` with its fields and variables (so a
    ``flax.linen.BatchNorm`` checkpoint loads into it) plus ``r_max`` and
    ``d_max``; see :func:`dropnorm.batch_renorm` for the formula.
    ``r_max=1, d_max=0`` is plain batch normalisation.

    The other fields are :class:`BatchNorm`'s (no ``virtual_batch_size``).

    Attributes:
      r_max: bound on the scale correction ``r`` (>= 1).
      d_max: bound on the shift correction ``|d|`` (>= 0).

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

    def _pure(self, caller, params, state, x, train, **kw):
        return batch_renorm_as(caller, params, state, x, train, r_max=self.r_max,
                               d_max=self.d_max, **kw)


def _random_call(module, kind, inputs, deterministic, rng, **kw):
    """The call of every dropout-family module: Flax's flag merging and RNG use, then the
    pure function."""
    caller = Caller(_name(module), train_off="deterministic=True", x_name="inputs")
    deterministic = nn.merge_param("deterministic", module.deterministic, deterministic)
    train = _train_from(deterministic, caller, "deterministic")
    rate = _checks.check_rate(module.rate, caller.fn)
    if train is False or (isinstance(rate, float) and rate == 0.0):
        if kind == "block":  # the block's arguments are checked in evaluation too
            _check_not_swapped(caller, inputs, rng, "rng")
            drop_block_as(caller, None, inputs, rate, False, **kw)
        return inputs
    _check_not_swapped(caller, inputs, rng, "rng")
    if rng is None:
        if kind == "dropout" and isinstance(rate, float) and rate == 1.0:
            rng = jax.random.key(_UNUSED_KEY_SEED)  # drops everything; Flax draws no key
        else:
            rng = module.make_rng(module.rng_collection)
    else:
        rng = _check_rng(caller, rng, "rng")
    if kind == "block":
        return drop_block_as(caller, rng, inputs, module.rate, train, **kw)
    return random_map_as(caller, kind, rng, inputs, module.rate, train, **kw)


class Dropout(nn.Dropout):
    """Inverted dropout; a drop-in replacement for ``flax.linen.Dropout``.

    A subclass of ``flax.linen.Dropout`` with the same fields (``rate``,
    ``broadcast_dims``, ``deterministic``, ``rng_collection``), call signature
    ``(inputs, deterministic=None, rng=None)`` and RNG use: one key from
    ``make_rng(rng_collection)`` per training call, none when deterministic or
    when the rate is 0 or 1. The arithmetic is :func:`dropnorm.dropout`'s.

    Differences from Flax: ``rate`` and ``deterministic`` may be traced (Flax
    raises); the keep probability is quantised to ``2**-mask_bits`` (default
    16 bits; ``mask_bits=32`` for finer rates); the masks differ from Flax's
    for the same key; gradients at a traced rate of 1 are zeros, not NaN; a
    rate outside [0, 1] is an error (Flax quietly drops everything).

    Attributes:
      rate: the probability of dropping an element.
      broadcast_dims: axes that share one mask value.
      deterministic: True to return the input unchanged.
      rng_collection: the RNG stream to draw keys from.
      mask_bits: 16 or 32: the resolution of the keep probability (extra; default 16).

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

    mask_bits: int = DEFAULT_BITS

    _kind = "dropout"  # the pure function: dropout, alpha, gaussian (not a field)

    def _extra(self) -> dict:
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
        return _random_call(self, self._kind, inputs, deterministic, rng, **self._extra())


class AlphaDropout(Dropout):
    """Alpha dropout for SELU networks (:func:`dropnorm.alpha_dropout`); not in Flax.

    Fields and call as :class:`Dropout` (a ``flax.linen.Dropout`` subclass too).
    Dropped units take SELU's negative saturation value and an affine map keeps
    zero mean and unit variance.

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

    _kind = "alpha"


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

    _kind = "gaussian"

    def _extra(self):  # normal noise: the resolution of a mask does not apply
        return {"broadcast_dims": tuple(self.broadcast_dims), "mask_bits": 32}


class DropPath(nn.Module):
    """Stochastic depth: drop whole examples of a residual branch; not in Flax.

    Fields as :class:`Dropout` without ``broadcast_dims`` (every axis but the
    batch axis 0 shares the mask); see :func:`dropnorm.drop_path`. Use it as
    ``x = x + DropPath(rate)(branch(x), deterministic=not train)``. Not a
    ``flax.linen.Dropout`` subclass: its second field is ``deterministic``.

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

    @nn.compact
    def __call__(self, inputs, deterministic: bool | None = None, rng=None):
        """Apply drop-path; arguments as :meth:`Dropout.__call__`."""
        return _random_call(self, "drop_path", inputs, deterministic, rng,
                            mask_bits=self.mask_bits)


# -- population statistics (PreciseBN) ---------------------------------------------------------

_RECOMPUTE = "dropnorm.linen.recompute_batch_norm"
_POPULATION = "dropnorm_population"  # each layer's accumulator, in its batch_stats while running


def _is_random_layer(module) -> bool:
    """Dropout, and dropnorm's modules that draw from an RNG stream (DropPath, ...)."""
    return isinstance(module, nn.Dropout) or (
        type(module).__module__ == __name__ and hasattr(module, "rng_collection"))


def _population_call(module, x, use_running_average=None, *, mask=None):
    """A BatchNorm layer (Flax's or dropnorm's) while recomputing: normalised by the batch's
    statistics, which are added to the layer's PopulationStats."""
    del use_running_average  # the batch's statistics whatever the flag (PreciseBN)
    path = "/".join(str(p) for p in module.scope.path) or type(module).__name__
    caller = Caller(f"{_RECOMPUTE} (layer {path})", x_name="x", flax_small_batch=True)
    if _checks.is_key(x):
        _checks.check_floating(x, caller.fn)
    x = jnp.asarray(x)
    feature_axes = _checks.normalize_axes(module.axis, x.ndim, caller.fn)
    scale = module.get_variable("params", "scale") if module.use_scale else None
    bias = module.get_variable("params", "bias") if module.use_bias else None
    for name, used, value in (("scale", module.use_scale, scale),
                              ("bias", module.use_bias, bias)):
        if used and value is None:
            raise ValueError(
                f"{caller.fn}: `variables` has no params for {path}/{name}. Pass the "
                f"variables of the trained model (model.init's structure, with batch_stats).")
    out_dtype = dtypes.canonicalize_dtype(x, scale, bias, dtype=module.dtype)
    if not jnp.issubdtype(x.dtype, jnp.inexact):
        x = x.astype(jnp.promote_types(out_dtype, jnp.float32))
    stats = module.get_variable("batch_stats", _POPULATION)
    if stats is None:
        stats = empty_stats(tuple(x.shape[a] for a in feature_axes), x.dtype, real_dtype(x.dtype))
    xb, maskb, axis = x, mask, module.axis
    if len(feature_axes) == x.ndim:  # as the module: a batch of one
        xb, maskb, axis = _batch_of_one(x, mask, feature_axes)
    y, stats = batch_norm_as(caller, BatchNormParams(scale, bias), stats, xb, True, axis=axis,
                             epsilon=module.epsilon, mask=maskb, dtype=out_dtype)
    module.put_variable("batch_stats", _POPULATION, stats)
    return y.reshape(x.shape)


def _population_interceptor(next_fun, args, kwargs, context):
    module = context.module
    if context.method_name == "__call__":
        if isinstance(module, nn.BatchNorm):
            return _population_call(module, *args, **kwargs)
        if _is_random_layer(module):  # dropout off: the inputs evaluation will see
            return args[0] if args else kwargs["inputs"]
    return next_fun(*args, **kwargs)


def _population_paths(tree, path=()):
    """``(path, layer's batch_stats dict)`` for every layer that holds an accumulator."""
    if _POPULATION in tree:
        yield path, tree
    for key, value in tree.items():
        if key != _POPULATION and isinstance(value, dict):
            yield from _population_paths(value, path + (key,))


def _with_empty(batch_stats, shapes):
    """``batch_stats`` plus zero accumulators shaped as in ``shapes`` (an eval_shape)."""
    out = dict(batch_stats)
    for key, value in shapes.items():
        if key == _POPULATION:
            out[key] = jax.tree.map(lambda s: jnp.zeros(s.shape, s.dtype), value)
        elif isinstance(value, dict):
            out[key] = _with_empty(batch_stats.get(key, {}), value)
    return out


def _finalized(batch_stats):
    """``batch_stats`` with every accumulator turned into the layer's mean, var (and count)."""
    out = {}
    for key, value in batch_stats.items():
        if key == _POPULATION:
            continue
        out[key] = _finalized(value) if isinstance(value, dict) else value
    stats = batch_stats.get(_POPULATION)
    if stats is not None:
        state = BatchNormState(batch_stats["mean"], batch_stats["var"],
                               batch_stats.get("count", jnp.zeros_like(stats.updates)))
        new = finalize(stats, state, False, _RECOMPUTE)
        out["mean"], out["var"] = new.mean, new.var
        if "count" in batch_stats:
            out["count"] = new.count
    return out


def _population_step(model, method, apply_kwargs):
    def step(variables, batch):
        with nn.intercept_methods(_population_interceptor):
            _, updates = model.apply(variables, batch, method=method, mutable=["batch_stats"],
                                     **apply_kwargs)
        return updates.get("batch_stats", {})

    return step


def recompute_batch_norm(model: nn.Module, variables: Any, batches: Any, *, method=None,
                         **apply_kwargs) -> dict:
    """Recompute every BatchNorm layer's statistics over ``batches`` (PreciseBN, for SWA).

    Variables in, variables out: runs ``model.apply(variables, batch, method=method,
    **apply_kwargs)`` on each batch with every ``flax.linen.BatchNorm`` (Flax's,
    :class:`BatchNorm`, :class:`BatchRenorm`) normalising by its batch's
    statistics and adding the batch's moments to exact population statistics,
    then returns ``variables`` with each layer's ``batch_stats`` ``mean`` and
    ``var`` set to the mean and biased variance of all its inputs over all
    batches (and ``count``, where a layer keeps one, to the number of
    batches); see :func:`dropnorm.recompute_batch_norm` for the formula and how
    it differs from PyTorch's ``update_bn``.

    The layers are found with ``nn.intercept_methods``, so the model needs no
    change: pass its evaluation flags (``train=False``) in ``apply_kwargs``.
    While recomputing, every BatchNorm uses its batch's statistics whatever its
    ``use_running_average``, over the whole batch it is given (no
    ``axis_name``, ``axis_index_groups`` or ghost batches; batch
    renormalisation without its corrections), and ``flax.linen.Dropout`` and
    dropnorm's random modules are the identity: at evaluation the layers see
    inputs without dropout, so their statistics should too. Layers the forward
    does not call keep their statistics. Each step runs under ``jax.jit``.

    Args:
      model: the ``flax.linen`` Module.
      variables: its variables (``params``, ``batch_stats``, ...), e.g. with
        averaged ``params``.
      batches: a non-empty iterable of batches, each passed to ``model.apply``
        as its first input.
      method: passed to ``model.apply`` (a method, its name, or a function of
        ``(module, batch)``).
      **apply_kwargs: passed to ``model.apply``, e.g. ``train=False``.

    Returns:
      A new variables dict: ``variables`` with the recomputed ``batch_stats``.

    Raises:
      ValueError: ``batches`` empty; a model that calls no BatchNorm layer;
        ``variables`` without a layer's params.
      TypeError: ``model`` not a linen Module; ``batches`` an array or not
        iterable.

    Examples:
      >>> import jax, jax.numpy as jnp
      >>> import flax.linen as nn
      >>> from dropnorm import linen as dnn
      >>> class Net(nn.Module):
      ...     @nn.compact
      ...     def __call__(self, x, train: bool):
      ...         x = dnn.BatchNorm(use_running_average=not train)(nn.Dense(4)(x))
      ...         return nn.Dense(2)(dnn.Dropout(0.5, deterministic=not train)(x))
      >>> xs = jax.random.normal(jax.random.key(0), (3, 8, 5))  # three batches of 8
      >>> variables = Net().init(jax.random.key(1), xs[0], train=False)
      >>> new = dnn.recompute_batch_norm(Net(), variables, list(xs), train=False)
      >>> h = xs.reshape(24, 5) @ variables["params"]["Dense_0"]["kernel"]
      >>> bool(jnp.allclose(new["batch_stats"]["BatchNorm_0"]["mean"], h.mean(0), atol=1e-5))
      True

    References:
      Wu & Johnson, "Rethinking 'Batch' in BatchNorm", 2021 (PreciseBN).
      Izmailov et al., "Averaging Weights Leads to Wider Optima and Better
      Generalization", UAI 2018 (SWA).
    """
    if not isinstance(model, nn.Module):
        raise TypeError(f"{_RECOMPUTE}: `model` must be a flax.linen Module; got "
                        f"{type(model).__name__}.")
    if not isinstance(variables, Mapping):
        raise TypeError(f"{_RECOMPUTE}: `variables` must be the model's variables dict "
                        f"(from model.init); got {type(variables).__name__}.")
    variables = unfreeze(variables)
    key = ("linen", model, method, tuple(sorted(apply_kwargs.items())))
    step, jitted = cached_step(key, lambda: _population_step(model, method, apply_kwargs))

    def start(first):
        shapes = jax.eval_shape(step, variables, first)
        if not any(True for _ in _population_paths(shapes)):
            raise ValueError(
                f"{_RECOMPUTE}: `model` ({type(model).__name__}) called no BatchNorm layer "
                f"(flax.linen.BatchNorm, dropnorm.linen.BatchNorm or BatchRenorm) on the first "
                f"batch, so there are no statistics to recompute.")
        return _with_empty(variables.get("batch_stats", {}), shapes)

    batch_stats, _ = fold_batches(_RECOMPUTE, batches, start,
                                  lambda bs, batch: jitted({**variables, "batch_stats": bs},
                                                           batch))
    return {**variables, "batch_stats": _finalized(batch_stats)}


class DropBlock(nn.Module):
    """DropBlock: drop contiguous regions of feature maps (:func:`dropnorm.drop_block`); not in
    Flax.

    Every position of every feature map is a seed; each dropped seed drops the
    ``block_size x block_size`` block centred on it, with the seed probability chosen so
    that a fraction ``rate`` of the interior is dropped, and the survivors are scaled by
    ``1 / (1 - rate)``. Use it like timm's ``DropBlock2d``, after a convolution:
    ``x = DropBlock(0.1, 7)(x, deterministic=not train)``. RNG use, flag merging and call
    as :class:`Dropout` (one key from ``make_rng(rng_collection)`` per training call).
    Not a ``flax.linen.Dropout`` subclass (it has no ``broadcast_dims``). The block's
    arguments are checked in evaluation too, so a model that evaluates also trains.

    Attributes:
      rate: the fraction of the (interior) feature map to drop, in [0, 1].
      block_size: the block's size: an int, or a tuple of one per spatial axis; at most
        the feature map's size.
      deterministic: True to return the input unchanged.
      spatial_axes: the feature map's axes (default ``(1, 2)``: NHWC).
      channel_axis: the channel axis (default -1), or None.
      share_channels: one mask for every channel of an example, instead of one per
        channel.
      rng_collection: the RNG stream to draw keys from.
      mask_bits: 16 or 32: the resolution of the seeds' keep probability.

    Examples:
      >>> import jax, jax.numpy as jnp
      >>> from dropnorm import linen as dnn
      >>> x = jnp.ones((2, 16, 16, 3))
      >>> y = dnn.DropBlock(0.2, block_size=5).apply({}, x, deterministic=False,
      ...                                            rngs={'dropout': jax.random.key(0)})
      >>> sorted(set(jnp.round(y, 3).ravel().tolist()))  # survivors scaled by 1 / (1 - rate)
      [0.0, 1.25]
      >>> bool(jnp.all(dnn.DropBlock(0.2, 5).apply({}, x, deterministic=True) == x))
      True

    References:
      Ghiasi, Lin & Le, "DropBlock: A regularization method for convolutional networks",
      NeurIPS 2018.
    """

    rate: float
    block_size: int | tuple[int, ...]
    deterministic: bool | None = None
    spatial_axes: tuple[int, ...] = (1, 2)
    channel_axis: int | None = -1
    share_channels: bool = False
    rng_collection: str = "dropout"
    mask_bits: int = DEFAULT_BITS

    @nn.compact
    def __call__(self, inputs, deterministic: bool | None = None, rng=None):
        """Apply DropBlock; arguments as :meth:`Dropout.__call__`."""
        return _random_call(self, "block", inputs, deterministic, rng,
                            block_size=self.block_size, spatial_axes=self.spatial_axes,
                            channel_axis=self.channel_axis,
                            share_channels=self.share_channels, mask_bits=self.mask_bits)


# --- Monte-Carlo dropout: dropout on, statistics frozen, whatever the model's flags say ------

_RANDOM_LAYERS = (nn.Dropout, DropPath, DropBlock)  # Flax's Dropout and its subclasses


def _call_with_flag(module, flag: str, value: bool, next_fun, args, kwargs):
    """Call ``module`` (a dropout or BatchNorm layer) with its ``flag`` set to ``value``,
    whether the model set the flag as a field or passes it to the call.

    The flag is the second positional argument of these layers' calls. A field of the other
    value (``BatchNorm(use_running_average=not train)``) cannot be overridden by a call
    argument (Flax's ``merge_param`` refuses both), so a copy of the layer with the field
    changed is applied to the layer's own variables instead.
    """
    args = list(args)
    if len(args) > 1:
        args.pop(1)
    kwargs = {k: v for k, v in kwargs.items() if k != flag}
    field = getattr(module, flag)
    if field is None:
        return next_fun(*args, **{flag: value}, **kwargs)
    if field is value:
        return next_fun(*args, **kwargs)
    clone = module.clone(parent=None, **{flag: value})
    if isinstance(module, _RANDOM_LAYERS):
        rng = kwargs.pop("rng", None) if len(args) < 2 else args.pop(1)
        if rng is None:
            rng = module.make_rng(module.rng_collection)
        return clone.apply({}, *args, rng=rng, **kwargs)
    return clone.apply(module.variables, *args, **kwargs)


def _mc_dropout_interceptor(next_fun, args, kwargs, context):
    module = context.module
    if context.method_name == "__call__":
        if isinstance(module, _RANDOM_LAYERS):
            return _call_with_flag(module, "deterministic", False, next_fun, args, kwargs)
        if isinstance(module, nn.BatchNorm):
            return _call_with_flag(module, "use_running_average", True, next_fun, args, kwargs)
    return next_fun(*args, **kwargs)


def mc_dropout_fn(model: nn.Module, variables: Any, *, method: Any = None,
                  rng_collection: str = "dropout", **kwargs: Any):
    """``model.apply`` as a function of a key, with dropout on and statistics frozen.

    Returns ``fn(key, *args, **more)``, which runs ``model.apply(variables, *args,
    rngs={rng_collection: key}, method=method, **kwargs, **more)`` with every dropout layer
    training and every BatchNorm layer using its running statistics, whatever the model's
    own ``train`` / ``deterministic`` / ``use_running_average`` flags say: the one-liner
    for Monte-Carlo dropout with :func:`dropnorm.mc_dropout`::

        pred = dropnorm.mc_dropout(dnn.mc_dropout_fn(model, variables, train=False), key, 32, x)

    It works by class, with a Flax method interceptor (``nn.intercept_methods``): the
    dropout layers are ``flax.linen.Dropout`` and its subclasses (dropnorm's
    :class:`Dropout`, :class:`AlphaDropout`, :class:`GaussianDropout`) and dropnorm's
    :class:`DropPath` and :class:`DropBlock`; the statistics layers are
    ``flax.linen.BatchNorm`` and its subclasses (dropnorm's :class:`BatchNorm`,
    :class:`BatchRenorm`). A layer whose flag is a call argument gets the flag in the
    call; a layer whose field says otherwise (``BatchNorm(use_running_average=not
    train)``) is applied as a copy with the field changed, to its own variables and
    keys. Nothing is updated: ``batch_stats`` stay as they are. Dropout inside other
    modules (the ``dropout_rate`` of ``flax.linen.MultiHeadDotProductAttention``) is left
    as the model sets it.

    Args:
      model: a linen module.
      variables: its variables (``params`` and ``batch_stats``).
      method: the method to apply (default ``__call__``), as ``Module.apply``'s.
      rng_collection: the RNG stream the dropout layers draw from (default
        ``'dropout'``); it gets the key.
      **kwargs: keyword arguments of every call (e.g. ``train=False``).

    Returns:
      ``fn(key, *args, **more) -> model.apply(...)``'s output, a pure function of the
      key (the same key gives the same sample), to use with :func:`dropnorm.mc_dropout`,
      ``jax.vmap`` or ``jax.jit``.

    Raises:
      TypeError: ``model`` is not a linen module (what ``fn`` raises is
        ``model.apply``'s).

    Examples:
      >>> import jax, jax.numpy as jnp, dropnorm
      >>> import flax.linen as nn
      >>> from dropnorm import linen as dnn
      >>> class Net(nn.Module):
      ...     @nn.compact
      ...     def __call__(self, x, train: bool):
      ...         x = dnn.BatchNorm(use_running_average=not train)(nn.Dense(8)(x))
      ...         x = dnn.Dropout(0.5)(nn.relu(x), deterministic=not train)
      ...         return nn.Dense(3)(x)
      >>> x = jax.random.normal(jax.random.key(0), (4, 5))
      >>> variables = Net().init(jax.random.key(1), x, train=False)
      >>> fn = dnn.mc_dropout_fn(Net(), variables, train=False)
      >>> pred = dropnorm.mc_dropout(fn, jax.random.key(2), 16, x)
      >>> pred.mean.shape, bool(jnp.all(pred.std > 0))
      ((4, 3), True)

    References:
      Gal & Ghahramani, "Dropout as a Bayesian Approximation: Representing Model
      Uncertainty in Deep Learning", ICML 2016.
    """
    if not isinstance(model, nn.Module):
        raise TypeError(f"dropnorm.linen.mc_dropout_fn: `model` must be a flax.linen Module; "
                        f"got {type(model).__name__}.")

    def fn(key, *args, **more):
        with nn.intercept_methods(_mc_dropout_interceptor):
            return model.apply(variables, *args, rngs={rng_collection: key}, method=method,
                               **kwargs, **more)

    return fn
