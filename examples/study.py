"""What dropout and batch normalisation do, measured: a grid of small networks on real data.

    python examples/study.py --quick --out runs/quick      # a few minutes on 2 CPU cores
    python examples/study.py --out runs/full               # the full grid (docs/results/)

Runs {no regularisation, dropout, BatchNorm, both} x {MLP, CNN} x seeds x data sets
{MNIST-1D, scikit-learn digits}, then sweeps of the dropout rate and of BatchNorm's
momentum, and the "dropout before BatchNorm" variance shift. Writes to ``--out``:

* ``results.md`` / ``results.csv``: mean +- std over seeds of test accuracy, train-test
  gap and steps to reach a training-accuracy threshold; ``sweeps.csv`` and
  ``variance_shift.csv``; ``timing.md`` (wall time and machine);
* ``learning_curves.png``, ``generalisation_gap.png``, ``preactivations.png`` (15th, 50th
  and 85th percentiles of one unit's input to its ReLU over training, with and without
  BatchNorm, as in Ioffe & Szegedy 2015, Fig. 1), ``sweeps.png`` and ``variance_shift.png``
  (the last BatchNorm's running variance over the variance of its input at eval time,
  dropout placed before BatchNorm vs only after it, as in Li et al. 2019).

Every configuration is compiled once; its seeds train together (vmapped) and are
evaluated every ``--eval-every`` steps on the whole training and test sets.

References:
  Srivastava et al., "Dropout: A Simple Way to Prevent Neural Networks from
  Overfitting", JMLR 2014.
  Ioffe & Szegedy, "Batch Normalization: Accelerating Deep Network Training by
  Reducing Internal Covariate Shift", ICML 2015.
  Li, Chen, Hu & Yang, "Understanding the Disharmony between Dropout and Batch
  Normalization by Variance Shift", CVPR 2019.
  Greydanus, "Scaling down Deep Learning with MNIST-1D", 2020.
"""

from __future__ import annotations

import argparse
import csv
import dataclasses
import json
import os
import pickle
import platform
import sys
import time

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import _data  # noqa: E402
import _train  # noqa: E402

REGULARISERS = ("none", "dropout", "batchnorm", "both")


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--out", required=True, metavar="DIR", help="where tables and plots go")
    p.add_argument("--quick", action="store_true",
                   help="MNIST-1D only, 2 seeds, 1000 steps, small sweeps (a few minutes)")
    p.add_argument("--datasets", default=None, help="comma-separated, e.g. mnist1d,digits")
    p.add_argument("--models", default=None, help="comma-separated, e.g. mlp,cnn")
    p.add_argument("--seeds", type=int, default=None, help="seeds in the main grid")
    p.add_argument("--sweep-seeds", type=int, default=None, help="seeds in the sweeps")
    p.add_argument("--steps", type=int, default=None)
    p.add_argument("--eval-every", type=int, default=None)
    p.add_argument("--rate", type=float, default=0.2, help="dropout rate of the main grid")
    p.add_argument("--momentum", type=float, default=0.9, help="BatchNorm momentum (grid)")
    p.add_argument("--threshold", type=float, default=0.9,
                   help="training accuracy whose first crossing is reported")
    p.add_argument("--rates", default=None, help="dropout-rate sweep, comma-separated")
    p.add_argument("--momenta", default=None, help="momentum sweep, comma-separated")
    p.add_argument("--shift-rates", default=None, help="variance-shift rates, comma-separated")
    p.add_argument("--sweep-models", default=None, help="models in the sweeps")
    p.add_argument("--no-sweeps", action="store_true", help="only the main grid")
    return p


def _settings(args) -> argparse.Namespace:
    quick = args.quick
    defaults = dict(
        datasets="mnist1d" if quick else "mnist1d,digits",
        models="mlp,cnn",
        seeds=2 if quick else 8,
        sweep_seeds=2 if quick else 5,
        steps=1000 if quick else 3000,
        eval_every=100,
        rates="0,0.2,0.5" if quick else "0,0.1,0.2,0.3,0.5",
        momenta="0.5,0.9,0.99" if quick else "0.5,0.9,0.99,0.999",
        shift_rates="0.3" if quick else "0.1,0.3,0.5",
        sweep_models="mlp" if quick else "mlp,cnn",
    )
    s = argparse.Namespace(**vars(args))
    for k, v in defaults.items():
        if getattr(s, k) is None:
            setattr(s, k, v)
    for k in ("datasets", "models", "sweep_models"):
        setattr(s, k, [x for x in getattr(s, k).split(",") if x])
    for k in ("rates", "momenta", "shift_rates"):
        setattr(s, k, [float(x) for x in getattr(s, k).split(",") if x])
    bad = [d for d in s.datasets if d not in _data.DATASETS]
    bad += [m for m in s.models + s.sweep_models if m not in _train.MODELS]
    if bad:
        raise SystemExit(f"study.py: unknown data set or model {bad}; "
                         f"use {_data.DATASETS} and {_train.MODELS}.")
    return s


class Runner:
    """Trains one configuration for a list of seeds (one compilation) and logs a line."""

    def __init__(self, steps: int, eval_every: int):
        self.steps, self.eval_every = steps, eval_every
        self.log: list[dict] = []

    def __call__(self, dataset: str, cfg: _train.Config, n_seeds: int) -> dict:
        data = _data.load(dataset)
        t0 = time.perf_counter()
        trainer = _train.Trainer(cfg, data.x, data.y, data.x_test, data.y_test)
        seeds = list(range(n_seeds))
        _, hist = _train.run(trainer, seeds, steps=self.steps, eval_every=self.eval_every)
        wall = time.perf_counter() - t0
        self.log.append({"dataset": dataset, **dataclasses.asdict(cfg), "seconds": wall})
        print(f"[{wall:6.1f}s] {dataset:8s} {cfg.model} dropout={cfg.dropout:g} "
              f"bn={cfg.batch_norm} momentum={cfg.momentum:g} placement={cfg.placement}: "
              f"test {hist['test_acc'][-1].mean():.4f} +- {hist['test_acc'][-1].std():.4f} "
              f"train {hist['train_acc'][-1].mean():.4f}", flush=True)
        return hist


def _mean_std(a) -> tuple[float, float]:
    a = np.asarray(a, float)
    a = a[~np.isnan(a)]
    return (float(a.mean()), float(a.std())) if a.size else (float("nan"), float("nan"))


def _write_csv(path: str, rows: list[dict]) -> None:
    with open(path, "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=list(rows[0]))
        w.writeheader()
        w.writerows(rows)


def _md_table(header: list[str], rows: list[list[str]]) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + "|".join("---" for _ in header) + "|"]
    lines += ["| " + " | ".join(r) + " |" for r in rows]
    return "\n".join(lines)


def grid(s, run: Runner) -> dict:
    out = {}
    for dataset in s.datasets:
        for model in s.models:
            for reg in REGULARISERS:
                cfg = _train.Config(
                    model=model, dropout=s.rate if reg in ("dropout", "both") else 0.0,
                    batch_norm=reg in ("batchnorm", "both"), momentum=s.momentum,
                    steps=s.steps)
                out[dataset, model, reg] = run(dataset, cfg, s.seeds)
    return out


def grid_rows(s, results: dict) -> list[dict]:
    rows = []
    for (dataset, model, reg), h in results.items():
        test, train = h["test_acc"][-1], h["train_acc"][-1]
        to_thr = _train.steps_to(h["step"], h["train_acc"], s.threshold)
        m_thr, s_thr = _mean_std(to_thr)
        rows.append({
            "dataset": dataset, "model": model, "config": reg,
            "dropout": s.rate if reg in ("dropout", "both") else 0.0,
            "batch_norm": reg in ("batchnorm", "both"), "seeds": test.size, "steps": s.steps,
            "test_acc_mean": float(test.mean()), "test_acc_std": float(test.std()),
            "train_acc_mean": float(train.mean()), "train_acc_std": float(train.std()),
            "gap_mean": float((train - test).mean()), "gap_std": float((train - test).std()),
            "steps_to_threshold_mean": m_thr, "steps_to_threshold_std": s_thr,
            "threshold_reached": int(np.sum(~np.isnan(to_thr))),
        })
    return rows


def sweeps(s, run: Runner) -> tuple[list[dict], list[dict]]:
    sweep_rows, shift_rows = [], []

    def summary(h):
        t = h["test_acc"][-1]
        return {"test_acc_mean": float(t.mean()), "test_acc_std": float(t.std()),
                "gap_mean": float((h["train_acc"][-1] - t).mean())}

    dataset = s.datasets[0]
    for model in s.sweep_models:
        for rate in s.rates:
            cfg = _train.Config(model=model, dropout=rate, batch_norm=False, steps=s.steps)
            sweep_rows.append({"dataset": dataset, "model": model, "sweep": "dropout_rate",
                               "value": rate, **summary(run(dataset, cfg, s.sweep_seeds))})
        for mom in s.momenta:
            cfg = _train.Config(model=model, dropout=0.0, batch_norm=True, momentum=mom,
                                steps=s.steps)
            sweep_rows.append({"dataset": dataset, "model": model, "sweep": "bn_momentum",
                               "value": mom, **summary(run(dataset, cfg, s.sweep_seeds))})
        for placement in ("before_bn", "last"):
            for rate in s.shift_rates:
                cfg = _train.Config(model=model, dropout=rate, batch_norm=True,
                                    momentum=s.momentum, placement=placement, steps=s.steps)
                h = run(dataset, cfg, s.sweep_seeds)
                ratio = h["var_ratio"][-1]
                shift_rows.append({"dataset": dataset, "model": model, "placement": placement,
                                   "rate": rate, "var_ratio_mean": float(ratio.mean()),
                                   "var_ratio_std": float(ratio.std()), **summary(h)})
    return sweep_rows, shift_rows


# -- plots -------------------------------------------------------------------------------------
def _plt():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


COLOURS = {"none": "tab:gray", "dropout": "tab:blue", "batchnorm": "tab:orange",
           "both": "tab:green"}


def plot_learning_curves(results: dict, path: str) -> None:
    plt = _plt()
    panels = sorted({(d, m) for d, m, _ in results}, key=lambda k: list(results).index(
        next(key for key in results if key[:2] == k)))
    fig, axes = plt.subplots(1, len(panels), figsize=(4.2 * len(panels), 3.6), squeeze=False)
    for ax, (dataset, model) in zip(axes[0], panels, strict=True):
        for reg in REGULARISERS:
            h = results.get((dataset, model, reg))
            if h is None:
                continue
            steps, test, train = h["step"], h["test_acc"], h["train_acc"]
            m, sd = test.mean(1), test.std(1)
            ax.plot(steps, m, color=COLOURS[reg], label=f"{reg} (test)")
            ax.fill_between(steps, m - sd, m + sd, color=COLOURS[reg], alpha=0.2)
            ax.plot(steps, train.mean(1), color=COLOURS[reg], ls="--", lw=0.9)
        lo = min(results[dataset, model, r]["test_acc"][1:].min() for r in REGULARISERS
                 if (dataset, model, r) in results)
        ax.set_ylim(max(0.0, lo - 0.05), 1.0)
        ax.set_title(f"{dataset} / {model}")
        ax.set_xlabel("step")
        ax.grid(alpha=0.3)
    axes[0, 0].set_ylabel("accuracy (solid: test, dashed: train)")
    axes[0, 0].legend(fontsize=8, loc="lower right")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def plot_gap(rows: list[dict], path: str) -> None:
    plt = _plt()
    panels = list(dict.fromkeys((r["dataset"], r["model"]) for r in rows))
    fig, ax = plt.subplots(figsize=(max(5.0, 2.2 * len(panels)), 3.6))
    width = 0.8 / len(REGULARISERS)
    for j, reg in enumerate(REGULARISERS):
        sel = [next((r for r in rows if (r["dataset"], r["model"]) == p and r["config"] == reg),
                    None) for p in panels]
        xs = [i + (j - 1.5) * width for i, r in enumerate(sel) if r is not None]
        ax.bar(xs, [r["gap_mean"] for r in sel if r is not None], width,
               yerr=[r["gap_std"] for r in sel if r is not None], color=COLOURS[reg],
               label=reg, capsize=2)
    ax.set_xticks(range(len(panels)), [f"{d}\n{m}" for d, m in panels])
    ax.set_ylabel("train - test accuracy (final)")
    ax.set_title("Generalisation gap (mean +- std over seeds)")
    ax.legend(fontsize=8)
    ax.grid(axis="y", alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def plot_preactivations(results: dict, path: str) -> None:
    plt = _plt()
    keys = [(d, m) for d, m, r in results if r == "none" and (d, m, "batchnorm") in results]
    keys = [k for k in keys if k[0] == keys[0][0]] if keys else []
    fig, axes = plt.subplots(len(keys), 2, figsize=(8.5, 2.8 * max(len(keys), 1)),
                             squeeze=False)
    for row, (dataset, model) in zip(axes, keys, strict=True):
        for ax, reg in zip(row, ("none", "batchnorm"), strict=True):
            h = results[dataset, model, reg]
            pct = h["preact_pct"][:, 0, :]  # seed 0: (evals, 3)
            for k, (q, ls) in enumerate(zip((15, 50, 85), (":", "-", ":"), strict=True)):
                ax.plot(h["step"], pct[:, k], ls=ls, color="k", label=f"{q}th percentile")
            ax.set_title(f"{dataset} / {model}: " +
                         ("with BatchNorm" if reg == "batchnorm" else "without BatchNorm"),
                         fontsize=9)
            ax.set_xlabel("step")
            ax.grid(alpha=0.3)
        row[0].set_ylabel("input to a ReLU")
    axes[0, 0].legend(fontsize=7)
    fig.suptitle("One unit's input to its nonlinearity over training (test set, seed 0)",
                 fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def plot_sweeps(rows: list[dict], path: str) -> None:
    plt = _plt()
    fig, axes = plt.subplots(1, 2, figsize=(9, 3.5))
    for ax, sweep, label in zip(axes, ("dropout_rate", "bn_momentum"),
                                ("dropout rate (no BatchNorm)",
                                 "BatchNorm momentum (no dropout)"), strict=True):
        for model in dict.fromkeys(r["model"] for r in rows):
            sel = [r for r in rows if r["sweep"] == sweep and r["model"] == model]
            if not sel:
                continue
            ax.errorbar([r["value"] for r in sel], [r["test_acc_mean"] for r in sel],
                        yerr=[r["test_acc_std"] for r in sel], marker="o", capsize=3,
                        label=model)
        if sweep == "bn_momentum":
            ax.set_xscale("logit")
        ax.set_xlabel(label)
        ax.set_ylabel("final test accuracy")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def plot_variance_shift(rows: list[dict], path: str) -> None:
    plt = _plt()
    fig, axes = plt.subplots(1, 2, figsize=(9, 3.5))
    for model in dict.fromkeys(r["model"] for r in rows):
        for placement, ls in (("before_bn", "-"), ("last", "--")):
            sel = [r for r in rows if r["model"] == model and r["placement"] == placement]
            rates = [r["rate"] for r in sel]
            axes[0].errorbar(rates, [r["var_ratio_mean"] for r in sel],
                             yerr=[r["var_ratio_std"] for r in sel], marker="o", ls=ls,
                             capsize=3, label=f"{model}, dropout {placement}")
            axes[1].errorbar(rates, [r["test_acc_mean"] for r in sel],
                             yerr=[r["test_acc_std"] for r in sel], marker="o", ls=ls,
                             capsize=3, label=f"{model}, dropout {placement}")
    axes[0].axhline(1.0, color="k", lw=0.8)
    axes[0].set_ylabel("running var / actual var at eval")
    axes[1].set_ylabel("final test accuracy")
    for ax in axes:
        ax.set_xlabel("dropout rate")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7)
    fig.suptitle("Variance shift at the last BatchNorm (Li et al. 2019)", fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


# -- report ------------------------------------------------------------------------------------
def _pm(m, s, digits=3):
    return "n/a" if np.isnan(m) else f"{m:.{digits}f} ± {s:.{digits}f}"


def write_markdown(s, path, rows, sweep_rows, shift_rows, wall) -> None:
    parts = [f"# Study results\n\n{s.seeds} seeds per configuration, {s.steps} steps, batch "
             f"100, Adam (peak lr 1e-2, cosine decay); dropout rate {s.rate:g}, BatchNorm "
             f"momentum {s.momentum:g}. Accuracies are final, in eval mode, on the whole "
             f"training and test sets; mean ± std over seeds. \"Steps to {s.threshold:.0%}\" "
             f"is the first evaluation (every {s.eval_every} steps) at which training accuracy "
             f"reached {s.threshold:.0%} (mean over the seeds that reached it). Wall time "
             f"{wall / 60:.1f} min.\n"]
    parts.append(_md_table(
        ["data set", "model", "config", "test accuracy", "train accuracy", "train - test gap",
         f"steps to {s.threshold:.0%} train", "reached"],
        [[r["dataset"], r["model"], r["config"], _pm(r["test_acc_mean"], r["test_acc_std"]),
          _pm(r["train_acc_mean"], r["train_acc_std"]), _pm(r["gap_mean"], r["gap_std"]),
          _pm(r["steps_to_threshold_mean"], r["steps_to_threshold_std"], 0),
          f"{r['threshold_reached']}/{r['seeds']}"] for r in rows]))
    if sweep_rows:
        parts.append(f"\n## Sweeps ({s.datasets[0]}, {s.sweep_seeds} seeds)\n")
        parts.append(_md_table(
            ["model", "sweep", "value", "test accuracy", "train - test gap"],
            [[r["model"], r["sweep"], f"{r['value']:g}",
              _pm(r["test_acc_mean"], r["test_acc_std"]), f"{r['gap_mean']:.3f}"]
             for r in sweep_rows]))
    if shift_rows:
        parts.append(f"\n## Variance shift ({s.datasets[0]}, {s.sweep_seeds} seeds)\n\n"
                     "Ratio of the last BatchNorm's running variance to the variance of its "
                     "input at eval time (mean over features; 1 means no shift).\n")
        parts.append(_md_table(
            ["model", "dropout placement", "rate", "running / actual variance",
             "test accuracy"],
            [[r["model"], r["placement"], f"{r['rate']:g}",
              _pm(r["var_ratio_mean"], r["var_ratio_std"]),
              _pm(r["test_acc_mean"], r["test_acc_std"])] for r in shift_rows]))
    with open(path, "w") as f:
        f.write("\n".join(parts) + "\n")


def machine() -> str:
    import jax

    cpu = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo") as f:
            cpu = next(line.split(":", 1)[1].strip() for line in f if "model name" in line)
    except (OSError, StopIteration):
        pass
    dev = jax.devices()[0]
    return (f"{platform.system()} {platform.machine()}, {cpu}, {os.cpu_count()} logical CPUs; "
            f"JAX {jax.__version__} on {dev.platform} ({dev.device_kind})")


def main(argv: list[str] | None = None) -> dict:
    args = parser().parse_args(argv)
    s = _settings(args)
    os.makedirs(s.out, exist_ok=True)
    t0 = time.perf_counter()
    run = Runner(s.steps, s.eval_every)
    results = grid(s, run)
    rows = grid_rows(s, results)
    sweep_rows, shift_rows = ([], []) if s.no_sweeps else sweeps(s, run)
    wall = time.perf_counter() - t0
    with open(os.path.join(s.out, "histories.pkl"), "wb") as f:  # to re-plot without re-running
        pickle.dump({"settings": vars(s), "grid": results, "sweeps": sweep_rows,
                     "shift": shift_rows, "log": run.log, "wall": wall}, f)

    _write_csv(os.path.join(s.out, "results.csv"), rows)
    if sweep_rows:
        _write_csv(os.path.join(s.out, "sweeps.csv"), sweep_rows)
        plot_sweeps(sweep_rows, os.path.join(s.out, "sweeps.png"))
    if shift_rows:
        _write_csv(os.path.join(s.out, "variance_shift.csv"), shift_rows)
        plot_variance_shift(shift_rows, os.path.join(s.out, "variance_shift.png"))
    write_markdown(s, os.path.join(s.out, "results.md"), rows, sweep_rows, shift_rows, wall)
    plot_learning_curves(results, os.path.join(s.out, "learning_curves.png"))
    plot_gap(rows, os.path.join(s.out, "generalisation_gap.png"))
    plot_preactivations(results, os.path.join(s.out, "preactivations.png"))
    command = "python examples/study.py " + " ".join(argv if argv is not None else sys.argv[1:])
    with open(os.path.join(s.out, "timing.md"), "w") as f:
        f.write(f"# Timing\n\nCommand: `{command}`\n\nWall time: {wall:.0f} s "
                f"({wall / 60:.1f} min), {time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())}"
                f"\n\nMachine: {machine()}\n\nPer configuration (seconds, compile included):\n\n")
        f.write(_md_table(["data set", "model", "dropout", "bn", "momentum", "placement", "s"],
                          [[r["dataset"], r["model"], f"{r['dropout']:g}", str(r["batch_norm"]),
                            f"{r['momentum']:g}", r["placement"], f"{r['seconds']:.1f}"]
                           for r in run.log]) + "\n")
    with open(os.path.join(s.out, "curves.json"), "w") as f:
        json.dump({"/".join(k): {"step": h["step"].tolist(),
                                 "test_acc": h["test_acc"].tolist(),
                                 "train_acc": h["train_acc"].tolist()}
                   for k, h in results.items()}, f)
    with open(os.path.join(s.out, "results.md")) as f:
        print(f.read())
    print(f"wrote {s.out}/ in {wall:.0f} s")
    return {"rows": rows, "sweeps": sweep_rows, "shift": shift_rows, "wall": wall}


if __name__ == "__main__":
    main()
