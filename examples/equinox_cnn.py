"""The MNIST-1D CNN of the study, written in Equinox: dropnorm's layers against Equinox's own.

    python examples/equinox_cnn.py            # the table in docs/guides/equinox.md
    python examples/equinox_cnn.py --quick    # a smoke run: seconds

Needs Equinox besides the examples' dependencies: ``pip install -e ".[examples,equinox]"``.

The network is the study's CNN (``examples/_train.py``, ``Config(model="cnn")``): three
strided 1-D convolutions (kernels 5, 3, 3, stride 2, 'SAME' padding, 32 channels), each
followed by BatchNorm, ReLU and dropout, then a linear layer to the 10 classes; written as
an ``eqx.Module`` that sees one sequence, channels first, in Equinox's convention: the
minibatch is a ``jax.vmap(..., axis_name="batch")`` over examples, each with its own
dropout key. It is trained three times with the same data, seeds and optimiser, changing
only the two layer classes:

* ``dropnorm``: ``dropnorm.equinox.BatchNorm`` and ``dropnorm.equinox.Dropout``;
* ``equinox-batch``: ``eqx.nn.BatchNorm(mode="batch")`` and ``eqx.nn.Dropout``;
* ``equinox-ema``: ``eqx.nn.BatchNorm(mode="ema")`` (Equinox 0.13's default) and
  ``eqx.nn.Dropout``.

The settings are the study's main grid (``examples/study.py``, the "both" cell): 8 seeds
(0 to 7, trained together under ``jax.vmap``), 3000 steps of Adam (peak learning rate
1e-2, cosine decay to 1%), batches of 100, dropout rate 0.2, BatchNorm momentum 0.9,
MNIST-1D's 4000 training and 1000 test sequences. Step ``t`` of seed ``s`` draws its
minibatch and dropout keys from ``fold_in(key(s), t)``. At the end each model is
evaluated in inference mode (``eqx.nn.inference_mode``) on the test set. Prints one line
per variant and a Markdown table (mean +- std over seeds). The initialisation is
Equinox's (``eqx.nn.Linear``'s uniform), not Flax's, so the numbers are comparable with
each other, not exactly with the Flax study's.

References:
  Greydanus, "Scaling down Deep Learning with MNIST-1D", 2020 (arXiv:2011.14439).
  Ioffe & Szegedy, "Batch Normalization: Accelerating Deep Network Training by Reducing
  Internal Covariate Shift", ICML 2015.
"""

from __future__ import annotations

import argparse
import os
import sys
import time

import equinox as eqx
import jax
import jax.numpy as jnp
import numpy as np
import optax

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import _data  # noqa: E402
import _train  # noqa: E402
import study  # noqa: E402

import dropnorm.equinox as dqx  # noqa: E402

VARIANTS = ("dropnorm", "equinox-batch", "equinox-ema")


def parser() -> argparse.ArgumentParser:
    full = study._settings(study.parser().parse_args(["--out", os.devnull]))
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--variants", default=",".join(VARIANTS),
                   help="comma-separated, from " + ", ".join(VARIANTS))
    p.add_argument("--seeds", type=int, default=full.seeds, help="seeds 0 .. N-1")
    p.add_argument("--steps", type=int, default=full.steps, help="training steps")
    p.add_argument("--dropout", type=float, default=full.rate, help="dropout rate")
    p.add_argument("--momentum", type=float, default=full.momentum, help="BatchNorm momentum")
    p.add_argument("--quick", action="store_true",
                   help="a smoke run: 1 seed, 30 steps, 500 training and 200 test sequences")
    return p


def _layers(variant: str, width: int, rate: float, momentum: float):
    """A (BatchNorm, Dropout) pair of the variant's classes."""
    if variant == "dropnorm":
        return dqx.BatchNorm(width, "batch", momentum=momentum), dqx.Dropout(rate)
    mode = {"equinox-batch": "batch", "equinox-ema": "ema"}[variant]
    return (eqx.nn.BatchNorm(width, "batch", momentum=momentum, mode=mode),
            eqx.nn.Dropout(rate))


class Conv1d(eqx.Module):
    """A strided 1-D convolution with 'SAME' padding on one example ``(channels, length)``,
    written as a ``Linear`` on patches (``_train.Conv1D`` says why: XLA:CPU runs a small
    strided convolution's gradient several times slower than the equivalent product)."""

    linear: eqx.nn.Linear
    kernel: int = eqx.field(static=True)
    stride: int = eqx.field(static=True)

    def __init__(self, c_in: int, c_out: int, kernel: int, stride: int = 2, *, key):
        self.linear = eqx.nn.Linear(kernel * c_in, c_out, key=key)
        self.kernel, self.stride = kernel, stride

    def __call__(self, x):  # (c_in, length) -> (c_out, ceil(length / stride))
        length = x.shape[1]
        out_len = -(-length // self.stride)
        pad = max((out_len - 1) * self.stride + self.kernel - length, 0)
        x = jnp.pad(x, ((0, 0), (pad // 2, pad - pad // 2)))
        stop = (out_len - 1) * self.stride + 1
        patches = jnp.concatenate(
            [x[:, k:k + stop:self.stride] for k in range(self.kernel)], axis=0)
        return jax.vmap(self.linear, in_axes=1, out_axes=1)(patches)


class CNN(eqx.Module):
    """The study's CNN on one sequence of length 40, with the variant's layers."""

    convs: tuple[Conv1d, ...]
    norms: tuple[eqx.nn.BatchNorm, ...]
    drops: tuple[eqx.nn.Dropout, ...]
    head: eqx.nn.Linear

    def __init__(self, variant: str, rate: float, momentum: float, *, key, width: int = 32,
                 length: int = 40):
        keys = jax.random.split(key, 4)
        shapes = ((1, width, 5), (width, width, 3), (width, width, 3))
        self.convs = tuple(Conv1d(i, o, k, key=kk)
                           for (i, o, k), kk in zip(shapes, keys[:3], strict=True))
        self.norms, self.drops = zip(*(_layers(variant, width, rate, momentum)
                                       for _ in shapes), strict=True)
        self.head = eqx.nn.Linear(width * (length // 8), 10, key=keys[3])

    def __call__(self, x, state, *, key=None):
        h = x[None]  # (1 channel, length)
        keys = (None,) * len(self.convs) if key is None else jax.random.split(key,
                                                                                len(self.convs))
        for conv, norm, drop, k in zip(self.convs, self.norms, self.drops, keys, strict=True):
            h, state = norm(conv(h), state)
            h = drop(jax.nn.relu(h), key=k)
        return self.head(h.reshape(-1)), state


class Trainer:
    """One variant's seeds, trained together: one compiled scan over every step."""

    def __init__(self, variant: str, data: _data.Dataset, *, rate: float, momentum: float,
                 steps: int):
        self.cfg = _train.Config(model="cnn", dropout=rate, momentum=momentum, steps=steps)
        self.tx = _train.optimizer(self.cfg)  # the study's Adam and schedule
        self.variant, self.steps = variant, steps
        self.data = tuple(jnp.asarray(a) for a in data[1:])

    def init(self, seeds):
        @eqx.filter_vmap  # eager: the initialisers' small kernels compile faster than one jit
        def make(seed):
            init_key, _ = jax.random.split(jax.random.key(seed))
            model, state = eqx.nn.make_with_state(CNN)(
                self.variant, self.cfg.dropout, self.cfg.momentum, key=init_key)
            return model, state, self.tx.init(eqx.filter(model, eqx.is_inexact_array))

        return make(jnp.asarray(seeds))

    def _loss(self, model, state, xb, yb, key):
        keys = jax.random.split(key, xb.shape[0])  # one dropout key per example
        batched = jax.vmap(lambda x, k: model(x, state, key=k), axis_name="batch",
                           out_axes=(0, None))
        logits, state = batched(xb, keys)
        return optax.softmax_cross_entropy_with_integer_labels(logits, yb).mean(), state

    def _train_one(self, model, state, opt_state, seed):
        x, y = self.data[0], self.data[1]
        train_key = jax.random.split(jax.random.key(seed))[1]
        params, static = eqx.partition(model, eqx.is_array)

        def step(carry, t):
            params, state, opt_state = carry
            model = eqx.combine(params, static)
            k_batch, k_drop = jax.random.split(jax.random.fold_in(train_key, t))
            idx = jax.random.randint(k_batch, (self.cfg.batch_size,), 0, x.shape[0])
            (loss, state), grads = eqx.filter_value_and_grad(self._loss, has_aux=True)(
                model, state, x[idx], y[idx], k_drop)
            updates, opt_state = self.tx.update(
                grads, opt_state, eqx.filter(model, eqx.is_inexact_array))
            model = eqx.apply_updates(model, updates)
            return (eqx.filter(model, eqx.is_array), state, opt_state), loss

        (params, state, opt_state), losses = jax.lax.scan(
            step, (params, state, opt_state), jnp.arange(self.steps))
        return eqx.combine(params, static), state, losses

    def _test_accuracy(self, model, state):
        model = eqx.nn.inference_mode(model)
        logits, _ = jax.vmap(lambda x: model(x, state))(self.data[2])  # no statistics needed
        return (logits.argmax(-1) == self.data[3]).mean()

    def run(self, seeds) -> tuple[np.ndarray, np.ndarray]:
        """Train every seed; returns (test accuracy per seed, mean minibatch loss per seed)."""
        models, states, opt_states = self.init(seeds)

        @eqx.filter_jit
        def train_and_test(models, states, opt_states, seeds):
            def one(model, state, opt_state, seed):
                model, state, losses = self._train_one(model, state, opt_state, seed)
                return self._test_accuracy(model, state), losses.mean()

            return eqx.filter_vmap(one)(models, states, opt_states, seeds)

        acc, loss = train_and_test(models, states, opt_states, jnp.asarray(seeds))
        return np.asarray(acc), np.asarray(loss)


def table(results: dict[str, np.ndarray], seeds: int, steps: int) -> str:
    lines = ["| layers | test accuracy (mean ± std) | per seed |", "|---|---|---|"]
    for variant, acc in results.items():
        lines.append(f"| {variant} | {acc.mean():.3f} ± {acc.std():.3f} | "
                     + " ".join(f"{a:.3f}" for a in acc) + " |")
    return "\n".join(lines) + f"\n\n{seeds} seeds, {steps} steps each."


def main(argv: list[str] | None = None) -> dict[str, np.ndarray]:
    args = parser().parse_args(argv)
    variants = [v for v in args.variants.split(",") if v]
    bad = [v for v in variants if v not in VARIANTS]
    if bad:
        parser().error(f"unknown variants {bad}; use {', '.join(VARIANTS)}")
    data = _data.load("mnist1d")
    if args.quick:
        args.seeds, args.steps = 1, 30
        data = data._replace(x=data.x[:500], y=data.y[:500], x_test=data.x_test[:200],
                             y_test=data.y_test[:200])
    seeds = list(range(args.seeds))
    results = {}
    for variant in variants:
        t0 = time.perf_counter()
        trainer = Trainer(variant, data, rate=args.dropout, momentum=args.momentum,
                          steps=args.steps)
        acc, loss = trainer.run(seeds)
        results[variant] = acc
        print(f"[{time.perf_counter() - t0:6.1f}s] {variant}: test accuracy {acc.mean():.4f} "
              f"+- {acc.std():.4f} (mean minibatch loss {loss.mean():.3f})", flush=True)
    print(table(results, args.seeds, args.steps))
    return results


if __name__ == "__main__":
    main()
