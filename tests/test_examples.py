"""Fast checks of the examples: data, training loop, checkpoint/resume, CLIs, the study's outputs.

Small step counts only; the accuracy claims themselves are checked by running the scripts
(see docs/results/).
"""

from __future__ import annotations

import importlib.util
import os
import re
import sys

import jax
import numpy as np
import pytest

EXAMPLES = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "examples")
sys.path.insert(0, EXAMPLES)

import _calibration  # noqa: E402
import _data  # noqa: E402
import _train  # noqa: E402


def _load_script(name: str):
    # Loaded under another module name: ``mnist1d`` is also the data package's name.
    spec = importlib.util.spec_from_file_location(f"examples_{name}",
                                                  os.path.join(EXAMPLES, f"{name}.py"))
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


cli = _load_script("mnist1d")
study = _load_script("study")


def _tree_equal(a, b) -> bool:
    la, lb = jax.tree.leaves(a), jax.tree.leaves(b)
    return (jax.tree.structure(a) == jax.tree.structure(b)
            and all(np.array_equal(np.asarray(x), np.asarray(y))
                    for x, y in zip(la, lb, strict=True)))


def test_data_sets_are_local_deterministic_and_sized():
    d = _data.load("mnist1d")
    assert d.x.shape == (4000, 40) and d.x_test.shape == (1000, 40)
    assert d.y.shape == (4000,) and set(np.unique(d.y)) == set(range(10))
    state = np.random.get_state()[1].copy()
    again = _data.load.__wrapped__("mnist1d")  # regenerate, bypassing the cache
    assert np.array_equal(again.x, d.x) and np.array_equal(again.y_test, d.y_test)
    assert np.array_equal(np.random.get_state()[1], state)  # NumPy's global RNG untouched
    g = _data.load("digits")
    assert g.x.shape == (1347, 64) and g.x_test.shape == (450, 64)
    # Standardised with training statistics: mean 0, std 1 on the training set (float32).
    assert abs(float(g.x.mean())) < 1e-5 and abs(float(g.x.std()) - 1) < 1e-5
    with pytest.raises(ValueError, match="name='mnist'"):
        _data.load("mnist")


@pytest.mark.parametrize("model", ["mlp", "cnn"])
def test_loss_falls_in_a_few_steps(model):
    d = _data.load("mnist1d")
    cfg = _train.Config(model=model, dropout=0.1, batch_norm=True, steps=30)
    trainer = _train.Trainer(cfg, d.x[:500], d.y[:500], d.x_test[:200], d.y_test[:200])
    _, hist = _train.run(trainer, [0, 1], steps=30, eval_every=15)
    assert list(hist["step"]) == [0, 15, 30]
    loss = hist["train_loss"]  # (evals, seeds), eval mode, whole (sub)training set
    # Untrained: about log(10) = 2.30; 30 Adam steps at lr 1e-2 take it well below 2.
    assert np.all(loss[0] > 2.0) and np.all(loss[-1] < loss[0] - 0.3), loss
    assert np.all(hist["train_acc"][-1] > 0.25)  # chance is 0.1


def test_seeds_differ_and_a_seed_is_reproducible():
    d = _data.load("mnist1d")
    cfg = _train.Config(model="mlp", steps=10)
    trainer = _train.Trainer(cfg, d.x[:300], d.y[:300], d.x_test[:100], d.y_test[:100])
    both, _ = _train.run(trainer, [0, 1], steps=10, eval_every=10)
    again, _ = _train.run(trainer, [0, 1], steps=10, eval_every=10)
    assert _tree_equal(both, again)
    w = both.params["Dense_0"]["kernel"]
    assert not np.array_equal(np.asarray(w[0]), np.asarray(w[1]))


def test_checkpoint_resume_equals_uninterrupted(tmp_path):
    common = ["--model", "mlp", "--steps", "30", "--eval-every", "10", "--no-progress"]
    a, b = str(tmp_path / "a"), str(tmp_path / "b")
    first = cli.main(common + ["--out", a, "--stop-at", "20"])
    assert first["step"] == 20 and int(first["state"].step[0]) == 20
    resumed = cli.main(common + ["--out", a, "--resume"])
    straight = cli.main(common + ["--out", b])
    assert resumed["step"] == straight["step"] == 30
    # Same params, BatchNorm statistics, optimiser state and step, bit for bit.
    assert _tree_equal(resumed["state"], straight["state"])
    assert resumed["test_accuracy"] == straight["test_accuracy"]
    # What is on disk is that state too.
    fresh = _train.Trainer(cli.config_from(cli.parser().parse_args(common)),
                           *_data.load("mnist1d")[1:]).init([0])
    on_disk = _train.load_checkpoint(a, fresh)
    assert _tree_equal(on_disk, straight["state"])
    assert set(on_disk.batch_stats) == {"BatchNorm_0", "BatchNorm_1"}
    # The metrics file holds the whole history across the interruption.
    import json

    with open(os.path.join(a, "metrics.json")) as f:
        steps = [h["step"] for h in json.load(f)["history"]]
    assert steps == [0, 10, 20, 30]


def test_resume_without_checkpoint_is_a_clear_error(tmp_path):
    with pytest.raises(FileNotFoundError, match="no checkpoint"):
        cli.main(["--steps", "10", "--out", str(tmp_path), "--resume", "--no-progress"])


def test_cli_parses():
    args = cli.parser().parse_args(
        ["--model", "mlp", "--dropout", "0.3", "--no-batch-norm", "--steps", "50",
         "--batch-size", "32", "--lr", "0.003", "--seed", "4", "--out", "x", "--resume",
         "--dataset", "digits"])
    cfg = cli.config_from(args)
    assert (cfg.model, cfg.dropout, cfg.batch_norm, cfg.steps, cfg.batch_size, cfg.lr) == (
        "mlp", 0.3, False, 50, 32, 0.003)
    assert (args.seed, args.out, args.resume, args.dataset) == (4, "x", True, "digits")
    defaults = cli.parser().parse_args([])
    assert defaults.batch_norm is True and defaults.steps == 3000 and defaults.model == "cnn"
    with pytest.raises(SystemExit):
        cli.parser().parse_args(["--model", "resnet"])
    with pytest.raises(ValueError, match="dropout=1.5"):
        _train.Config(dropout=1.5)
    s = study._settings(study.parser().parse_args(["--quick", "--out", "o"]))
    assert s.datasets == ["mnist1d"] and s.seeds >= 2 and s.steps <= 1000
    full = study._settings(study.parser().parse_args(["--out", "o"]))
    assert full.datasets == ["mnist1d", "digits"] and full.seeds >= 5


def test_steps_to_threshold():
    steps = np.array([0, 10, 20])
    curve = np.array([[0.1, 0.1], [0.95, 0.5], [0.99, 0.8]])
    out = _train.steps_to(steps, curve, 0.9)
    assert out[0] == 10 and np.isnan(out[1])


PNGS = ("learning_curves.png", "generalisation_gap.png", "preactivations.png", "sweeps.png",
        "variance_shift.png")
CALIBRATION_PNG = "reliability.png"


@pytest.fixture
def saved_figures(monkeypatch):
    """Every matplotlib figure saved while the fixture is active, by file name."""
    from matplotlib.figure import Figure

    saved, original = {}, Figure.savefig

    def savefig(fig, path, *args, **kwargs):
        saved[os.path.basename(str(path))] = fig
        return original(fig, path, *args, **kwargs)

    monkeypatch.setattr(Figure, "savefig", savefig)
    return saved


def _check_figure(name, fig):
    """A title, labelled axes and a legend, and every panel shows at least two x positions."""
    suptitle = fig._suptitle.get_text() if fig._suptitle is not None else ""
    axes = fig.get_axes()
    assert axes, name
    assert any(ax.get_legend() is not None for ax in axes), f"{name}: no legend"
    for ax in axes:
        assert suptitle or ax.get_title(), f"{name}: no title"
        assert ax.get_xlabel() and ax.get_ylabel(), f"{name}: unlabelled axis in {ax.get_title()}"
        xs = set()
        for line in ax.get_lines():
            xs |= {float(x) for x in np.asarray(line.get_xdata(), float).ravel()}
        for patch in ax.patches:  # bars
            xs.add(round(float(patch.get_x()), 6))
        assert len(xs) >= 2, f"{name}, {ax.get_title()}: nothing to compare ({sorted(xs)})"


def test_study_trains_each_configuration_once_and_replots(tmp_path, saved_figures):
    out = tmp_path / "quick"
    # Tiny version of --quick: grid 4 + sweeps 2 + 2 + 4 asked for; rate 0 is the grid's
    # "none", rate 0.2 its "dropout", momentum 0.9 its "batchnorm": 9 trained.
    res = study.main(["--quick", "--out", str(out), "--models", "mlp", "--seeds", "1",
                      "--sweep-seeds", "1", "--steps", "20", "--eval-every", "10",
                      "--rates", "0,0.2", "--momenta", "0.5,0.9", "--shift-rates", "0.1,0.5",
                      "--no-progress"])
    assert res["configurations"] == 9 and len(res["log"]) == 9
    grid = {r["config"]: r for r in res["rows"]}
    sweep = {(r["sweep"], r["value"]): r for r in res["sweeps"]}
    assert sweep["dropout_rate", 0.0]["test_acc_mean"] == grid["none"]["test_acc_mean"]
    assert sweep["dropout_rate", 0.2]["test_acc_mean"] == grid["dropout"]["test_acc_mean"]
    assert sweep["bn_momentum", 0.9]["test_acc_mean"] == grid["batchnorm"]["test_acc_mean"]
    assert len(res["shift"]) == 4
    md = (out / "results.md").read_text()
    for reg in study.REGULARISERS:
        assert f"| mnist1d | mlp | {reg} |" in md
    csv_lines = (out / "results.csv").read_text().splitlines()
    assert csv_lines[0].startswith("dataset,model,config") and len(csv_lines) == 5
    assert "9 configurations trained" in (out / "timing.md").read_text()
    # The calibration table: the two configurations with dropout, deterministic and K = 1,
    # 8, 32, in calibration.csv and in results.md; no configuration trained for it alone.
    cal = res["calibration"]
    assert [(r["config"], r["prediction"]) for r in cal] == [
        (c, p) for c in ("dropout", "both") for p in ("deterministic", "mc1", "mc8", "mc32")]
    assert "| mlp | both | MC dropout, K = 32 |" in md
    assert len((out / "calibration.csv").read_text().splitlines()) == 9
    figures = set(PNGS) | {CALIBRATION_PNG}
    assert set(saved_figures) == figures
    for name, fig in saved_figures.items():
        assert (out / name).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
        _check_figure(name, fig)
    # --replot redraws every plot from the saved tables and curves alone.
    for name in figures:
        (out / name).unlink()
    saved_figures.clear()
    written = study.main(["--replot", str(out)])["plots"]
    assert sorted(os.path.basename(p) for p in written) == sorted(figures)
    assert set(saved_figures) == figures and all((out / n).exists() for n in figures)
    for name, fig in saved_figures.items():
        _check_figure(name, fig)


def test_committed_results_replot(tmp_path, saved_figures):
    # docs/results holds a full run's tables; its plots redraw from them (the pre-activation
    # plot needs percentiles that this older run did not save, so it is left as it is).
    import shutil

    src = os.path.join(os.path.dirname(EXAMPLES), "docs", "results")
    for name in ("results.csv", "sweeps.csv", "variance_shift.csv", "curves.json"):
        shutil.copy(os.path.join(src, name), tmp_path / name)
    written = study.main(["--replot", str(tmp_path)])["plots"]
    assert sorted(os.path.basename(p) for p in written) == sorted(set(PNGS) -
                                                                  {"preactivations.png"})
    for name, fig in saved_figures.items():
        _check_figure(name, fig)
    # The momentum axis is labelled with the swept values, all in one style.
    ax = saved_figures["sweeps.png"].get_axes()[1]
    assert [t.get_text() for t in ax.get_xticklabels()] == ["0.5", "0.9", "0.99", "0.999"]


def test_sweep_and_variance_shift_plots(tmp_path, saved_figures):
    sweep = [{"model": "mlp", "sweep": s, "value": v, "test_acc_mean": 0.7,
              "test_acc_std": 0.01, "gap_mean": 0.1}
             for s, v in [("dropout_rate", 0.0), ("dropout_rate", 0.5),
                          ("bn_momentum", 0.9), ("bn_momentum", 0.99)]]
    shift = [{"model": "mlp", "placement": p, "rate": r, "var_ratio_mean": 1.1,
              "var_ratio_std": 0.05, "test_acc_mean": 0.7, "test_acc_std": 0.01}
             for p in ("before_bn", "last") for r in (0.1, 0.5)]
    study.plot_sweeps(sweep, str(tmp_path / "s.png"))
    study.plot_variance_shift(shift, str(tmp_path / "v.png"))
    assert (tmp_path / "s.png").read_bytes()[:4] == b"\x89PNG"
    assert (tmp_path / "v.png").read_bytes()[:4] == b"\x89PNG"
    _check_figure("s.png", saved_figures["s.png"])
    _check_figure("v.png", saved_figures["v.png"])
    # The two placements are drawn side by side at each rate, not on top of each other.
    lines = [c.lines[0] for c in saved_figures["v.png"].get_axes()[0].containers]  # errorbars
    xs = [np.asarray(ln.get_xdata(), float) for ln in lines]
    assert len(xs) == 2 and np.all(np.abs(xs[0] - xs[1]) > 0.005), xs


def test_mnist1d_help_shows_defaults():
    text = re.sub(r"\n {10,}", " ", cli.parser().format_help())  # unwrap continued lines
    for flag, default in [("--steps", "3000"), ("--dropout", "0.1"), ("--model", "cnn"),
                          ("--eval-every", "250"), ("--lr", "0.01"), ("--batch-size", "100")]:
        # The default is in the flag's own entry (before the next option's line).
        entry = rf"\n  {flag}\b(?:(?!\n  -).)*?\(default: {re.escape(default)}\)"
        assert re.search(entry, text, re.S), flag
    study_help = study.parser().format_help()
    assert "(default 8; --quick: 2)" in study_help  # --seeds


def test_variance_shift_is_measured_where_dropout_feeds_batchnorm():
    # Measured quantity only (its size is the study's result): with BatchNorm a ratio of
    # running to actual variance is reported per seed, positive and finite; without, none.
    d = _data.load("mnist1d")
    for placement in ("before_bn", "last"):
        cfg = _train.Config(model="mlp", dropout=0.5, placement=placement, steps=20)
        trainer = _train.Trainer(cfg, d.x[:300], d.y[:300], d.x_test[:100], d.y_test[:100])
        _, hist = _train.run(trainer, [0], steps=20, eval_every=20)
        assert hist["var_ratio"].shape == (2, 1) and np.all(np.isfinite(hist["var_ratio"]))
        assert np.all(hist["var_ratio"] > 0)
    trainer = _train.Trainer(_train.Config(batch_norm=False, steps=5), d.x[:300], d.y[:300],
                             d.x_test[:100], d.y_test[:100])
    assert "var_ratio" not in trainer.evaluate(trainer.init([0]))


def test_swa_example_recomputes_the_statistics_of_the_averaged_weights(capsys):
    swa = _load_script("swa_precise_bn")
    res = swa.main(["--quick"])
    out = capsys.readouterr().out
    assert "| SWA | recomputed |" in out and "swa_recomputed_accuracy=" in out
    assert [(r["weights"], r["statistics"]) for r in res["rows"]] == list(swa.ROWS)
    assert res["snapshots"] == 2 and all(0.2 < r["mean"] <= 1.0 for r in res["rows"])
    # The recomputed statistics of the first BatchNorm are the float64 population statistics
    # of its inputs under the averaged weights, over the whole (quick) training set; float32
    # forward of values of order 1-10: 1e-5 is ~100 ulps.
    params = jax.tree.map(lambda a: a[0], res["swa_params"])
    stats = jax.tree.map(lambda a: a[0], res["swa_stats"])
    _, inter = res["trainer"].model.apply({"params": params, "batch_stats": stats}, res["x"],
                                          train=False, mutable=["intermediates"])
    h = np.asarray(inter["intermediates"]["bn_in0"][0], np.float64)
    np.testing.assert_allclose(np.asarray(stats["BatchNorm_0"]["mean"]), h.mean(0),
                               rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(np.asarray(stats["BatchNorm_0"]["var"]), h.var(0), rtol=1e-5)


def test_calibration_metrics_against_hand_computed_values():
    # Four examples, 2 classes, 2 bins: (0, 0.5] and (0.5, 1]. Confidences 0.5, 0.6, 0.9,
    # 0.95 with correctness 1, 0, 1, 1: bin 0 holds 0.5 (acc 1, conf 0.5), bin 1 the rest
    # (acc 2/3, conf 0.8167): ECE = 1/4 * 0.5 + 3/4 * |2/3 - 0.81667| = 0.2375.
    probs = np.array([[0.5, 0.5], [0.4, 0.6], [0.9, 0.1], [0.05, 0.95]])
    labels = np.array([0, 0, 0, 1])
    assert list(_calibration.bin_index(probs.max(1), 2)) == [0, 1, 1, 1]
    assert abs(_calibration.ece(probs, labels, 2) - 0.2375) < 1e-12
    expected_nll = -np.mean(np.log([0.5, 0.4, 0.9, 0.95]))
    assert abs(_calibration.nll(np.log(probs), labels) - expected_nll) < 1e-12
    r = _calibration.reliability(probs, labels, 2)
    assert r["count"].tolist() == [1, 3] and r["correct"].tolist() == [1, 2]
    # A true class of probability 0 is an infinite NLL, not a clipped one.
    with np.errstate(divide="ignore"):
        assert _calibration.nll(np.log(np.array([[1.0, 0.0]])), np.array([1])) == np.inf


def test_calibration_only_trains_only_what_it_needs(tmp_path, saved_figures, monkeypatch):
    s = study._settings(study.parser().parse_args(["--calibration-only", "--out", "o"]))
    assert [(d, c.model, c.dropout, c.batch_norm, n) for d, c, n in study.jobs(s)] == [
        ("mnist1d", m, 0.2, bn, 8) for m in ("mlp", "cnn") for bn in (False, True)]
    # The run itself on the first of them only (one training compiled: the test's run time).
    configs = study.calibration_configs
    monkeypatch.setattr(study, "calibration_configs", lambda s: configs(s)[:1])
    out = tmp_path / "cal"
    res = study.main(["--calibration-only", "--out", str(out), "--models", "mlp", "--seeds",
                      "2", "--steps", "10", "--eval-every", "10", "--mc-samples", "1",
                      "--no-progress"])
    assert res["configurations"] == 1
    assert sorted(p.name for p in out.iterdir()) == [
        "calibration.csv", "calibration.json", "calibration.md", CALIBRATION_PNG]
    rows = res["calibration"]
    assert [(r["config"], r["prediction"]) for r in rows] == [("dropout", "deterministic"),
                                                              ("dropout", "mc1")]
    for r in rows:
        assert 0 <= r["ece_mean"] <= 1 and 0 < r["nll_mean"] < 10 and r["seeds"] == 2
    # K = 1 is one dropout pass: a different prediction from the deterministic network's.
    assert rows[1]["nll_mean"] != rows[0]["nll_mean"]
    md = (out / "calibration.md").read_text()
    assert md.startswith("# Calibration (mnist1d, 2 seeds)") and "wall time" in md
    _check_figure(CALIBRATION_PNG, saved_figures[CALIBRATION_PNG])
    (out / CALIBRATION_PNG).unlink()
    assert [os.path.basename(p) for p in study.main(["--replot", str(out)])["plots"]] == [
        CALIBRATION_PNG]
