"""Train one network on MNIST-1D (or scikit-learn's digits) with dropnorm's Flax modules.

    python examples/mnist1d.py --model cnn --out runs/cnn          # 0.971 test accuracy (seed 0)
    python examples/mnist1d.py --model mlp --dropout 0.3 --no-batch-norm
    python examples/mnist1d.py --out runs/cnn --stop-at 1500       # as if interrupted
    python examples/mnist1d.py --out runs/cnn --resume             # same end state as above

Prints train and test accuracy and, last, ``test_accuracy=0.xxxx``. With ``--out DIR``
writes ``DIR/metrics.json`` and an orbax checkpoint ``DIR/checkpoint`` (params, BatchNorm
statistics, optimiser state, step) after every evaluation; ``--resume`` continues from it
and ends in the same state as an uninterrupted run with the same flags (``--steps`` is
also the length of the learning-rate schedule, so keep it when resuming).

References:
  Greydanus, "Scaling down Deep Learning with MNIST-1D", 2020 (arXiv:2011.14439).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import _data  # noqa: E402
import _train  # noqa: E402


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--model", choices=_train.MODELS, default="cnn", help="network")
    p.add_argument("--dataset", choices=_data.DATASETS, default="mnist1d", help="data set")
    p.add_argument("--dropout", type=float, default=0.1, metavar="RATE",
                   help="dropout rate (probability of dropping); 0 for none")
    p.add_argument("--batch-norm", action=argparse.BooleanOptionalAction, default=True,
                   help="BatchNorm before every hidden ReLU")
    p.add_argument("--momentum", type=float, default=0.9, help="BatchNorm momentum")
    p.add_argument("--placement", choices=_train.PLACEMENTS, default="standard",
                   help="where dropout goes (see examples/_train.py)")
    p.add_argument("--steps", type=int, default=3000,
                   help="training steps, also the length of the learning-rate schedule")
    p.add_argument("--batch-size", type=int, default=100, help="examples per step")
    p.add_argument("--lr", type=float, default=1e-2, help="peak Adam learning rate")
    p.add_argument("--seed", type=int, default=0,
                   help="initialisation, minibatch and dropout seed")
    p.add_argument("--eval-every", type=int, default=250,
                   help="steps between evaluations (and checkpoints)")
    p.add_argument("--out", default=None, metavar="DIR",
                   help="write metrics.json and an orbax checkpoint here")
    p.add_argument("--resume", action="store_true", help="continue from DIR/checkpoint")
    p.add_argument("--stop-at", type=int, default=None, metavar="STEP",
                   help="stop at this step as if interrupted (the schedule still spans --steps)")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    return p


def config_from(args: argparse.Namespace) -> _train.Config:
    return _train.Config(model=args.model, dropout=args.dropout, batch_norm=args.batch_norm,
                         momentum=args.momentum, placement=args.placement, lr=args.lr,
                         batch_size=args.batch_size, steps=args.steps)


def main(argv: list[str] | None = None) -> dict:
    args = parser().parse_args(argv)
    if args.resume and args.out is None:
        parser().error("--resume needs --out DIR (where the checkpoint is)")
    cfg = config_from(args)
    data = _data.load(args.dataset)
    trainer = _train.Trainer(cfg, data.x, data.y, data.x_test, data.y_test)
    seeds = [args.seed]
    state = trainer.init(seeds)
    previous: dict = {}
    if args.resume:
        state = _train.load_checkpoint(args.out, state)
        metrics_path = os.path.join(args.out, "metrics.json")
        if os.path.exists(metrics_path):
            with open(metrics_path) as f:
                previous = json.load(f)
    start = int(np.asarray(state.step)[0])

    def save(step, st, _metrics):
        if args.out is not None:
            _train.save_checkpoint(args.out, st)

    from tqdm import tqdm

    t0 = time.perf_counter()
    end = args.steps if args.stop_at is None else min(args.steps, args.stop_at)
    with tqdm(total=end, initial=start, disable=args.no_progress,
              desc=f"{args.model} {args.dataset}") as bar:
        state, hist = _train.run(trainer, seeds, steps=args.steps, eval_every=args.eval_every,
                                 state=state, stop_at=args.stop_at, on_chunk=save,
                                 progress=bar)
    wall = time.perf_counter() - t0
    history = previous.get("history", [])
    keys = ("train_loss", "train_acc", "test_loss", "test_acc")
    for i, step in enumerate(hist["step"]):
        history.append({"step": int(step), **{k: float(hist[k][i, 0]) for k in keys}})
    final = history[-1]
    result = {"config": vars(args) | {"width": cfg.width}, "step": final["step"],
              "train_accuracy": final["train_acc"], "test_accuracy": final["test_acc"],
              "train_loss": final["train_loss"], "test_loss": final["test_loss"],
              "wall_seconds": previous.get("wall_seconds", 0.0) + wall, "history": history}
    if args.out is not None:
        os.makedirs(args.out, exist_ok=True)
        with open(os.path.join(args.out, "metrics.json"), "w") as f:
            json.dump(result, f, indent=1)
    print(f"step={final['step']} train_accuracy={final['train_acc']:.4f} "
          f"train_loss={final['train_loss']:.4f} test_loss={final['test_loss']:.4f}")
    print(f"test_accuracy={final['test_acc']:.4f}")
    result["state"] = state
    return result


if __name__ == "__main__":
    main()
