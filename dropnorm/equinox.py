"""Drop-in Equinox layers: BatchNorm, Dropout and their family.

Change one name and keep everything else, checkpoints included::

    import dropnorm.equinox as dqx   # next to ``import equinox as eqx``
    self.bn = dqx.BatchNorm(64, axis_name="batch")    # was eqx.nn.BatchNorm(64, "batch")
    self.drop = dqx.Dropout(0.1)                      # was eqx.nn.Dropout(0.1)

:class:`BatchNorm` subclasses ``eqx.nn.BatchNorm`` and :class:`Dropout` (with
:class:`AlphaDropout`, :class:`DropPath` and :class:`DropBlock`) subclasses
``eqx.nn.Dropout``, so ``isinstance``, ``eqx.nn.Sequential`` (a
``StatefulLayer``), ``eqx.nn.inference_mode``, ``eqx.nn.make_with_state``,
``eqx.filter_jit`` / ``filter_grad`` / ``filter_vmap`` and
``eqx.tree_serialise_leaves`` treat them as Equinox's own. They take Equinox's
constructor arguments (``input_size, axis_name, eps, channelwise_affine, momentum,
inference, dtype``; ``p, inference``) and calls (``bn(x, state, *, key=None,
inference=None) -> (y, state)``, ``dropout(x, *, key, inference=None)``), and
keep Equinox's ``mode="batch"`` parameters and state: ``weight`` and ``bias``,
the step counter in ``batch_counter`` and the running ``(mean, var)`` in
``batch_state_index``, so a checkpoint of a model built with
``eqx.nn.BatchNorm(..., mode="batch")`` loads into the same model built with
:class:`BatchNorm`. The layers hold no arithmetic: they call the pure functions
(:func:`dropnorm.batch_norm`, :func:`dropnorm.dropout`, ...), with errors in the
layers' own terms (``x``, ``key``, ``p``, ``inference``, ``input_size``,
``axis_name``).

Where Equinox 0.13's BatchNorm has known defects, these layers behave as Flax's
and PyTorch's do instead:

* **Training normalises by the batch's own statistics**, always. Equinox's
  default ``mode="ema"`` normalises a training batch by running averages that
  mix in earlier batches (training unstable and learning-rate sensitive,
  equinox#659, #675); ``mode="ema"`` is refused here with that explanation, and
  ``mode="batch"`` (the only mode) is the default.
* **Evaluation uses the running averages as they are**: mean started at 0,
  variance at 1, ``new = momentum * old + (1 - momentum) * batch``, as Flax and
  PyTorch. Equinox's ``mode="batch"`` divides both by ``1 - momentum**steps``
  ("zero-debiasing"), which is right for a mean started at 0 but inflates a
  variance started at 1: after one step with the default momentum it is the
  batch variance plus 99, so an early evaluation is squashed by a factor of
  about 10. Its ``mode="ema"`` starts with empty buffers, so an untrained
  model in inference scales activations by ``1/sqrt(eps)`` (equinox#955), and an
  earlier version divided by zero before the first step (#1010). Here an
  untrained model normalises by mean 0 and variance 1.
* **The running variance is the biased batch variance** (divide by the
  number of values), as in Flax and in both of Equinox's modes; PyTorch
  averages the unbiased one instead (see :func:`dropnorm.batch_norm`'s
  ``unbiased_running_var``).
* **Exact statistics in one pass**, in at least float32, combined exactly
  across the vmapped examples and devices (the output at a mean of 1e4 is
  exact to float32 rounding; Equinox's is 1e-3 off), with padding masks
  (``mask=``) and ``axis_index_groups``.
* **``axis_name`` is a static field**, so ``jax.device_put`` of a whole model
  works (with ``eqx.nn.BatchNorm`` it fails: a string is no array, equinox#1074);
  ``inference`` may be traced (one compiled step for both modes).
* **Two batch conventions.** With an ``axis_name`` (Equinox's convention) the
  layer sees one example ``(input_size, *spatial)`` inside ``jax.vmap(...,
  axis_name=...)`` (or ``pmap`` / ``shard_map``) and gathers the statistics over
  that axis; training outside it raises a ``NameError`` that says so. With
  ``axis_name=None`` it takes a batch ``(batch, input_size, *spatial)`` in one
  call, no vmap needed.

Dropout keeps Equinox's rules (``p`` the probability of dropping, ``inference``
overridable per call, ``p=0`` needs no key) with dropnorm's masks: the keep
probability is quantised to ``2**-mask_bits`` (16 bits by default), the masks
differ from ``jax.random.bernoulli``'s for the same key, ``p`` and ``inference``
may be traced, and a ``p`` outside [0, 1] is an error. As with every Equinox
layer, one example per call: under ``jax.vmap`` give each example its own key
(``jax.random.split(key, batch)``), or every example gets the same mask.
"""

from __future__ import annotations

from collections.abc import Hashable, Sequence
from typing import Any

import jax
import jax.numpy as jnp

try:
    import equinox as eqx
except ModuleNotFoundError as _err:  # only a missing Equinox gets the install hint
    if (_err.name or "").partition(".")[0] != "equinox":
        raise
    raise ImportError(
        'dropnorm.equinox needs Equinox, which is not installed. Install it with: '
        'pip install "dropnorm[equinox]"') from _err

from dropnorm import _checks
from dropnorm._batch_norm import BatchNormParams, BatchNormState, batch_norm_as
from dropnorm._checks import Caller
from dropnorm._dropout import drop_block_as, random_map_as
from dropnorm._masks import DEFAULT_BITS, check_mask_bits
from dropnorm._moments import check_axis_index_groups, check_axis_name

__all__ = ["AlphaDropout", "BatchNorm", "DropBlock", "DropPath", "Dropout"]

_TRAIN_OFF = "inference=True (or eqx.nn.inference_mode(model))"


def _name(layer) -> str:
    """``dropnorm.equinox.<class>`` for the first dropnorm class of ``layer`` (a user's
    subclass keeps the name of the layer it extends)."""
    cls = next((c for c in type(layer).__mro__ if c.__module__ == __name__), type(layer))
    return f"dropnorm.equinox.{cls.__name__}"


def _train(layer, caller: Caller, inference: Any) -> bool | jax.Array:
    """Equinox's flag rule (the call's ``inference``, else the field), as the pure
    functions' ``train``; a traced flag stays traced."""
    if inference is None:
        inference = layer.inference
    return _checks.train_from_off_flag(inference, caller, "inference")


def _default_dtype():
    """Equinox's default: float64 when JAX runs in 64-bit mode, else float32."""
    return jax.dtypes.canonicalize_dtype(jnp.float64)


class BatchNorm(eqx.nn.BatchNorm):
    """Batch normalisation; a drop-in replacement for ``eqx.nn.BatchNorm(mode="batch")``.

    A subclass of ``eqx.nn.BatchNorm`` (a ``StatefulLayer``) with its constructor,
    call ``bn(x, state, *, key=None, inference=None) -> (y, state)``, parameters
    (``weight``, ``bias``) and ``mode="batch"`` state (``batch_counter``, and
    ``batch_state_index`` holding the running ``(mean, var)``): make it with
    ``eqx.nn.make_with_state`` and switch it with ``eqx.nn.inference_mode``.

    Training normalises each channel by the mean and biased variance of the
    batch, ``y = (x - mean) / sqrt(var + eps) * weight + bias``, and moves the
    running statistics: ``new = momentum * old + (1 - momentum) * batch``.
    Inference normalises by the running statistics as they are (Flax's and
    PyTorch's rule; Equinox's ``mode="batch"`` zero-debiases them, which inflates
    an early variance). The arithmetic is :func:`dropnorm.batch_norm`'s: exact
    statistics in at least float32, masks, exact across devices.

    Where the batch is:

    * ``axis_name`` given (Equinox's convention): ``x`` is one example
      ``(input_size, *spatial)``, channels first, and the layer runs inside
      ``jax.vmap(model, axis_name=axis_name, in_axes=(0, None), out_axes=(0,
      None))`` (or ``pmap`` / ``shard_map`` over that name); the statistics are
      over the spatial axes and the mapped examples, the same numbers as
      :func:`dropnorm.batch_norm` on the whole batch. Training outside such a
      map raises a ``NameError`` naming ``axis_name`` (Equinox raises one too);
      inference needs no map.
    * ``axis_name=None``: ``x`` is a batch ``(batch, input_size, *spatial)``,
      called once without vmap (under a sharded ``jax.jit`` XLA gathers the
      statistics across devices by itself).

    Args:
      input_size: the number of channels.
      axis_name: the name of the mapped batch axis (``jax.vmap``, ``pmap``,
        ``shard_map``), or a tuple or list of names; None for a batched ``x``.
        A static field (``jax.device_put`` of a model works).
      eps: added to the variance.
      channelwise_affine: learn a per-channel ``weight`` and ``bias``.
      momentum: the decay of the running averages, in [0, 1] (PyTorch's 0.1 is
        0.9 here).
      inference: True to normalise by the running statistics; the call's
        ``inference`` overrides it. May be a traced bool.
      dtype: the dtype of ``weight``, ``bias`` and the running statistics
        (default float32, float64 in JAX's 64-bit mode). Statistics are always
        computed in at least float32; the output has the result type of ``x``
        and ``dtype``.
      mode: ``"batch"`` (the default and only mode). ``"ema"`` is refused: it
        normalises training batches by running averages (equinox#659).
      axis_index_groups: groups of indices along ``axis_name`` whose examples
        share statistics, e.g. ``[[0, 1], [2, 3]]`` (extra; static).

    Raises:
      ValueError: a bad ``input_size``, ``eps``, ``momentum``, ``mode`` or
        ``axis_index_groups``; at the call, an ``x`` whose channel axis is not
        ``input_size`` or a ``mask`` that does not broadcast to ``x``.
      TypeError: a bad ``axis_name``; at the call, a non-floating or complex
        ``x`` or a non-boolean ``inference``.
      NameError: training with an ``axis_name`` that no enclosing ``vmap`` /
        ``pmap`` / ``shard_map`` binds.

    Examples:
      >>> import jax, jax.numpy as jnp, equinox as eqx
      >>> import dropnorm.equinox as dqx
      >>> bn, state = eqx.nn.make_with_state(dqx.BatchNorm)(2, "batch", momentum=0.9)
      >>> isinstance(bn, eqx.nn.BatchNorm)
      True
      >>> x = jnp.array([[1.0, 10.0], [3.0, 30.0]])  # two examples of two channels
      >>> batched = jax.vmap(bn, axis_name="batch", in_axes=(0, None), out_axes=(0, None))
      >>> y, state = batched(x, state)
      >>> mean, var = state.get(bn.batch_state_index)  # 0.9 * 0 + 0.1 * the batch mean
      >>> y.round(3).tolist(), [round(m, 3) for m in mean.tolist()]
      ([[-1.0, -1.0], [1.0, 1.0]], [0.2, 2.0])
      >>> y_eval, _ = eqx.nn.inference_mode(bn)(x[0], state)  # one example, no vmap
      >>> y_eval.shape
      (2,)

    References:
      Ioffe & Szegedy, "Batch Normalization: Accelerating Deep Network Training
      by Reducing Internal Covariate Shift", ICML 2015.
    """

    # Static (equinox#1074): a name is no array, and the statistics' code depends on it.
    axis_name: Hashable | tuple[Hashable, ...] | None = eqx.field(static=True)
    axis_index_groups: tuple[tuple[int, ...], ...] | None = eqx.field(static=True)

    def __init__(
        self,
        input_size: int,
        axis_name: Hashable | Sequence[Hashable] | None,
        eps: float = 1e-5,
        channelwise_affine: bool = True,
        momentum: float = 0.99,
        inference: bool = False,
        dtype: Any = None,
        mode: str = "batch",
        *,
        axis_index_groups: Sequence[Sequence[int]] | None = None,
    ):
        fn = _name(self)
        if mode == "ema":
            raise ValueError(
                f"{fn}: `mode`='ema' normalises training batches by running averages that mix "
                f"in earlier batches, which makes training unstable and sensitive to the "
                f"learning rate (equinox#659, #675). dropnorm's BatchNorm always normalises a "
                f"training batch by its own statistics (Equinox's mode='batch', Flax, "
                f"PyTorch): drop the argument or pass mode='batch'.")
        if mode != "batch":
            raise ValueError(f"{fn}: `mode` must be 'batch' (the default); got {mode!r}.")
        input_size = _checks.check_positive_int(input_size, fn, "input_size")
        if not _checks.real_scalar(eps) >= 0.0:
            raise ValueError(f"{fn}: `eps` must be a non-negative number added to the "
                             f"variance; got {eps!r}. The usual value is 1e-5.")
        momentum = _checks.check_momentum(momentum, fn)
        if isinstance(axis_name, list):  # Equinox accepts any sequence; a static field hashes
            axis_name = tuple(axis_name)
        names = check_axis_name(axis_name, fn)
        groups = check_axis_index_groups(axis_index_groups, names, fn)
        dtype = _default_dtype() if dtype is None else dtype
        if channelwise_affine:
            self.weight = jnp.ones((input_size,), dtype)
            self.bias = jnp.zeros((input_size,), dtype)
        else:
            self.weight = None
            self.bias = None
        self.ema_first_time_index = None
        self.ema_state_index = None
        # An int32 counter, not Equinox's weakly typed jnp.array(0): the state must keep its
        # type from one step to the next (eqx.nn.State.set checks it).
        self.batch_counter = eqx.nn.StateIndex(jnp.zeros((), jnp.int32))
        self.batch_state_index = eqx.nn.StateIndex(
            (jnp.zeros((input_size,), dtype), jnp.ones((input_size,), dtype)))
        self.axis_name = axis_name
        self.axis_index_groups = groups
        self.inference = inference
        self.input_size = input_size
        self.eps = eps
        self.channelwise_affine = channelwise_affine
        self.momentum = momentum
        self.mode = mode

    def __call__(self, x, state, *, key=None, inference=None, mask=None):
        """Normalise ``x``; in training, return the state with new running statistics.

        Args:
          x: one example ``(input_size, *spatial)`` under a vmap over ``axis_name``,
            or a batch ``(batch, input_size, *spatial)`` when ``axis_name`` is None.
          state: the ``eqx.nn.State`` holding this layer's running statistics.
          key: ignored (Equinox's calling convention).
          inference: True or False to override the field; None to use it. May be
            traced.
          mask: optional boolean array broadcastable to ``x`` (extra): True elements
            count towards the statistics (padding gets False); all are normalised.

        Returns:
          ``(y, state)``: ``y`` of ``x``'s shape, and the state (updated in training,
          returned as given in inference).
        """
        del key
        fn = _name(self)
        caller = Caller(fn, train_off=_TRAIN_OFF, x_name="x",
                        state_hint=f"build the layer with input_size={self.input_size}")
        train = _train(self, caller, inference)
        x = _checks.check_floating(x, fn)
        channel_axis = 0 if self.axis_name is not None else 1
        self._check_shape(fn, x, channel_axis)
        if train is not False and self.axis_name is not None:
            self._check_bound(fn)
        mean, var = state.get(self.batch_state_index)
        old = BatchNormState(mean, var, state.get(self.batch_counter))
        params = BatchNormParams(self.weight, self.bias) if self.channelwise_affine else None
        with jax.named_scope(fn):
            y, new = batch_norm_as(
                caller, params, old, x, train, axis=channel_axis, momentum=self.momentum,
                epsilon=self.eps, mask=mask, axis_name=self.axis_name,
                axis_index_groups=self.axis_index_groups,
                dtype=jnp.result_type(x.dtype, mean.dtype))
        if train is not False:
            state = state.set(self.batch_counter, new.count)
            state = state.set(self.batch_state_index, (new.mean, new.var))
        return y, state

    def _check_shape(self, fn: str, x: jax.Array, channel_axis: int) -> None:
        if x.ndim > channel_axis and x.shape[channel_axis] == self.input_size:
            return
        if self.axis_name is not None:
            where = (f"one example (input_size, *spatial) = ({self.input_size}, ...), called "
                     f"inside jax.vmap(..., axis_name={self.axis_name!r})")
            fix = ("if `x` has a leading batch axis, call the model under that vmap, or build "
                   "the layer with axis_name=None")
        else:
            where = f"a batch (batch, input_size, *spatial) = (batch, {self.input_size}, ...)"
            fix = ("for one example per call under jax.vmap, build the layer with "
                   "axis_name='batch' (the vmap's axis_name)")
        raise ValueError(
            f"{fn}: `x` of shape {tuple(x.shape)} should be {where}, but the layer was built "
            f"with input_size={self.input_size} and axis_name={self.axis_name!r}. Check "
            f"`input_size`; {fix}.")

    def _check_bound(self, fn: str) -> None:
        """A training call needs the mapped batch axis: say how, in Equinox's terms."""
        try:
            jax.lax.axis_size(self.axis_name)
        except NameError:
            raise NameError(
                f"{fn}: `axis_name`={self.axis_name!r} is not bound: in training the layer "
                f"gathers batch statistics over that mapped axis. Call the model inside "
                f"jax.vmap(model, axis_name={self.axis_name!r}, in_axes=(0, None), "
                f"out_axes=(0, None)) (or pmap / shard_map over that name); or build the layer "
                f"with axis_name=None and call it on a batch (batch, input_size, ...); or pass "
                f"{_TRAIN_OFF}.") from None


class Dropout(eqx.nn.Dropout):
    """Inverted dropout; a drop-in replacement for ``eqx.nn.Dropout``.

    A subclass of ``eqx.nn.Dropout`` with its fields (``p``, ``inference``: not
    static, so ``eqx.tree_at`` can change them), constructor and call
    ``dropout(x, *, key=None, inference=None)``: elements are dropped with
    probability ``p`` and the rest scaled by the inverse keep probability; the
    call's ``inference`` overrides the field; ``p=0`` or inference returns ``x``
    and needs no key; ``eqx.nn.inference_mode`` switches it. The arithmetic is
    :func:`dropnorm.dropout`'s.

    Differences from Equinox: the keep probability is quantised to
    ``2**-mask_bits`` (extra field, default 16; ``E[y] = x`` exactly) and the
    masks differ from ``jax.random.bernoulli``'s for the same key; ``p`` and
    ``inference`` may be traced (Equinox's ``inference`` may not); ``p`` outside
    [0, 1] raises a ``ValueError`` naming ``p`` (Equinox returns NaN or garbage);
    a missing key in training raises a ``TypeError`` naming ``key`` (Equinox: a
    ``RuntimeError``); rate 1 gives zeros and zero gradients, not NaN; Equinox's
    deprecated ``deterministic`` argument is not accepted (use ``inference``).

    Args:
      p: the probability of dropping an element, in [0, 1].
      inference: True to return the input unchanged.
      mask_bits: 16 or 32: the resolution of the keep probability (extra; static).

    Raises:
      ValueError: ``p`` outside [0, 1] or NaN, a bad ``mask_bits``.
      TypeError: at the call, a missing or malformed ``key`` in training, a
        non-boolean ``inference``, a non-floating ``x``.

    Examples:
      >>> import jax, jax.numpy as jnp, equinox as eqx
      >>> import dropnorm.equinox as dqx
      >>> drop = dqx.Dropout(0.5)
      >>> y = drop(jnp.ones(64), key=jax.random.key(0))
      >>> bool(jnp.all((y == 0) | (y == 2))), isinstance(drop, eqx.nn.Dropout)
      (True, True)
      >>> eqx.nn.inference_mode(drop)(jnp.ones(3)).tolist()
      [1.0, 1.0, 1.0]

    References:
      Srivastava et al., "Dropout: A Simple Way to Prevent Neural Networks from
      Overfitting", JMLR 2014.
    """

    mask_bits: int = eqx.field(static=True)

    _kind = "dropout"  # the pure function (a class attribute, not a field)

    def __init__(self, p: float = 0.5, inference: bool = False, *,
                 mask_bits: int = DEFAULT_BITS):
        fn = _name(self)
        if not _checks.is_traced(p):
            _checks.check_rate(p, fn, "p")
        self.p = p
        self.inference = inference
        self.mask_bits = check_mask_bits(mask_bits, fn)

    def __call__(self, x, *, key=None, inference=None):
        """Apply dropout to ``x``.

        Args:
          x: the array (one example, or any array) to drop elements of.
          key: a PRNG key (``jax.random.key``); needed in training unless ``p`` is 0.
          inference: True or False to override the field; None to use it. May be
            traced.

        Returns:
          The array after dropout, of ``x``'s shape and dtype.
        """
        fn = _name(self)
        caller = Caller(fn, train_off=_TRAIN_OFF, x_name="x")
        train = _train(self, caller, inference)
        x = _checks.check_floating(x, fn)  # a key passed as `x` is named as swapped
        p = _checks.check_rate(self.p, fn, "p")
        if _checks.is_traced(p):
            p = jax.lax.stop_gradient(p)  # as Equinox: `p` is no parameter
        with jax.named_scope(fn):
            return self._drop(caller, key, x, p, train)

    def _drop(self, caller, key, x, p, train):
        return random_map_as(caller, self._kind, key, x, p, train, mask_bits=self.mask_bits)


class AlphaDropout(Dropout):
    """Alpha dropout for SELU networks (:func:`dropnorm.alpha_dropout`); not in Equinox.

    Fields and call as :class:`Dropout` (an ``eqx.nn.Dropout`` subclass too).
    Dropped units take SELU's negative saturation value and an affine map keeps
    zero mean and unit variance.

    Examples:
      >>> import jax, jax.numpy as jnp
      >>> import dropnorm.equinox as dqx
      >>> x = jax.random.normal(jax.random.key(0), (100_000,))
      >>> y = dqx.AlphaDropout(0.2)(x, key=jax.random.key(1))
      >>> bool(abs(y.mean()) < 0.02 and abs(y.std() - 1) < 0.02)
      True

    References:
      Klambauer et al., "Self-Normalizing Neural Networks", NeurIPS 2017.
    """

    _kind = "alpha"


class DropPath(Dropout):
    """Stochastic depth for one example (:func:`dropnorm.drop_path`); not in Equinox.

    Fields and call as :class:`Dropout`: with probability ``p`` the whole ``x``
    (one example's residual branch, as every Equinox layer sees one example) is
    zeroed, else it is scaled by the inverse keep probability. Use it as
    ``x + drop_path(branch(x), key=key)`` inside ``jax.vmap`` with one key per
    example.

    Examples:
      >>> import jax, jax.numpy as jnp
      >>> import dropnorm.equinox as dqx
      >>> keys = jax.random.split(jax.random.key(0), 8)
      >>> y = jax.vmap(lambda x, k: dqx.DropPath(0.5)(x, key=k))(jnp.ones((8, 3)), keys)
      >>> bool(jnp.all((y == 0) | (y == 2)) and jnp.all(y.min(1) == y.max(1)))
      True

    References:
      Huang et al., "Deep Networks with Stochastic Depth", ECCV 2016.
    """

    def _drop(self, caller, key, x, p, train):
        return random_map_as(caller, "dropout", key, x, p, train,
                             broadcast_dims=tuple(range(x.ndim)), mask_bits=self.mask_bits)


class DropBlock(Dropout):
    """DropBlock on one example's feature maps (:func:`dropnorm.drop_block`); not in Equinox.

    Every position of every channel is a seed; each dropped seed drops the
    ``block_size``-wide block centred on it, with the seed probability chosen so
    that a fraction ``p`` of the interior is dropped, and the survivors are scaled
    by ``1 / (1 - p)``. Channels first, as Equinox's convolutions: ``x`` is
    ``(channels, *spatial)`` and the spatial axes are every axis after the first,
    so it follows a ``Conv1d``, ``Conv2d`` or ``Conv3d``. Call as :class:`Dropout`;
    its arguments are checked in inference too, so a model that evaluates also
    trains.

    Args:
      p: the fraction of the (interior) feature map to drop, in [0, 1].
      block_size: the block's size: an int, or a tuple of one per spatial axis; at
        most the feature map's size.
      inference: True to return the input unchanged.
      share_channels: one mask for every channel, instead of one per channel.
      mask_bits: 16 or 32: the resolution of the seeds' keep probability.

    Raises:
      ValueError: ``p`` outside [0, 1], a bad ``mask_bits``; at the call, a
        ``block_size`` larger than the feature map or not positive.
      TypeError: as :class:`Dropout`.

    Examples:
      >>> import jax, jax.numpy as jnp
      >>> import dropnorm.equinox as dqx
      >>> drop = dqx.DropBlock(0.2, block_size=5)
      >>> y = drop(jnp.ones((3, 16, 16)), key=jax.random.key(0))  # (channels, H, W)
      >>> sorted(set(jnp.round(y, 3).ravel().tolist()))  # survivors scaled by 1 / (1 - p)
      [0.0, 1.25]

    References:
      Ghiasi, Lin & Le, "DropBlock: A regularization method for convolutional networks",
      NeurIPS 2018.
    """

    block_size: int | tuple[int, ...] = eqx.field(static=True)
    share_channels: bool = eqx.field(static=True)

    def __init__(self, p: float, block_size: int | Sequence[int], inference: bool = False, *,
                 share_channels: bool = False, mask_bits: int = DEFAULT_BITS):
        super().__init__(p, inference, mask_bits=mask_bits)
        self.block_size = tuple(block_size) if isinstance(block_size, list) else block_size
        self.share_channels = share_channels

    def _drop(self, caller, key, x, p, train):
        if x.ndim < 2:
            raise ValueError(
                f"{caller.fn}: `x` of shape {tuple(x.shape)} should be one example's feature "
                f"maps (channels, *spatial), channels first as Equinox's convolutions.")
        return drop_block_as(caller, key, x, p, train, block_size=self.block_size,
                             spatial_axes=tuple(range(1, x.ndim)), channel_axis=0,
                             share_channels=self.share_channels, mask_bits=self.mask_bits)
