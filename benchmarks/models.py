"""The models the tables share, built from flax.linen modules with either library's layers.

Each model takes its BatchNorm / Dropout classes (or its ``attention_fn``) as fields, so the
same code builds the Flax model and the dropnorm one, with the same variable tree:

* :class:`MLP` and :func:`twelve_layer_step`: Dense -> BatchNorm -> relu -> Dropout, 12
  times, bf16 (the 12-layer memory figure, the steps table's MLP, the scale table's compile).
* :class:`ResNet` (:class:`Block`): a small ResNet in the layout of Flax's ImageNet example
  (the steps table, the ``pmap`` and the sharded ``jit`` train steps of the scale tables).
* :class:`Transformer` (:class:`EncoderBlock`): pre-LN blocks in the layout of Flax's WMT
  example (the steps table).
* :class:`DenseBatchNormDropout`: one hidden block (the sharded-``jit`` table).
* :func:`classifier_step`: a train step with cross-entropy and an optax update.
"""

from __future__ import annotations

import functools
from collections.abc import Callable

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

RATE = 0.1  # the dropout rate of every table


class MLP(nn.Module):
    """``depth`` times Dense -> BatchNorm -> relu -> Dropout, in bf16."""
    bn: type
    dropout: type
    width: int
    depth: int = 12

    @nn.compact
    def __call__(self, x, train: bool):
        for _ in range(self.depth):
            x = nn.Dense(self.width, dtype=jnp.bfloat16)(x)
            x = self.bn(use_running_average=not train, dtype=jnp.bfloat16)(x)
            x = nn.relu(x)
            x = self.dropout(RATE, deterministic=not train)(x)
        return x


def twelve_layer_temp_bytes(bn, dropout, batch: int, width: int) -> int:
    """The compiled temp memory of :func:`twelve_layer_step` (bytes, exact)."""
    step, args = twelve_layer_step(bn, dropout, batch, width)
    compiled = jax.jit(step).lower(*args).compile()
    return int(compiled.memory_analysis().temp_size_in_bytes)


class DenseBatchNormDropout(nn.Module):
    """``Dense -> BatchNorm -> relu -> Dropout -> Dense`` (the sharded-``jit`` table)."""
    bn: type
    dropout: type
    features: int

    @nn.compact
    def __call__(self, x, train: bool):
        x = nn.Dense(self.features)(x)
        x = self.bn(use_running_average=not train, momentum=0.99, epsilon=1e-5)(x)
        x = self.dropout(RATE, deterministic=not train)(nn.relu(x))
        return nn.Dense(self.features)(x)


class Block(nn.Module):
    """The basic residual block of Flax's ImageNet example (``ResNetBlock``)."""
    filters: int
    norm: Callable
    strides: tuple[int, int] = (1, 1)

    @nn.compact
    def __call__(self, x):
        conv = functools.partial(nn.Conv, use_bias=False)
        y = nn.relu(self.norm()(conv(self.filters, (3, 3), self.strides)(x)))
        y = self.norm(scale_init=nn.initializers.zeros)(conv(self.filters, (3, 3))(y))
        if x.shape != y.shape:
            x = self.norm()(conv(self.filters, (1, 1), self.strides)(x))
        return nn.relu(x + y)


class ResNet(nn.Module):
    """A small ResNet in the layout of Flax's ImageNet example: 3 stages of 2 blocks, 15 BN."""
    bn: type
    stages: tuple[int, ...] = (2, 2, 2)
    width: int = 16
    classes: int = 10
    axis_name: str | None = "batch"  # None: under jit, one device or batch-sharded

    @nn.compact
    def __call__(self, x, train: bool):
        norm = functools.partial(self.bn, use_running_average=not train, momentum=0.9,
                                 epsilon=1e-5, axis_name=self.axis_name)
        x = nn.relu(norm()(nn.Conv(self.width, (3, 3), use_bias=False)(x)))
        for i, blocks in enumerate(self.stages):
            for j in range(blocks):
                x = Block(self.width * 2**i, norm, (2, 2) if i > 0 and j == 0 else (1, 1))(x)
        return nn.Dense(self.classes)(jnp.mean(x, axis=(1, 2)))


def twelve_layer_step(bn, dropout, batch: int, width: int, tx=None, depth: int = 12):
    """The benchmark's 12-layer bf16 training step: ``(step, args)``, ``step`` not yet jitted.

    Without ``tx`` the step returns the loss, the gradients and the new statistics (the
    memory and trace+compile figures); with an optax ``tx`` it applies the update and
    returns ``(params, batch_stats, opt_state, loss)`` (the steps table).
    """
    net = MLP(bn, dropout, width, depth)
    x = (jnp.ones((batch, width), jnp.bfloat16) if tx is None else
         jnp.asarray(np.random.default_rng(6).standard_normal((batch, width)), jnp.bfloat16))
    variables = net.init({"params": jax.random.key(0)}, x, False)

    def loss(p, stats, x, key):
        y, upd = net.apply({"params": p, "batch_stats": stats}, x, True,
                           rngs={"dropout": key}, mutable=["batch_stats"])
        return jnp.mean(jnp.square(y.astype(jnp.float32))), upd

    def step(params, stats, x, key):
        (value, upd), grads = jax.value_and_grad(loss, has_aux=True)(params, stats, x, key)
        return value, grads, upd

    if tx is None:
        return step, (variables["params"], variables["batch_stats"], x, jax.random.key(1))

    import optax

    def train_step(params, stats, opt_state, x, key):
        (value, upd), grads = jax.value_and_grad(loss, has_aux=True)(params, stats, x, key)
        updates, opt_state = tx.update(grads, opt_state, params)
        return optax.apply_updates(params, updates), upd["batch_stats"], opt_state, value

    params = variables["params"]
    return train_step, (params, variables["batch_stats"], tx.init(params), x,
                        jax.random.key(1))


class EncoderBlock(nn.Module):
    """A pre-LN Transformer encoder block in the layout of Flax's WMT example
    (``Encoder1DBlock``: attention dropout with ``broadcast_dropout=False``, dropout after the
    attention, inside the MLP after the activation, and after the MLP)."""
    dropout: type
    attention_fn: Callable
    heads: int
    mlp: int

    @nn.compact
    def __call__(self, x, train: bool):
        det = not train
        h = nn.MultiHeadDotProductAttention(
            self.heads, dropout_rate=RATE, broadcast_dropout=False, deterministic=det,
            attention_fn=self.attention_fn)(nn.LayerNorm()(x))
        x = x + self.dropout(RATE, deterministic=det)(h)
        h = nn.relu(nn.Dense(self.mlp)(nn.LayerNorm()(x)))
        h = nn.Dense(x.shape[-1])(self.dropout(RATE, deterministic=det)(h))
        return x + self.dropout(RATE, deterministic=det)(h)


class Transformer(nn.Module):
    """``layers`` encoder blocks, a final LayerNorm and a per-token classifier."""
    dropout: type
    attention_fn: Callable
    layers: int = 2
    heads: int = 4
    mlp: int = 256
    classes: int = 16

    @nn.compact
    def __call__(self, x, train: bool):
        for _ in range(self.layers):
            x = EncoderBlock(self.dropout, self.attention_fn, self.heads, self.mlp)(x, train)
        return nn.Dense(self.classes)(nn.LayerNorm()(x))


def classifier_step(net, x, y, tx, stats: bool, variables=None):
    """A jitted-later train step of ``net`` with cross-entropy and the optax ``tx``:
    ``(step, args)``; ``step(params, batch_stats, opt_state, x, y, key)`` returns the new
    params, statistics ({} without BatchNorm) and optimiser state, and the loss.
    ``variables``: ``net``'s, or None to initialise them (compiling the initialisers takes
    seconds on CPU: the second model of a pair takes the first one's)."""
    import optax

    rngs = {"params": jax.random.key(0), "dropout": jax.random.key(1)}
    if variables is None:
        variables = jax.jit(net.init, static_argnums=2)(rngs, x, False)
    shapes = jax.eval_shape(lambda r: net.init(r, x, False), rngs)
    assert jax.tree.structure(shapes) == jax.tree.structure(variables), type(net).__name__
    params, batch_stats = variables["params"], variables.get("batch_stats", {})

    def train_step(params, batch_stats, opt_state, x, y, key):
        def loss_fn(p):
            variables = {"params": p} | ({"batch_stats": batch_stats} if stats else {})
            logits, upd = net.apply(variables, x, True, rngs={"dropout": key},
                                    mutable=["batch_stats"] if stats else [])
            loss = optax.softmax_cross_entropy_with_integer_labels(logits, y).mean()
            return loss, upd.get("batch_stats", {})

        (loss, new_stats), grads = jax.value_and_grad(loss_fn, has_aux=True)(params)
        updates, opt_state = tx.update(grads, opt_state, params)
        return optax.apply_updates(params, updates), new_stats, opt_state, loss

    return train_step, (params, batch_stats, tx.init(params), x, y, jax.random.key(2))
