"""What dropout and batch normalisation do, measured: a grid of small networks on real data.

    python examples/study.py --quick --out runs/quick      # a few minutes on 2 CPU cores
    python examples/study.py --out runs/full               # the full grid (docs/results/)
    python examples/study.py --replot docs/results         # redraw the plots from the tables
    python examples/study.py --calibration-only --out DIR  # only the calibration table

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
  dropout placed before BatchNorm vs only after it, as in Li et al. 2019);
* ``calibration.md`` / ``calibration.csv`` (also a section of ``results.md``): on the first
  data set's test set, for the configurations with dropout ("dropout" and "both"), the
  expected calibration error (15 equal-width confidence bins) and negative log-likelihood
  of the deterministic network against Monte-Carlo dropout (Gal & Ghahramani 2016) with
  K = 1, 8 and 32 passes (``dropnorm.mc_dropout``: dropout on, BatchNorm frozen), mean +-
  std over the seeds; ``calibration.json`` (the reliability bins, pooled over seeds) and
  ``reliability.png`` (accuracy against confidence per bin, deterministic vs the largest K).

Every configuration is compiled once; its seeds train together (vmapped) and are
evaluated every ``--eval-every`` steps on the whole training and test sets. A configuration
that both the grid and a sweep ask for (e.g. dropout rate 0 without BatchNorm) is trained
once, with the larger number of seeds; the other uses its first seeds. A progress bar
counts the configurations ("k/N", elapsed and estimated remaining time).

``--replot DIR`` redraws every plot from what a run saved in ``DIR`` (``results.csv``,
``sweeps.csv``, ``variance_shift.csv``, ``curves.json``, ``calibration.json``) without
training anything. ``--calibration-only`` trains only the configurations the calibration
needs and writes only its outputs.

References:
  Srivastava et al., "Dropout: A Simple Way to Prevent Neural Networks from
  Overfitting", JMLR 2014.
  Ioffe & Szegedy, "Batch Normalization: Accelerating Deep Network Training by
  Reducing Internal Covariate Shift", ICML 2015.
  Li, Chen, Hu & Yang, "Understanding the Disharmony between Dropout and Batch
  Normalization by Variance Shift", CVPR 2019.
  Greydanus, "Scaling down Deep Learning with MNIST-1D", 2020.
  Gal & Ghahramani, "Dropout as a Bayesian Approximation: Representing Model
  Uncertainty in Deep Learning", ICML 2016.
  Guo, Pleiss, Sun & Weinberger, "On Calibration of Modern Neural Networks", ICML 2017.
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

import _calibration  # noqa: E402
import _data  # noqa: E402
import _train  # noqa: E402

REGULARISERS = ("none", "dropout", "batchnorm", "both")


# The settings that --quick changes: name -> (full study, --quick). With --quick the main
# grid has 8 configurations and the sweeps 3 + 3 + 4, of which 3 are grid configurations
# (rate 0, rate 0.2, momentum 0.9): 15 are trained in all; the full study trains 40.
DEFAULTS = {
    "datasets": ("mnist1d,digits", "mnist1d"),
    "models": ("mlp,cnn", "mlp,cnn"),
    "seeds": (8, 2),
    "sweep_seeds": (5, 2),
    "steps": (3000, 1000),
    "eval_every": (100, 100),
    "rates": ("0,0.1,0.2,0.3,0.5", "0,0.2,0.5"),
    "momenta": ("0.5,0.9,0.99,0.999", "0.5,0.9,0.99"),
    "shift_rates": ("0.1,0.3,0.5", "0.1,0.5"),
    "sweep_models": ("mlp,cnn", "mlp"),
    "mc_samples": ("1,8,32", "1,8,32"),
}


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])

    def study_default(name: str, help: str, **kw):
        full, quick = DEFAULTS[name]
        default = f"default {full}" if full == quick else f"default {full}; --quick: {quick}"
        p.add_argument("--" + name.replace("_", "-"), default=None,
                       help=f"{help} ({default})", **kw)

    p.add_argument("--out", default=None, metavar="DIR",
                   help="where tables and plots go (required unless --replot)")
    p.add_argument("--replot", default=None, metavar="DIR",
                   help="only redraw the plots of DIR from its saved tables and curves")
    p.add_argument("--quick", action="store_true",
                   help="MNIST-1D only, 2 seeds, 1000 steps, small sweeps (a few minutes)")
    study_default("datasets", "data sets, comma-separated")
    study_default("models", "models, comma-separated")
    study_default("seeds", "seeds in the main grid", type=int)
    study_default("sweep_seeds", "seeds in the sweeps", type=int)
    study_default("steps", "training steps", type=int)
    study_default("eval_every", "steps between evaluations", type=int)
    p.add_argument("--rate", type=float, default=0.2,
                   help="dropout rate of the main grid (default 0.2)")
    p.add_argument("--momentum", type=float, default=0.9,
                   help="BatchNorm momentum of the main grid (default 0.9)")
    p.add_argument("--threshold", type=float, default=0.9,
                   help="training accuracy whose first crossing is reported (default 0.9)")
    study_default("rates", "dropout-rate sweep, comma-separated")
    study_default("momenta", "momentum sweep, comma-separated")
    study_default("shift_rates", "variance-shift rates, comma-separated")
    study_default("sweep_models", "models in the sweeps")
    p.add_argument("--no-sweeps", action="store_true", help="only the main grid")
    study_default("mc_samples", "MC-dropout passes K of the calibration table, comma-separated")
    p.add_argument("--calibration-bins", type=int, default=15,
                   help="confidence bins of the expected calibration error (default 15)")
    p.add_argument("--calibration-only", action="store_true",
                   help="train only the configurations with dropout on the first data set "
                        "and write only the calibration table and plot")
    p.add_argument("--no-calibration", action="store_true", help="no calibration table")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    return p


def _settings(args) -> argparse.Namespace:
    defaults = {k: v[1] if args.quick else v[0] for k, v in DEFAULTS.items()}
    s = argparse.Namespace(**vars(args))
    for k, v in defaults.items():
        if getattr(s, k) is None:
            setattr(s, k, v)
    for k in ("datasets", "models", "sweep_models"):
        setattr(s, k, [x for x in getattr(s, k).split(",") if x])
    for k in ("rates", "momenta", "shift_rates"):
        setattr(s, k, [float(x) for x in getattr(s, k).split(",") if x])
    s.mc_samples = [int(x) for x in s.mc_samples.split(",") if x]
    if not s.mc_samples or min(s.mc_samples) < 1 or s.calibration_bins < 1:
        raise SystemExit("study.py: --mc-samples must be positive ints and --calibration-bins "
                         "a positive int.")
    if s.calibration_only and s.no_calibration:
        raise SystemExit("study.py: --calibration-only and --no-calibration exclude each other.")
    bad = [d for d in s.datasets if d not in _data.DATASETS]
    bad += [m for m in s.models + s.sweep_models if m not in _train.MODELS]
    if bad:
        raise SystemExit(f"study.py: unknown data set or model {bad}; "
                         f"use {_data.DATASETS} and {_train.MODELS}.")
    return s


def _canonical(cfg: _train.Config) -> _train.Config:
    """``cfg`` with the fields that cannot change the computation set to fixed values.

    Without BatchNorm its momentum is unused; without dropout, where dropout goes is.
    """
    if not cfg.batch_norm:
        cfg = dataclasses.replace(cfg, momentum=_train.Config.momentum)
    if cfg.dropout == 0.0:
        cfg = dataclasses.replace(cfg, placement=_train.Config.placement)
    return cfg


class Runner:
    """Trains each configuration once, for all its seeds (one compilation), with a progress bar.

    ``plan`` announces every (data set, config, seeds) the study will ask for, so that a
    configuration asked for twice is trained once with the larger number of seeds, and the
    progress bar knows the total. ``run(dataset, cfg, n)`` then returns the history of the
    first ``n`` seeds.
    """

    def __init__(self, steps: int, eval_every: int, progress: bool = True):
        self.steps, self.eval_every, self.progress = steps, eval_every, progress
        self.log: list[dict] = []
        self._seeds: dict[tuple, int] = {}  # planned seeds per (dataset, canonical config)
        self._done: dict[tuple, dict] = {}
        self._states: dict[tuple, _train.TrainState] = {}  # final states (for calibration)
        self._bar = None

    def plan(self, jobs) -> int:
        for dataset, cfg, n in jobs:
            key = (dataset, _canonical(cfg))
            self._seeds[key] = max(self._seeds.get(key, 0), n)
        from tqdm import tqdm

        self._bar = tqdm(total=len(self._seeds), unit="config", disable=not self.progress,
                         desc="configurations", dynamic_ncols=True)
        return len(self._seeds)

    def close(self) -> None:
        if self._bar is not None:
            self._bar.close()

    def _train(self, dataset: str, cfg: _train.Config, n_seeds: int) -> dict:
        data = _data.load(dataset)
        t0 = time.perf_counter()
        trainer = _train.Trainer(cfg, data.x, data.y, data.x_test, data.y_test)
        state, hist = _train.run(trainer, list(range(n_seeds)), steps=self.steps,
                                 eval_every=self.eval_every)
        self._states[(dataset, _canonical(cfg))] = state
        wall = time.perf_counter() - t0
        self.log.append({"dataset": dataset, **dataclasses.asdict(cfg), "seeds": n_seeds,
                         "seconds": wall})
        line = (f"[{wall:6.1f}s] {dataset:8s} {cfg.model} dropout={cfg.dropout:g} "
                f"bn={cfg.batch_norm} momentum={cfg.momentum:g} placement={cfg.placement} "
                f"seeds={n_seeds}: test {hist['test_acc'][-1].mean():.4f} +- "
                f"{hist['test_acc'][-1].std():.4f} train {hist['train_acc'][-1].mean():.4f}")
        if self._bar is not None and not self._bar.disable:
            self._bar.write(line)
            self._bar.update(1)
        else:
            print(line, flush=True)
        return hist

    def __call__(self, dataset: str, cfg: _train.Config, n_seeds: int) -> dict:
        key = (dataset, _canonical(cfg))
        hist = self._done.get(key)
        if hist is None or hist["test_acc"].shape[1] < n_seeds:
            if self._bar is not None and key not in self._seeds:
                self._bar.total += 1  # not planned: still counted
            hist = self._train(dataset, cfg, max(n_seeds, self._seeds.get(key, 0)))
            self._done[key] = hist
        return {k: (v if k == "step" else v[:, :n_seeds]) for k, v in hist.items()}

    def state(self, dataset: str, cfg: _train.Config, n_seeds: int) -> _train.TrainState:
        """The final training state of the first ``n_seeds`` seeds (trained if need be)."""
        self(dataset, cfg, n_seeds)
        import jax

        state = self._states[(dataset, _canonical(cfg))]
        return jax.tree.map(lambda a: a[:n_seeds], state)


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


def grid_configs(s) -> list[tuple[tuple[str, str, str], _train.Config]]:
    """((data set, model, regulariser), config) for every cell of the main grid."""
    return [((dataset, model, reg), _train.Config(
                model=model, dropout=s.rate if reg in ("dropout", "both") else 0.0,
                batch_norm=reg in ("batchnorm", "both"), momentum=s.momentum, steps=s.steps))
            for dataset in s.datasets for model in s.models for reg in REGULARISERS]


def sweep_configs(s) -> list[tuple[str, str, float, _train.Config]]:
    """(model, sweep, value, config): the dropout-rate and momentum sweeps."""
    out = []
    for model in s.sweep_models:
        out += [(model, "dropout_rate", rate, _train.Config(
            model=model, dropout=rate, batch_norm=False, momentum=s.momentum, steps=s.steps))
            for rate in s.rates]
        out += [(model, "bn_momentum", mom, _train.Config(
            model=model, dropout=0.0, batch_norm=True, momentum=mom, steps=s.steps))
            for mom in s.momenta]
    return out


def shift_configs(s) -> list[tuple[str, str, float, _train.Config]]:
    """(model, placement, rate, config): the variance-shift runs."""
    return [(model, placement, rate, _train.Config(
                model=model, dropout=rate, batch_norm=True, momentum=s.momentum,
                placement=placement, steps=s.steps))
            for model in s.sweep_models for placement in ("before_bn", "last")
            for rate in s.shift_rates]


def calibration_configs(s) -> list[tuple[tuple[str, str, str], _train.Config]]:
    """The grid cells the calibration table scores: the first data set, with dropout."""
    return [(key, cfg) for key, cfg in grid_configs(s)
            if key[0] == s.datasets[0] and key[2] in ("dropout", "both")]


def jobs(s) -> list[tuple[str, _train.Config, int]]:
    """Every (data set, config, seeds) the study asks for, in the order it asks."""
    if s.calibration_only:
        return [(key[0], cfg, s.seeds) for key, cfg in calibration_configs(s)]
    out = [(key[0], cfg, s.seeds) for key, cfg in grid_configs(s)]
    if not s.no_sweeps:
        out += [(s.datasets[0], cfg, s.sweep_seeds) for *_, cfg in sweep_configs(s)]
        out += [(s.datasets[0], cfg, s.sweep_seeds) for *_, cfg in shift_configs(s)]
    return out


def grid(s, run: Runner) -> dict:
    return {key: run(key[0], cfg, s.seeds) for key, cfg in grid_configs(s)}


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
    def summary(h):
        t = h["test_acc"][-1]
        return {"test_acc_mean": float(t.mean()), "test_acc_std": float(t.std()),
                "gap_mean": float((h["train_acc"][-1] - t).mean())}

    dataset = s.datasets[0]
    sweep_rows = [{"dataset": dataset, "model": model, "sweep": sweep, "value": value,
                   "seeds": s.sweep_seeds, **summary(run(dataset, cfg, s.sweep_seeds))}
                  for model, sweep, value, cfg in sweep_configs(s)]
    shift_rows = []
    for model, placement, rate, cfg in shift_configs(s):
        h = run(dataset, cfg, s.sweep_seeds)
        ratio = h["var_ratio"][-1]
        shift_rows.append({"dataset": dataset, "model": model, "placement": placement,
                           "rate": rate, "seeds": s.sweep_seeds,
                           "var_ratio_mean": float(ratio.mean()),
                           "var_ratio_std": float(ratio.std()), **summary(h)})
    return sweep_rows, shift_rows


def calibration(s, run: Runner) -> tuple[list[dict], dict]:
    """ECE and NLL of the deterministic network and of MC dropout (K = ``s.mc_samples``)
    on the test set, per configuration with dropout; returns the table's rows and the
    reliability bins (pooled over seeds) of every method, keyed "dataset/model/config"."""
    rows, bins = [], {}
    for (dataset, model, reg), cfg in calibration_configs(s):
        data = _data.load(dataset)
        t0 = time.perf_counter()
        scores = _calibration.evaluate(_train.Net(cfg), run.state(dataset, cfg, s.seeds),
                                       data.x_test, data.y_test, s.mc_samples,
                                       s.calibration_bins)
        methods = [_calibration.DETERMINISTIC] + [_calibration.method_name(k)
                                                  for k in s.mc_samples]
        for method, k in zip(methods, [0, *s.mc_samples], strict=True):
            r = scores[method]
            rows.append({"dataset": dataset, "model": model, "config": reg,
                         "dropout": cfg.dropout, "batch_norm": cfg.batch_norm,
                         "prediction": method, "k": k, "seeds": s.seeds, "steps": s.steps,
                         "bins": s.calibration_bins,
                         **{f"{m}_{f}": float(getattr(np, f)(r[m]))
                            for m in ("accuracy", "ece", "nll") for f in ("mean", "std")}})
        bins["/".join((dataset, model, reg))] = {
            m: {k: v.tolist() for k, v in scores[m]["reliability"].items()} for m in methods}
        line = (f"[{time.perf_counter() - t0:6.1f}s] calibration {dataset} {model} {reg}: ECE "
                + ", ".join(f"{m} {scores[m]['ece'].mean():.4f}" for m in methods))
        if run._bar is not None and not run._bar.disable:
            run._bar.write(line)
        else:
            print(line, flush=True)
    return rows, bins


def _prediction_label(method: str) -> str:
    return method if method == _calibration.DETERMINISTIC else f"MC dropout, K = {method[2:]}"


def calibration_markdown(rows: list[dict], heading: str = "##") -> str:
    if not rows:
        return ""
    r0 = rows[0]
    text = (f"{heading} Calibration ({r0['dataset']}, {int(r0['seeds'])} seeds)\n\n"
            f"Test set; mean ± std over seeds. ECE: expected calibration error with "
            f"{int(r0['bins'])} equal-width confidence bins; NLL: negative log-likelihood of "
            f"the true label (nats). \"deterministic\" is the network in eval mode; MC "
            f"dropout averages the softmax of K passes with dropout on and BatchNorm on "
            f"its running statistics (dropnorm.mc_dropout).\n\n")
    return text + _md_table(
        ["model", "config", "prediction", "test accuracy", "ECE", "NLL"],
        [[r["model"], r["config"], _prediction_label(r["prediction"]),
          _pm(r["accuracy_mean"], r["accuracy_std"]), _pm(r["ece_mean"], r["ece_std"], 4),
          _pm(r["nll_mean"], r["nll_std"])] for r in rows])


def write_calibration(out: str, rows: list[dict], bins: dict, wall: float | None = None,
                      command: str | None = None) -> dict:
    """Writes calibration.csv, .json and .md; returns what reliability.png is drawn from."""
    _write_csv(os.path.join(out, "calibration.csv"), rows)
    cal = {"bins": int(rows[0]["bins"]), "seeds": int(rows[0]["seeds"]),
           "dataset": rows[0]["dataset"], "reliability": bins}
    with open(os.path.join(out, "calibration.json"), "w") as f:
        json.dump(cal, f)
    text = "# " + calibration_markdown(rows, "").lstrip()
    if wall is not None:
        text += (f"\n\nCommand: `{command}`; {int(rows[0]['steps'])} training steps; wall "
                 f"time {wall:.0f} s ({wall / 60:.1f} min), training included, "
                 f"{time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())}; machine: {machine()}.")
    with open(os.path.join(out, "calibration.md"), "w") as f:
        f.write(text + "\n")
    return cal


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
    from matplotlib.lines import Line2D

    panels = list(dict.fromkeys((d, m) for d, m, _ in results))
    fig, axes = plt.subplots(1, len(panels), figsize=(4.2 * len(panels), 3.9), squeeze=False)
    n_seeds = next(iter(results.values()))["test_acc"].shape[1]
    for ax, (dataset, model) in zip(axes[0], panels, strict=True):
        for reg in REGULARISERS:
            h = results.get((dataset, model, reg))
            if h is None:
                continue
            steps, test, train = h["step"], h["test_acc"], h["train_acc"]
            m, sd = test.mean(1), test.std(1)
            ax.plot(steps, m, color=COLOURS[reg], label=reg)
            ax.fill_between(steps, m - sd, m + sd, color=COLOURS[reg], alpha=0.2)
            ax.plot(steps, train.mean(1), color=COLOURS[reg], ls="--", lw=0.9)
        lo = min(results[dataset, model, r]["test_acc"][1:].min() for r in REGULARISERS
                 if (dataset, model, r) in results)
        ax.set_ylim(max(0.0, lo - 0.05), 1.0)
        ax.set_title(f"{dataset} / {model}", fontsize=10)
        ax.set_xlabel("training step")
        ax.set_ylabel("accuracy (eval mode)")
        ax.grid(alpha=0.3)
    handles, _ = axes[0, 0].get_legend_handles_labels()
    handles += [Line2D([], [], color="k", label="test (mean ± std)"),
                Line2D([], [], color="k", ls="--", lw=0.9, label="train (mean)")]
    axes[0, 0].legend(handles=handles, fontsize=7, loc="lower right")
    fig.suptitle(f"Learning curves: accuracy over training ({n_seeds} seeds)", fontsize=11)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def plot_gap(rows: list[dict], path: str) -> None:
    plt = _plt()
    panels = list(dict.fromkeys((r["dataset"], r["model"]) for r in rows))
    fig, ax = plt.subplots(figsize=(max(5.0, 2.2 * len(panels)), 3.8))
    width = 0.8 / len(REGULARISERS)
    for j, reg in enumerate(REGULARISERS):
        sel = [next((r for r in rows if (r["dataset"], r["model"]) == p and r["config"] == reg),
                    None) for p in panels]
        xs = [i + (j - 1.5) * width for i, r in enumerate(sel) if r is not None]
        ax.bar(xs, [r["gap_mean"] for r in sel if r is not None], width,
               yerr=[r["gap_std"] for r in sel if r is not None], color=COLOURS[reg],
               label=reg, capsize=2)
    ax.set_xticks(range(len(panels)), [f"{d}\n{m}" for d, m in panels])
    ax.set_xlabel("data set and model")
    ax.set_ylabel("train - test accuracy (final)")
    ax.set_title("Generalisation gap (mean ± std over seeds)", fontsize=11)
    ax.legend(fontsize=8, title="regulariser", title_fontsize=8)
    ax.grid(axis="y", alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def plot_preactivations(results: dict, path: str) -> bool | None:
    plt = _plt()
    keys = [(d, m) for d, m, r in results if r == "none" and (d, m, "batchnorm") in results]
    keys = [k for k in keys if k[0] == keys[0][0]] if keys else []
    keys = [k for k in keys if "preact_pct" in results[(*k, "none")]]
    if not keys:
        print(f"study.py: no pre-activation percentiles saved; {path} not drawn")
        return False
    fig, axes = plt.subplots(len(keys), 2, figsize=(8.5, 2.8 * len(keys) + 0.4),
                             squeeze=False)
    for row, (dataset, model) in zip(axes, keys, strict=True):
        for ax, reg in zip(row, ("none", "batchnorm"), strict=True):
            h = results[dataset, model, reg]
            pct = h["preact_pct"][:, 0, :]  # seed 0: (evals, 3)
            for k, (q, ls) in enumerate(zip((15, 50, 85), ("--", "-", ":"), strict=True)):
                ax.plot(h["step"], pct[:, k], ls=ls, color="k", label=f"{q}th percentile")
            ax.set_title(f"{dataset} / {model}: " +
                         ("with BatchNorm" if reg == "batchnorm" else "without BatchNorm"),
                         fontsize=9)
            ax.set_xlabel("training step")
            ax.set_ylabel("input to a ReLU")
            ax.grid(alpha=0.3)
    axes[0, 0].legend(fontsize=7, loc="best")
    fig.suptitle("One unit's input to its nonlinearity over training (test set, seed 0)",
                 fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def plot_sweeps(rows: list[dict], path: str) -> None:
    plt = _plt()
    from matplotlib.ticker import FixedLocator, NullFormatter, NullLocator

    fig, axes = plt.subplots(1, 2, figsize=(9, 3.8))
    for ax, sweep, label, title in zip(
            axes, ("dropout_rate", "bn_momentum"),
            ("dropout rate (no BatchNorm)", "BatchNorm momentum (no dropout)"),
            ("Dropout rate", "BatchNorm momentum"), strict=True):
        values = []
        for model in dict.fromkeys(r["model"] for r in rows):
            sel = [r for r in rows if r["sweep"] == sweep and r["model"] == model]
            if not sel:
                continue
            values += [r["value"] for r in sel]
            ax.errorbar([r["value"] for r in sel], [r["test_acc_mean"] for r in sel],
                        yerr=[r["test_acc_std"] for r in sel], marker="o", capsize=3,
                        label=model)
        if sweep == "bn_momentum" and values:
            # Momenta 0.5 ... 0.999 are spread evenly on a logit axis; ticks at the swept
            # values, all written the same way (no mixed 1/2 and 1-10^-k labels).
            ax.set_xscale("logit")
            ticks = sorted(set(values))
            ax.xaxis.set_major_locator(FixedLocator(ticks))
            ax.set_xticklabels([f"{v:g}" for v in ticks])
            ax.xaxis.set_minor_locator(NullLocator())
            ax.xaxis.set_minor_formatter(NullFormatter())
            lo, hi = min(ticks), max(ticks)
            ax.set_xlim(lo - (1 - lo) * 0.3 if lo > 0.5 else lo * 0.85, 1 - (1 - hi) * 0.6)
        ax.set_title(title, fontsize=10)
        ax.set_xlabel(label)
        ax.set_ylabel("final test accuracy")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8, title="model", title_fontsize=8)
    n = {r.get("seeds") for r in rows} - {None}
    fig.suptitle("Sweeps on " + (rows[0].get("dataset", "") if rows else "") +
                 ": final test accuracy, mean ± std over seeds" +
                 (f" ({n.pop()} seeds)" if len(n) == 1 else ""), fontsize=11)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def plot_variance_shift(rows: list[dict], path: str) -> None:
    plt = _plt()
    fig, axes = plt.subplots(1, 2, figsize=(9, 3.8))
    rates = sorted({r["rate"] for r in rows})
    # Each series is shifted sideways by a little, so that error bars at the same rate do
    # not hide each other.
    series = [(m, p) for m in dict.fromkeys(r["model"] for r in rows)
              for p in ("before_bn", "last")]
    step = (min(np.diff(rates)) if len(rates) > 1 else 0.2) * 0.06
    for i, (model, placement) in enumerate(series):
        sel = [r for r in rows if r["model"] == model and r["placement"] == placement]
        if not sel:
            continue
        dx = (i - (len(series) - 1) / 2) * step
        xs = [r["rate"] + dx for r in sel]
        ls = "-" if placement == "before_bn" else "--"
        label = f"{model}, dropout {'before BatchNorm' if placement == 'before_bn' else 'last'}"
        axes[0].errorbar(xs, [r["var_ratio_mean"] for r in sel],
                         yerr=[r["var_ratio_std"] for r in sel], marker="o", ls=ls,
                         capsize=3, label=label)
        axes[1].errorbar(xs, [r["test_acc_mean"] for r in sel],
                         yerr=[r["test_acc_std"] for r in sel], marker="o", ls=ls,
                         capsize=3, label=label)
    axes[0].axhline(1.0, color="k", lw=0.8)
    axes[0].set_ylabel("running var / actual var at eval")
    axes[0].set_title("Variance shift (1 = none)", fontsize=10)
    axes[1].set_ylabel("final test accuracy")
    axes[1].set_title("Test accuracy", fontsize=10)
    for ax in axes:
        ax.set_xticks(rates, [f"{r:g}" for r in rates])
        ax.set_xlabel("dropout rate")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7)
    fig.suptitle("Variance shift at the last BatchNorm (Li et al. 2019), mean ± std over seeds",
                 fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def plot_reliability(cal: dict, path: str) -> bool | None:
    """Accuracy against mean confidence per bin (bins pooled over seeds), for the
    deterministic network and MC dropout with the largest K, one panel per configuration."""
    plt = _plt()
    panels = cal.get("reliability", {})
    if not panels:
        print(f"study.py: no calibration bins saved; {path} not drawn")
        return False
    fig, axes = plt.subplots(1, len(panels), figsize=(3.6 * len(panels) + 0.6, 3.9),
                             squeeze=False)
    for ax, (name, methods) in zip(axes[0], panels.items(), strict=True):
        mc = [m for m in methods if m != _calibration.DETERMINISTIC]
        largest = max(mc, key=lambda m: int(m[2:])) if mc else None
        ax.plot([0, 1], [0, 1], ls=":", color="k", lw=0.8, label="perfectly calibrated")
        for method, colour in ((_calibration.DETERMINISTIC, "tab:gray"),
                               (largest, "tab:blue")):
            if method is None:
                continue
            r = {k: np.asarray(v, float) for k, v in methods[method].items()}
            used = r["count"] > 0
            ax.plot(r["confidence"][used] / r["count"][used],
                    r["correct"][used] / r["count"][used], marker="o", ms=3.5,
                    color=colour, label=_prediction_label(method))
        _, model, config = name.split("/")
        ax.set_title(f"{model}, {config}", fontsize=10)
        ax.set_xlabel("confidence (mean per bin)")
        ax.set_ylabel("accuracy (per bin)")
        ax.set_xlim(0, 1)
        ax.set_ylim(0, 1.02)
        ax.grid(alpha=0.3)
    axes[0, 0].legend(fontsize=7, loc="upper left")
    fig.suptitle(f"Reliability on the {cal.get('dataset', '')} test set ({cal.get('bins')} "
                 f"confidence bins, {cal.get('seeds')} seeds pooled): below the diagonal is "
                 f"overconfident", fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


# -- report ------------------------------------------------------------------------------------
def _pm(m, s, digits=3):
    return "n/a" if np.isnan(m) else f"{m:.{digits}f} ± {s:.{digits}f}"


def write_markdown(s, path, rows, sweep_rows, shift_rows, wall, cal_rows=()) -> None:
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
    if cal_rows:
        parts.append("\n" + calibration_markdown(list(cal_rows)))
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


def _read_csv(path: str) -> list[dict]:
    """Rows of a CSV the study wrote, numbers as floats and booleans as bools."""
    def value(v: str):
        if v in ("True", "False"):
            return v == "True"
        try:
            return float(v)
        except ValueError:
            return v

    with open(path, newline="") as f:
        return [{k: value(v) for k, v in row.items()} for row in csv.DictReader(f)]


def _save_curves(path: str, results: dict) -> None:
    with open(path, "w") as f:
        json.dump({"/".join(k): {"step": h["step"].tolist(),
                                 "test_acc": h["test_acc"].tolist(),
                                 "train_acc": h["train_acc"].tolist(),
                                 # seed 0 only: what plot_preactivations draws
                                 "preact_pct_seed0": h["preact_pct"][:, 0, :].tolist()}
                   for k, h in results.items()}, f)


def _load_curves(path: str) -> dict:
    with open(path) as f:
        raw = json.load(f)
    out = {}
    for key, h in raw.items():
        hist = {"step": np.asarray(h["step"]), "test_acc": np.asarray(h["test_acc"]),
                "train_acc": np.asarray(h["train_acc"])}
        if "preact_pct_seed0" in h:  # saved by runs since --replot exists
            hist["preact_pct"] = np.asarray(h["preact_pct_seed0"])[:, None, :]
        out[tuple(key.split("/"))] = hist
    return out


def plot_all(out: str, results: dict, rows: list[dict], sweep_rows: list[dict],
             shift_rows: list[dict], cal: dict | None = None) -> list[str]:
    """Draws every plot into ``out``; returns the paths written."""
    written = []

    def draw(fn, data, name):
        path = os.path.join(out, name)
        if fn(data, path) is not False:  # False: nothing to draw (an older run's data)
            written.append(path)

    if sweep_rows:
        draw(plot_sweeps, sweep_rows, "sweeps.png")
    if shift_rows:
        draw(plot_variance_shift, shift_rows, "variance_shift.png")
    draw(plot_learning_curves, results, "learning_curves.png")
    draw(plot_gap, rows, "generalisation_gap.png")
    draw(plot_preactivations, results, "preactivations.png")
    if cal:
        draw(plot_reliability, cal, "reliability.png")
    return written


def replot(directory: str) -> list[str]:
    """Redraws the plots of a finished run from its tables and curves (no training)."""
    def rows_of(name):
        path = os.path.join(directory, name)
        return _read_csv(path) if os.path.exists(path) else []

    cal_path = os.path.join(directory, "calibration.json")
    cal = None
    if os.path.exists(cal_path):
        with open(cal_path) as f:
            cal = json.load(f)
    curves = os.path.join(directory, "curves.json")
    if not os.path.exists(curves):  # a --calibration-only run: its one plot
        written = []
        if cal is not None:
            path = os.path.join(directory, "reliability.png")
            if plot_reliability(cal, path) is not False:
                written.append(path)
    else:
        written = plot_all(directory, _load_curves(curves), rows_of("results.csv"),
                           rows_of("sweeps.csv"), rows_of("variance_shift.csv"), cal)
    for path in written:
        print(f"wrote {path}")
    return written


def main(argv: list[str] | None = None) -> dict:
    args = parser().parse_args(argv)
    if args.replot is not None:
        return {"plots": replot(args.replot)}
    if args.out is None:
        parser().error("--out DIR is required (or --replot DIR to redraw a run's plots)")
    s = _settings(args)
    os.makedirs(s.out, exist_ok=True)
    command = "python examples/study.py " + " ".join(argv if argv is not None else sys.argv[1:])
    t0 = time.perf_counter()
    run = Runner(s.steps, s.eval_every, progress=not s.no_progress)
    n_configs = run.plan(jobs(s))
    cal_rows, cal_bins = [], {}
    try:
        if not s.calibration_only:
            results = grid(s, run)
            rows = grid_rows(s, results)
            sweep_rows, shift_rows = ([], []) if s.no_sweeps else sweeps(s, run)
        if not s.no_calibration:
            cal_rows, cal_bins = calibration(s, run)
    finally:
        run.close()
    wall = time.perf_counter() - t0
    if s.calibration_only:
        cal = write_calibration(s.out, cal_rows, cal_bins, wall, command)
        plot_reliability(cal, os.path.join(s.out, "reliability.png"))
        with open(os.path.join(s.out, "calibration.md")) as f:
            print(f.read())
        print(f"wrote {s.out}/ in {wall:.0f} s ({n_configs} configurations)")
        return {"calibration": cal_rows, "wall": wall, "configurations": n_configs,
                "log": run.log}
    with open(os.path.join(s.out, "histories.pkl"), "wb") as f:  # everything, unplotted
        pickle.dump({"settings": vars(s), "grid": results, "sweeps": sweep_rows,
                     "shift": shift_rows, "calibration": cal_rows, "log": run.log,
                     "wall": wall}, f)

    _write_csv(os.path.join(s.out, "results.csv"), rows)
    if sweep_rows:
        _write_csv(os.path.join(s.out, "sweeps.csv"), sweep_rows)
    if shift_rows:
        _write_csv(os.path.join(s.out, "variance_shift.csv"), shift_rows)
    _save_curves(os.path.join(s.out, "curves.json"), results)
    cal = write_calibration(s.out, cal_rows, cal_bins) if cal_rows else None
    write_markdown(s, os.path.join(s.out, "results.md"), rows, sweep_rows, shift_rows, wall,
                   cal_rows)
    plot_all(s.out, results, rows, sweep_rows, shift_rows, cal)
    with open(os.path.join(s.out, "timing.md"), "w") as f:
        f.write(f"# Timing\n\nCommand: `{command}`\n\nWall time: {wall:.0f} s "
                f"({wall / 60:.1f} min), {time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())}"
                f"\n\nMachine: {machine()}\n\n{n_configs} configurations trained (one "
                f"compilation each). Per configuration (seconds, compile included):\n\n")
        f.write(_md_table(["data set", "model", "dropout", "bn", "momentum", "placement",
                           "seeds", "s"],
                          [[r["dataset"], r["model"], f"{r['dropout']:g}", str(r["batch_norm"]),
                            f"{r['momentum']:g}", r["placement"], str(r["seeds"]),
                            f"{r['seconds']:.1f}"] for r in run.log]) + "\n")
    with open(os.path.join(s.out, "results.md")) as f:
        print(f.read())
    print(f"wrote {s.out}/ in {wall:.0f} s ({n_configs} configurations)")
    return {"rows": rows, "sweeps": sweep_rows, "shift": shift_rows, "calibration": cal_rows,
            "wall": wall, "configurations": n_configs, "log": run.log}


if __name__ == "__main__":
    main()
