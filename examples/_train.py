"""Shared model and training loop of ``examples/mnist1d.py`` and ``examples/study.py``.

The networks are built from ``flax.linen`` layers and dropnorm's drop-in
``dropnorm.linen.BatchNorm`` / ``dropnorm.linen.Dropout``; the optimiser is optax's Adam.

Efficiency: one network structure is compiled once and serves every seed and every
dropout rate, momentum and learning rate (arguments of the compiled programs, as are the
data). The training state carries a leading seed axis and the step is ``jax.vmap``-ed
over it; ``eval_every`` steps run inside one ``jax.lax.scan`` per call, and the model is
evaluated (on the whole training and test sets, in eval mode) only between those chunks.
Every random draw (minibatch indices, dropout masks) comes from ``fold_in(key(seed),
step)``, so a run resumed from a checkpoint takes exactly the same steps as an
uninterrupted one.
"""

from __future__ import annotations

import dataclasses
import functools
import os
from collections.abc import Callable, Sequence
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import linen as nn

from dropnorm import linen as dnn

MODELS = ("mlp", "cnn")
PLACEMENTS = ("standard", "before_bn", "last")


@dataclasses.dataclass(frozen=True)
class Config:
    """One network and its optimiser.

    Attributes:
      model: 'mlp' (two hidden Dense layers) or 'cnn' (three strided 1-D convolutions).
      dropout: the dropout rate (probability of dropping); 0 for none.
      batch_norm: whether each hidden layer has a BatchNorm before its ReLU.
      momentum: BatchNorm's running-average decay (Flax convention).
      placement: where dropout goes: 'standard' (after each hidden ReLU), 'before_bn'
        (in front of every hidden layer but the first, so it feeds that layer's
        BatchNorm) or 'last' (once, after the last hidden layer: after every BatchNorm).
      width: hidden units (MLP) or channels (CNN).
      lr: Adam's peak learning rate (cosine decay to 1% of it over ``steps``).
      batch_size: examples per step.
      steps: total training steps (the learning-rate schedule's length).
    """

    model: str = "mlp"
    dropout: float = 0.1
    batch_norm: bool = True
    momentum: float = 0.9
    placement: str = "standard"
    width: int = 0  # 0: the model's default (100 units for the MLP, 32 channels for the CNN)
    lr: float = 1e-2
    batch_size: int = 100
    steps: int = 3000

    def __post_init__(self):
        if self.model not in MODELS:
            raise ValueError(f"Config: model={self.model!r}; use one of {MODELS}.")
        if self.placement not in PLACEMENTS:
            raise ValueError(f"Config: placement={self.placement!r}; use one of {PLACEMENTS}.")
        if not 0.0 <= self.dropout < 1.0:
            raise ValueError(f"Config: dropout={self.dropout!r}; use a rate in [0, 1).")


class Conv1D(nn.Module):
    """Strided 1-D convolution with 'SAME' padding, written as patches times a Dense kernel.

    The same function as ``nn.Conv(features, (kernel,), strides=stride)``, but XLA:CPU runs
    the gradient of a small strided convolution several times slower than the equivalent
    matrix product, and a seed-vmapped convolution becomes a grouped one, slower still.
    """

    features: int
    kernel: int
    stride: int = 2

    @nn.compact
    def __call__(self, x):  # x: (batch, length, channels)
        length = x.shape[1]
        out_len = -(-length // self.stride)
        pad = max((out_len - 1) * self.stride + self.kernel - length, 0)
        x = jnp.pad(x, ((0, 0), (pad // 2, pad - pad // 2), (0, 0)))
        stop = (out_len - 1) * self.stride + 1
        patches = jnp.concatenate(
            [x[:, k:k + stop:self.stride] for k in range(self.kernel)], axis=-1)
        return nn.Dense(self.features)(patches)  # (batch, out_len, features)


class Net(nn.Module):
    """MLP or 1-D CNN with optional BatchNorm and dropout (see :class:`Config`).

    Two values are recorded with ``sow`` into the ``intermediates`` collection (only
    when it is mutable): ``bn_in{i}``, the input of hidden layer ``i``'s BatchNorm, and
    ``preact{i}``, the input of its ReLU.
    """

    cfg: Config

    @nn.compact
    def __call__(self, x, train: bool, rate=None, momentum=None):
        """``rate`` and ``momentum`` (traced values allowed) override the config's; whether
        there is dropout at all is the config's (``cfg.dropout > 0``)."""
        cfg = self.cfg
        cnn = cfg.model == "cnn"
        width = cfg.width or (32 if cnn else 100)
        if cnn:
            x = x[..., None]  # (batch, length, 1 channel)
            layers = [lambda: Conv1D(width, 5), lambda: Conv1D(width, 3),
                      lambda: Conv1D(width, 3)]
        else:
            layers = [lambda: nn.Dense(width), lambda: nn.Dense(width)]
        rate = cfg.dropout if rate is None else rate
        momentum = cfg.momentum if momentum is None else momentum

        def drop(h):
            return dnn.Dropout(rate)(h, deterministic=not train) if cfg.dropout > 0 else h

        for i, layer in enumerate(layers):
            if cfg.placement == "before_bn" and i > 0:
                x = drop(x)
            x = layer()(x)
            if cfg.batch_norm:
                self.sow("intermediates", f"bn_in{i}", x)
                x = dnn.BatchNorm(use_running_average=not train, momentum=momentum)(x)
            self.sow("intermediates", f"preact{i}", x)
            x = nn.relu(x)
            if cfg.placement == "standard":
                x = drop(x)
        x = x.reshape(x.shape[0], -1)
        if cfg.placement == "last":
            x = drop(x)
        return nn.Dense(10)(x)

    @property
    def n_hidden(self) -> int:
        return 3 if self.cfg.model == "cnn" else 2


class TrainState(NamedTuple):
    """Everything a run needs to continue; in the loop every leaf has a leading seed axis."""

    params: Any
    batch_stats: Any  # {} without BatchNorm
    opt_state: Any
    step: jax.Array  # int32 scalar (per seed)


def _keys(seed):
    """(init key, training key) of a seed; step ``t`` of training uses ``fold_in(train, t)``."""
    return jax.random.split(jax.random.key(seed))


def optimizer(cfg: Config, lr=None) -> optax.GradientTransformation:
    """Adam with a cosine decay of the peak rate ``lr`` (the config's unless given; traced
    values allowed) to 1% of it over ``cfg.steps``."""
    return optax.adam(optax.cosine_decay_schedule(cfg.lr if lr is None else lr, cfg.steps,
                                                  alpha=0.01))


class Hyper(NamedTuple):
    """A configuration's values that are arguments of its compiled programs (float32)."""

    rate: jax.Array
    momentum: jax.Array
    lr: jax.Array


class Trainer:
    """Compiled training chunk and evaluation for one :class:`Config`, vmapped over seeds.

    The data, the dropout rate, the momentum and the learning rate are arguments of the
    compiled programs, not constants baked into them, and the programs belong to the
    network's structure (:func:`_programs`): every trainer of one structure and data
    shapes runs the same compiled chunk (a sweep over rates or momenta compiles once)."""

    def __init__(self, cfg: Config, x: np.ndarray, y: np.ndarray,
                 x_test: np.ndarray, y_test: np.ndarray):
        self.cfg = cfg
        self.model = Net(cfg)
        self.tx = optimizer(cfg)
        self.data = tuple(jnp.asarray(a) for a in (x, y, x_test, y_test))
        self._programs = _programs(_structure(cfg))
        self._hyper = Hyper(*(jnp.float32(v) for v in (cfg.dropout, cfg.momentum, cfg.lr)))

    def init(self, seeds: Sequence[int]) -> TrainState:
        """A fresh state for each seed (leading axis: seeds)."""
        return self._programs.init(jnp.asarray(seeds, jnp.int32), self.data[0][:2])

    def train(self, state: TrainState, seeds, n: int):
        """Run ``n`` steps for every seed; returns (state, mean minibatch loss per seed)."""
        return self._programs.chunk(state, jnp.asarray(seeds, jnp.int32), self.data,
                                    self._hyper, n)

    def evaluate(self, state: TrainState) -> dict[str, np.ndarray]:
        """Eval-mode metrics on the whole training and test sets, per seed (NumPy)."""
        return {k: np.asarray(v) for k, v in self._programs.eval(state, self.data).items()}


def _structure(cfg: Config) -> Config:
    """``cfg`` without the values that :class:`Hyper` carries (dropout stays on or off)."""
    return dataclasses.replace(cfg, dropout=0.5 if cfg.dropout > 0 else 0.0, momentum=0.5,
                               lr=1.0)


@functools.cache
def _programs(structure: Config) -> _Programs:
    """The compiled programs of one network structure, shared by all its trainers."""
    return _Programs(structure)


class _Programs:
    """Initialisation, training chunk and evaluation of one network structure, jitted; the
    data (``x, y, x_test, y_test``) are arguments, and the training chunk's :class:`Hyper`
    values too."""

    def __init__(self, structure: Config):
        self.cfg = structure
        self.model = Net(structure)
        self.tx = optimizer(structure)  # its state's structure; the updates use Hyper.lr
        self.chunk = jax.jit(self._chunk_impl, static_argnums=4)
        self.eval = jax.jit(self._eval_impl)
        self.init = jax.jit(jax.vmap(self._init_one, in_axes=(0, None)))

    # -- state ------------------------------------------------------------------------------
    def _init_one(self, seed, x_example):
        variables = self.model.init(_keys(seed)[0], x_example, train=False)
        params = variables["params"]
        return TrainState(params, variables.get("batch_stats", {}),
                          self.tx.init(params), jnp.zeros((), jnp.int32))

    # -- training ---------------------------------------------------------------------------
    def _loss(self, params, batch_stats, xb, yb, key, hyper):
        logits, updates = self.model.apply(
            {"params": params, "batch_stats": batch_stats}, xb, train=True,
            rate=hyper.rate, momentum=hyper.momentum, rngs={"dropout": key},
            mutable=["batch_stats"])
        loss = optax.softmax_cross_entropy_with_integer_labels(logits, yb).mean()
        return loss, updates.get("batch_stats", {})

    def _step_one(self, state: TrainState, seed, x, y, hyper):
        key = jax.random.fold_in(_keys(seed)[1], state.step)
        k_batch, k_drop = jax.random.split(key)
        idx = jax.random.randint(k_batch, (self.cfg.batch_size,), 0, x.shape[0])
        (loss, batch_stats), grads = jax.value_and_grad(self._loss, has_aux=True)(
            state.params, state.batch_stats, x[idx], y[idx], k_drop, hyper)
        tx = optimizer(self.cfg, lr=hyper.lr)
        updates, opt_state = tx.update(grads, state.opt_state, state.params)
        params = optax.apply_updates(state.params, updates)
        return TrainState(params, batch_stats, opt_state, state.step + 1), loss

    def _chunk_impl(self, state, seeds, data, hyper, n):
        x, y = data[0], data[1]

        def one(s, seed):
            return jax.lax.scan(lambda c, _: self._step_one(c, seed, x, y, hyper), s, None,
                                length=n)

        state, losses = jax.vmap(one)(state, seeds)
        return state, losses.mean(axis=1)

    # -- evaluation -------------------------------------------------------------------------
    def _eval_one(self, state: TrainState, data):
        x, y, x_test, y_test = data
        variables = {"params": state.params, "batch_stats": state.batch_stats}

        def metrics(xs, ys):
            # Eval mode: dropout is off and BatchNorm reads its running averages, so the
            # rate and the momentum (the structure's placeholders here) play no part.
            logits, inter = self.model.apply(variables, xs, train=False,
                                             mutable=["intermediates"])
            loss = optax.softmax_cross_entropy_with_integer_labels(logits, ys).mean()
            acc = (logits.argmax(-1) == ys).mean()
            return loss, acc, inter["intermediates"]

        train_loss, train_acc, _ = metrics(x, y)
        test_loss, test_acc, inter = metrics(x_test, y_test)
        last = self.model.n_hidden - 1
        # One unit's (one channel's) input to the last hidden ReLU over the test set.
        unit = inter[f"preact{last}"][0][..., 0].reshape(-1)
        out = {"train_loss": train_loss, "train_acc": train_acc, "test_loss": test_loss,
               "test_acc": test_acc,
               "preact_pct": jnp.percentile(unit, jnp.array([15.0, 50.0, 85.0]))}
        if self.cfg.batch_norm:
            # Variance shift (Li et al. 2019): the running variance the last BatchNorm uses
            # at eval time over the variance its input actually has at eval time.
            h = inter[f"bn_in{last}"][0]
            actual = h.reshape(-1, h.shape[-1]).var(axis=0)
            running = jax.tree.leaves(state.batch_stats[f"BatchNorm_{last}"]["var"])[0]
            out["var_ratio"] = jnp.mean(running / actual)
        return out

    def _eval_impl(self, state, data):
        return jax.vmap(self._eval_one, in_axes=(0, None))(state, data)


def steps_to(history_steps: np.ndarray, curve: np.ndarray, threshold: float) -> np.ndarray:
    """First evaluated step where ``curve`` (evals, seeds) reaches ``threshold``; NaN if never."""
    reached = curve >= threshold
    first = np.argmax(reached, axis=0)
    return np.where(reached.any(axis=0), history_steps[first], np.nan).astype(float)


def run(trainer: Trainer, seeds: Sequence[int], *, steps: int, eval_every: int,
        state: TrainState | None = None, stop_at: int | None = None,
        on_chunk: Callable[[int, TrainState, dict], None] | None = None,
        progress: Any = None) -> tuple[TrainState, dict[str, np.ndarray]]:
    """Train ``seeds`` together from ``state`` (fresh if None) up to ``steps``.

    Evaluates at step 0 (for a fresh state) and after every chunk of ``eval_every`` steps
    (chunk ends are multiples of ``eval_every``, and ``steps`` itself), so a resumed run
    makes the same compiled calls as an uninterrupted one. ``stop_at`` ends early, as an
    interruption would. Returns the final state and the history: ``step`` (evals,) and
    every metric as (evals, seeds).
    """
    if state is None:
        state = trainer.init(seeds)
    history: dict[str, list] = {}

    def record(metrics, step):
        history.setdefault("step", []).append(step)
        for k, v in metrics.items():
            history.setdefault(k, []).append(v)

    step = int(np.asarray(state.step).reshape(-1)[0])
    if step == 0:
        record(trainer.evaluate(state), 0)
    end = steps if stop_at is None else min(steps, stop_at)
    while step < end:
        n = min(eval_every - step % eval_every, end - step)
        state, loss = trainer.train(state, seeds, n)
        step += n
        metrics = trainer.evaluate(state)
        metrics["batch_loss"] = np.asarray(loss)
        record(metrics, step)
        if progress is not None:
            progress.update(n)
            progress.set_postfix(train_acc=f"{metrics['train_acc'].mean():.3f}",
                                 test_acc=f"{metrics['test_acc'].mean():.3f}")
        if on_chunk is not None:
            on_chunk(step, state, metrics)
    out = {k: np.stack([np.asarray(v) for v in vs]) for k, vs in history.items() if k != "step"}
    out["step"] = np.asarray(history.get("step", []), dtype=np.int64)
    return state, out


# -- checkpoints (orbax) ------------------------------------------------------------------------
def save_checkpoint(directory: str, state: TrainState) -> str:
    """Save params, BatchNorm state, optimiser state and step with orbax (overwrites)."""
    import orbax.checkpoint as ocp

    os.makedirs(directory, exist_ok=True)
    path = os.path.abspath(os.path.join(directory, "checkpoint"))
    ckptr = ocp.StandardCheckpointer()
    ckptr.save(path, state._asdict(), force=True)
    ckptr.wait_until_finished()
    ckptr.close()
    return path


def load_checkpoint(directory: str, like: TrainState) -> TrainState:
    """Restore a state saved by :func:`save_checkpoint` into the structure of ``like``."""
    import orbax.checkpoint as ocp

    path = os.path.abspath(os.path.join(directory, "checkpoint"))
    if not os.path.isdir(path):
        raise FileNotFoundError(f"--resume: no checkpoint at {path}; run once with --out first.")
    abstract = jax.tree.map(ocp.utils.to_shape_dtype_struct, like._asdict())
    ckptr = ocp.StandardCheckpointer()
    restored = ckptr.restore(path, abstract)
    ckptr.close()
    return TrainState(**restored)
