"""Average the weights of a run's last part (SWA), then recompute the BatchNorm statistics.

    python examples/swa_precise_bn.py            # the table in docs/guides/population_stats.md
    python examples/swa_precise_bn.py --quick    # a few seconds

Trains the CNN of ``examples/mnist1d.py`` (``dropnorm.linen`` BatchNorm and Dropout) with
Adam on MNIST-1D: cosine decay of the learning rate for the first ``1 - --swa-fraction``
of the steps, down to ``--swa-lr``, which is then held while the weights are averaged
every ``--swa-every`` steps (stochastic weight averaging, Izmailov et al. 2018; by
default ``--swa-lr`` is the peak rate, so the schedule is constant throughout). The
averaged weights come with no BatchNorm statistics of their own: the running averages of
the last model belong to other weights. ``dropnorm.linen.recompute_batch_norm`` computes
them for the averaged weights, exactly (the population mean and variance of each layer's
inputs over the whole training set, dropout off). Prints the test accuracy, per seed and
averaged, of

* the final weights with their running statistics,
* the final weights with recomputed statistics (PreciseBN alone),
* the averaged weights with the final model's (stale) running statistics,
* the averaged weights with recomputed statistics,

and, last, ``swa_recomputed_accuracy=0.xxxx`` (the mean over seeds).

References:
  Izmailov et al., "Averaging Weights Leads to Wider Optima and Better Generalization",
  UAI 2018. Wu & Johnson, "Rethinking 'Batch' in BatchNorm", 2021 (PreciseBN).
  Greydanus, "Scaling down Deep Learning with MNIST-1D", 2020.
"""

from __future__ import annotations

import argparse
import os
import sys
import time

import jax
import jax.numpy as jnp
import numpy as np
import optax

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import _data  # noqa: E402
import _train  # noqa: E402

from dropnorm import linen as dnn  # noqa: E402

ROWS = (("final", "running"), ("final", "recomputed"), ("SWA", "stale (the final model's)"),
        ("SWA", "recomputed"))


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--model", choices=_train.MODELS, default="cnn", help="network")
    p.add_argument("--steps", type=int, default=3000, help="training steps")
    p.add_argument("--swa-fraction", type=float, default=0.25,
                   help="the last part of the run whose weights are averaged")
    p.add_argument("--swa-every", type=int, default=25, help="steps between snapshots")
    p.add_argument("--lr", type=float, default=1e-2, help="peak Adam learning rate")
    p.add_argument("--swa-lr", type=float, default=1e-2,
                   help="the constant learning rate while averaging (the default, the peak "
                        "rate, makes the whole schedule constant)")
    p.add_argument("--dropout", type=float, default=0.1, help="dropout rate")
    p.add_argument("--momentum", type=float, default=0.9, help="BatchNorm momentum")
    p.add_argument("--batch-size", type=int, default=100, help="examples per step")
    p.add_argument("--seeds", type=int, default=5, help="seeds 0 .. N-1, trained together")
    p.add_argument("--quick", action="store_true",
                   help="a smoke run: MLP, 80 steps, 1 seed, 1000 training examples")
    return p


class SWATrainer(_train.Trainer):
    """``_train.Trainer`` with SWA's schedule: cosine decay to ``swa_lr``, then constant."""

    def __init__(self, cfg, data, swa_start: int, swa_lr: float):
        super().__init__(cfg, data.x, data.y, data.x_test, data.y_test)
        schedule = optax.join_schedules(
            [optax.cosine_decay_schedule(cfg.lr, swa_start, alpha=swa_lr / cfg.lr),
             optax.constant_schedule(swa_lr)], [swa_start])
        self.tx = optax.adam(schedule)  # read when the jitted steps are first traced


def _per_seed(tree, i):
    return jax.tree.map(lambda a: a[i], tree)


def _stack(trees):
    return jax.tree.map(lambda *a: jnp.stack(a), *trees)


def recompute(trainer: _train.Trainer, params, batch_stats, x, batch_size: int):
    """Each seed's BatchNorm statistics recomputed over ``x`` (batches in order, dropout off)."""
    batches = [x[i:i + batch_size] for i in range(0, len(x) - batch_size + 1, batch_size)]
    out = []
    for i in range(jax.tree.leaves(params)[0].shape[0]):
        variables = {"params": _per_seed(params, i), "batch_stats": _per_seed(batch_stats, i)}
        new = dnn.recompute_batch_norm(trainer.model, variables, batches, train=False)
        out.append(new["batch_stats"])
    return _stack(out)


def main(argv: list[str] | None = None) -> dict:
    args = parser().parse_args(argv)
    if args.quick:
        args.model, args.steps, args.seeds, args.swa_every = "mlp", 80, 1, 10
    if not 0 < args.swa_fraction < 1:
        parser().error("--swa-fraction must be in (0, 1)")
    data = _data.load("mnist1d")
    if args.quick:
        data = data._replace(x=data.x[:1000], y=data.y[:1000])
    cfg = _train.Config(model=args.model, dropout=args.dropout, momentum=args.momentum,
                        lr=args.lr, batch_size=args.batch_size, steps=args.steps)
    swa_start = int(round(args.steps * (1 - args.swa_fraction)))
    trainer = SWATrainer(cfg, data, swa_start, args.swa_lr)
    seeds = list(range(args.seeds))
    t0 = time.perf_counter()
    state = trainer.init(seeds)
    total, snapshots, step = None, 0, 0
    while step < args.steps:  # in chunks of --swa-every steps: one compiled chunk
        n = min(args.swa_every, args.steps - step, swa_start - step if step < swa_start
                else args.steps)
        state, _ = trainer.train(state, seeds, n)
        step += n
        if step > swa_start:
            total = state.params if total is None else jax.tree.map(jnp.add, total,
                                                                    state.params)
            snapshots += 1
    swa = jax.tree.map(lambda a: a / snapshots, total)
    train_seconds = time.perf_counter() - t0

    t1 = time.perf_counter()
    x = jnp.asarray(data.x)
    final_stats = recompute(trainer, state.params, state.batch_stats, x, args.batch_size)
    swa_stats = recompute(trainer, swa, state.batch_stats, x, args.batch_size)
    recompute_seconds = time.perf_counter() - t1

    combos = {ROWS[0]: (state.params, state.batch_stats), ROWS[1]: (state.params, final_stats),
              ROWS[2]: (swa, state.batch_stats), ROWS[3]: (swa, swa_stats)}
    rows = []
    for (weights, stats), (p, s) in combos.items():
        acc = trainer.evaluate(state._replace(params=p, batch_stats=s))["test_acc"]
        rows.append({"weights": weights, "statistics": stats, "test_acc": acc.tolist(),
                     "mean": float(np.mean(acc))})

    print(f"{args.model} on MNIST-1D, {args.steps} steps ({swa_start} then {snapshots} "
          f"snapshots every {args.swa_every}), {args.seeds} seed(s); training {train_seconds:.1f}"
          f" s, recomputing the statistics {recompute_seconds:.1f} s")
    print("| weights | BatchNorm statistics | test accuracy, mean | per seed |")
    print("|---|---|---|---|")
    for r in rows:
        per_seed = ", ".join(f"{100 * a:.1f}" for a in r["test_acc"])
        print(f"| {r['weights']} | {r['statistics']} | {100 * r['mean']:.1f}% | {per_seed} |")
    print(f"swa_recomputed_accuracy={rows[3]['mean']:.4f}")
    return {"rows": rows, "swa_params": swa, "swa_stats": swa_stats, "trainer": trainer, "x": x,
            "snapshots": snapshots, "train_seconds": train_seconds,
            "recompute_seconds": recompute_seconds}


if __name__ == "__main__":
    main()
