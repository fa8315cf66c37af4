"""The benchmark's own machinery (the ``benchmarks`` package), cheaply: no timing is asserted.

What is checked: the spread statistic (a distribution-free interval for the median, its
coverage against a Monte Carlo oracle), the extra rounds it asks for, the eval-mode batch
norm contenders (against a float64 reference, with non-trivial running statistics), that the
steps table compares the same model (the ResNet, which has no dropout, gives the same logits
and statistics with either BatchNorm; the Transformer without dropout the same logits), that
the layer grid, the steps table and their markdown run end to end on tiny inputs, that the
sharded-``jit`` probe runs on the session's 8 devices (evaluation: no collective) and its
markdown prints, and that ``benchmarks/bench.py`` is the thin entry point of the package.
"""

from __future__ import annotations

import math
import pathlib
import re
import sys

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

import dropnorm
import dropnorm.linen as dl

BENCH = pathlib.Path(__file__).resolve().parents[1] / "benchmarks"
sys.path.insert(0, str(BENCH))
import bench  # noqa: E402  (benchmarks/bench.py, which loads the benchmarks package)
from bench import grid, scale, steps, why  # noqa: E402  (modules of the package)


def test_median_interval_is_min_max_below_six_rounds_and_narrows_above():
    v = [5.0, 1.0, 4.0, 2.0, 3.0, 7.0, 6.0]
    assert bench.median_interval(v) == (1.0, 7.0, 1 - 2 / 2**7)  # 98.4%: (min, max)
    lo, hi, cov = bench.median_interval(list(range(21)))
    assert (lo, hi) == (5, 15)  # the 6th smallest to the 6th largest
    assert cov >= bench.SPREAD_LEVEL
    for n in (3, 5):  # no pair of order statistics reaches 95%: (min, max), and it says so
        lo, hi, cov = bench.median_interval(list(range(n)))
        assert (lo, hi) == (0, n - 1) and cov < bench.SPREAD_LEVEL


@pytest.mark.parametrize("n", [7, 21])
def test_median_interval_coverage_matches_monte_carlo(n):
    # Oracle: draws from a skewed law with a known median (lognormal(0, 1): median 1).
    rng = np.random.default_rng(n)
    trials = 4000
    hits = 0
    for row in rng.lognormal(0.0, 1.0, (trials, n)):
        lo, hi, cov = bench.median_interval(row.tolist())
        hits += lo <= 1.0 <= hi
    # Binomial standard error of the observed fraction; 5 of them: a false failure has
    # probability below 1e-6.
    se = math.sqrt(cov * (1 - cov) / trials)
    assert abs(hits / trials - cov) < 5 * se, (hits / trials, cov)


def test_ratio_stats_and_spread_above():
    flax, ours = [2.0, 2.2, 1.8, 2.0, 2.1, 1.9, 2.0], [1.0] * 7
    st = bench.ratio_stats(flax, ours)
    assert st["ratio"] == 2.0 and st["rounds"] == 7
    assert st["spread"] == pytest.approx((2.2 - 1.8) / 2.0)  # (max - min) / median at 7
    assert bench.ratio_stats([1.0], [2.0])["spread"] is None  # one round: no spread
    times = {"flax": flax, "dropnorm": ours}
    assert bench.spread_above(None, [("flax", "dropnorm")]) is None
    assert bench.spread_above(0.25, [("flax", "dropnorm")])(times) is False  # 20% <= 25%
    assert bench.spread_above(0.10, [("flax", "dropnorm")])(times) is True


def test_time_interleaved_adds_rounds_while_asked_up_to_the_maximum():
    fns = {"a": lambda x: x + 1, "b": lambda x: x * 2}
    args = (jnp.ones(3),)
    assert len(bench.time_interleaved(fns, args, 3)["a"]) == 3
    t = bench.time_interleaved(fns, args, 3, lambda t: True, max_repeats=7)
    assert [len(v) for v in t.values()] == [7, 7]  # 3 + 3 + 1: never past the maximum
    t = bench.time_interleaved(fns, args, 2, lambda t: len(t["a"]) < 5, max_repeats=20)
    assert len(t["b"]) == 6  # asked after 2 and 4 rounds, not after 6


@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16])
def test_eval_contenders_normalise_by_the_running_statistics(dtype):
    c = 8
    x = jax.random.normal(jax.random.key(0), (16, c)).astype(dtype)
    scale, bias = jnp.linspace(0.5, 2.0, c), jnp.linspace(-1.0, 1.0, c)
    mean, var = bench.eval_stats(c)
    assert float(jnp.min(jnp.abs(mean))) > 0 and float(jnp.max(jnp.abs(var - 1))) > 0.1
    f64 = [np.asarray(a, np.float64) for a in (x.astype(jnp.float32), scale, bias, mean, var)]
    ref = (f64[0] - f64[3]) / np.sqrt(f64[4] + 1e-5) * f64[1] + f64[2]
    # float32: a few ulps of |ref| <= ~10; bf16 output: its rounding (2**-8 relative) of |ref|
    tol = 1e-5 if dtype == jnp.float32 else 2**-7 * 10
    for name, layer in bench._batch_norm_eval_layers(c, dtype).items():
        y = jax.jit(layer)(x, scale, bias, (mean, var))
        assert y.dtype == dtype, name
        np.testing.assert_allclose(np.asarray(y, np.float64), ref, atol=tol, err_msg=name)


def _variables(net, *args):
    """Random variables of ``net``'s shapes, without compiling its initialisers (which takes
    seconds on CPU): parameters normal(0, 0.3), running means 0 and variances 1."""
    rng = np.random.default_rng(0)
    shapes = jax.eval_shape(lambda key: net.init(key, *args), jax.random.key(0))

    def fill(path, s):
        name = jax.tree_util.keystr(path)
        value = (np.ones(s.shape) if "var" in name else np.zeros(s.shape)) \
            if "batch_stats" in name else rng.normal(0.0, 0.3, s.shape)
        return jnp.asarray(value, s.dtype)

    return jax.tree_util.tree_map_with_path(fill, shapes)


def test_resnet_is_the_same_model_with_either_batch_norm():
    # The ResNet has no dropout, so with dropnorm's BatchNorm and with Flax's it must give
    # the same logits and the same new running statistics in training mode: the steps table
    # times the same computation. Tolerance: float32 rounding of two variance formulas
    # (dropnorm's shifted one-pass sums, Flax's E[x^2] - E[x]^2 of unit-scale activations)
    # through 6 layers: 1e-4 relative, 1e-5 absolute.
    r = bench.STEP_SIZES[True]["resnet"]
    x = jax.random.normal(jax.random.key(0), (r["batch"], r["size"], r["size"], 3))
    nets = [bench.ResNet(bn, r["stages"], r["width"], axis_name=None)
            for bn in (dl.BatchNorm, nn.BatchNorm)]
    v = _variables(nets[1], x, False)

    @jax.jit
    def both(v, x):
        return [n.apply(v, x, True, mutable=["batch_stats"]) for n in nets]

    ours, theirs = both(v, x)
    assert len(jax.tree.leaves(theirs[1])) == 2 * 6  # mean and var of each BatchNorm
    jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-5),
                 ours, theirs)


def test_transformer_without_dropout_has_the_same_logits():
    # Deterministic, dropnorm's attention_fn must be Flax's attention: same logits. float32
    # rounding of the same arithmetic, possibly in another order: 1e-5.
    t = bench.STEP_SIZES[True]["transformer"]
    x = jax.random.normal(jax.random.key(0), (t["batch"], t["length"], t["dim"]))
    ours = bench.Transformer(dl.Dropout, dropnorm.dot_product_attention, t["layers"],
                              t["heads"], t["mlp"])
    theirs = bench.Transformer(nn.Dropout, nn.dot_product_attention, t["layers"], t["heads"],
                                t["mlp"])
    v = _variables(theirs, x, False)

    @jax.jit
    def logits(v, x, key):
        return (ours.apply(v, x, False), theirs.apply(v, x, False),
                ours.apply(v, x, True, rngs={"dropout": key}))

    a, b, train = logits(v, x, jax.random.key(2))
    np.testing.assert_allclose(a, b, atol=1e-5)
    assert float(jnp.max(jnp.abs(train - a))) > 1e-3  # and in training, dropout is on


def test_grid_steps_and_markdown_end_to_end(monkeypatch):
    monkeypatch.setattr(grid, "DTYPES", {"f32": jnp.float32})  # one dtype is enough here
    res = bench.run([(64, 8)], 2, ["batch_norm"], ["eval"], layer_shape=(16, 8),
                    policies=False, target_spread=None)
    modes = {(r["impl"], r["mode"]) for r in res["rows"] if r["op"] == "batch_norm"}
    assert modes == {(n, "eval") for n in bench.MAIN}
    row = next(r for r in res["rows"] if r["impl"] == "dropnorm")
    assert row["rounds"] == 2 and row["floor_fraction"] is not None  # eval's floor: 2 passes
    # A steps table of two trivial "models", for its code path (run_steps, markdown).
    tiny = {"label": "tiny", "sizes": {}, "args": (jnp.ones(4),),
            "steps": {"dropnorm": lambda x: x + 1, "flax": lambda x: x * 2}}
    monkeypatch.setattr(steps, "step_models", lambda quick: {"mlp": tiny, "resnet": tiny})
    table = bench.run_steps(True, repeats=3, compile_reps=2)
    assert [m["model"] for m in table["models"]] == ["mlp", "resnet"]
    assert table["models"][0]["rounds"] == 3 and table["models"][0]["step_target"] == 1.1
    assert table["models"][0]["compile_spread"] is not None  # 2 compile rounds: a spread
    assert table["models"][0]["compile_cpu_dropnorm_over_flax"] > 0
    md = bench.markdown(res | {"repeats": 2, "rate": bench.RATE, "steps": table})
    assert "| (64, 8) | f32 | eval |" in md and "batch_norm: " in md
    assert "### steps:" in md and "| tiny |" in md and ">= 1.10" in md and "<= 1.15" in md


def test_why_variants_trace_other_statistics_and_restore_the_library():
    # The why tables' variants (benchmarks/why.py) replace two functions of the statistics
    # while a program is traced: check each one did what its name says, and that the library
    # is itself again afterwards. Data at mean 1e4 x its std, running mean 0 as the shift.
    from dropnorm import _moments

    x = jnp.asarray(1e4 + np.random.default_rng(3).standard_normal((512, 4)), jnp.float32)
    exact = np.var(np.asarray(x, np.float64), axis=0)

    def moments(x):
        return _moments.batch_moments(x, (0,), shift=jnp.zeros(4))[1].ravel()

    def run():  # (relative error of the variance, the compiled program's conditionals)
        compiled = jax.jit(moments).lower(x).compile()  # one compile for both answers
        err = np.max(np.abs(np.asarray(compiled(x), np.float64) - exact) / exact)
        return float(err), compiled.as_text().count("conditional(")

    with why.statistics_variant(why.RAW):  # Flax's raw sums: x^2 at 1e8 cancels to noise
        err, conds = run()
        assert err > 0.1 and conds == 0
    with why.statistics_variant(why.ALWAYS):  # both rounds, unconditionally: exact
        err, conds = run()
        assert err < 1e-5 and conds == 0
    err, conds = run()  # as is: exact, the second round in a conditional
    assert err < 1e-5 and conds == 1
    assert _moments._poor.__name__ == "_poor"
    assert _moments.shifted_moments.__name__ == "shifted_moments"
    with pytest.raises(ValueError, match="unknown variant 'fast'"):
        with why.statistics_variant("fast"):
            pass


def test_grid_cells_carry_the_running_mean_as_a_value_the_compiler_cannot_fold():
    # A training step's BatchNorm state is one of its inputs. The grid's cells once closed
    # over an initial state, a constant zero running mean, and XLA folded dropnorm's shift
    # (x - 0) away, timing statistics that real steps never run (BENCHMARKS.md, run 14).
    args = grid.cell_args((64, 8), jnp.float32)
    fwd = grid.mode_fns(grid.batch_norm_layers(8, jnp.float32)["dropnorm"], "batch_norm")["fwd"]
    hlo = jax.jit(fwd).lower(*args).compile().as_text()
    entry = hlo[hlo.index("\nENTRY"):].splitlines()  # (the second round has its own centre)
    x = next(re.match(r"\s*(%\S+) = ", ln)[1] for ln in entry if "parameter(0)" in ln)
    sums = [[o.strip() for o in re.search(r" fusion\(([^)]*)\)", ln)[1].split(",")]
            for ln in entry if " fusion(" in ln and "ROOT" not in ln]
    # Some fusion before the normalisation reads x with more than constants: the shift.
    assert any(x in ops and any(o != x and not o.startswith("%constant") for o in ops)
               for ops in sums), entry


def test_why_tables_end_to_end():
    res = why.run_why([(64, 8)], 2, resnet=False)
    assert [r["shape"] for r in res["sums"]] == [[64, 8]] and res["resnet"] is None
    assert set(res["variants"][0]["ratio"]) == set(why.VARIANTS)
    assert res["variants"][0]["rounds"] == 2
    md = "\n".join(why.why_markdown(res))
    assert "| (64, 8) |" in md and "linen / second round always" in md


def test_unknown_mode_is_refused():
    with pytest.raises(SystemExit):
        bench.main(["--modes", "fwd,train"])


def test_bench_py_is_the_packages_entry_point():
    # One package, whichever way it is reached: bench.py's names are the package's objects,
    # and its subprocesses run bench.py itself.
    assert bench.main.__module__ == "benchmarks.cli" and bench.run is grid.run
    assert bench.hlo_collectives is scale.hlo_collectives
    assert bench.scale_layers is scale.scale_layers and bench.SCALE_FEATURES == 256
    assert pathlib.Path(scale.BENCH_SCRIPT) == BENCH / "bench.py"
    env = scale.worker_env(64)
    assert env["XLA_FLAGS"].split().count("--xla_force_host_platform_device_count=64") == 1
    assert "device_count=8" not in env["XLA_FLAGS"]  # the session's own count is replaced
    root = str(pathlib.Path(dropnorm.__file__).resolve().parents[1])
    assert env["PYTHONPATH"].split(":")[0] == root  # the subprocess measures this dropnorm


def test_sharded_probe_counts_no_collective_in_evaluation():
    # In process, on the session's 8 devices: the two evaluation programs of the sharded-jit
    # table, both libraries. Evaluation uses the running statistics, so no device needs
    # another's data: 0 collectives (issue 19). The forward pass, for contrast, needs the
    # batch statistics across devices: at least one collective, in either library.
    res = scale.sharded_layers(8, only={"batch_norm eval", "batch_norm fwd"})
    cells = {(c["program"], c["impl"]): c for c in res["layers"]}
    assert set(cells) == {(p, i) for p in ("batch_norm eval", "batch_norm fwd")
                          for i in ("dropnorm", "flax")}
    for impl in ("dropnorm", "flax"):
        assert cells[("batch_norm eval", impl)]["count"] == 0, cells[("batch_norm eval", impl)]
        assert cells[("batch_norm fwd", impl)]["count"] >= 1, cells[("batch_norm fwd", impl)]
    # Flax's forward: one all-reduce of (mean, mean of squares), 2 x 512 float32.
    assert cells[("batch_norm fwd", "flax")]["ops"] == [("all-reduce", 2 * 512 * 4)]


def test_sharded_markdown_and_kinds():
    assert scale.kinds([("all-reduce", 8), ("collective-permute", 4), ("all-reduce", 8)]) == \
        "2 all-reduce + 1 collective-permute"
    assert scale.kinds([]) == "0"

    def cell(n, program, impl, ops):
        return {"devices": n, "program": program, "impl": impl, "count": len(ops),
                "bytes": sum(b for _, b in ops), "ops": ops}

    runs = []
    for n in (8, 64):
        layers = [cell(n, "batch_norm fwd", "dropnorm", [("all-reduce", 8192)]),
                  cell(n, "batch_norm fwd", "flax", [("all-reduce", 4096)])]
        run = {"devices": n, "features": 512, "batch": 256, "model_axis": 4, "layers": layers}
        if n == 8:
            t = {"total_s_median": 2.0, "lower_s_median": 0.5, "compile_s_median": 1.5,
                 "total_cpu_s_median": 2.5}
            run["models"] = {
                "devices": 8, "reps": 3, "batch_norm_layers": 15,
                "sizes": {"batch": 64, "size": 32, "width": 16, "stages": [2, 2, 2]},
                "collectives": {"dropnorm": {"count": 2, "bytes": 10, "ops": [
                    ("all-reduce", 5)] * 2}, "flax": {"count": 1, "bytes": 5,
                                                      "ops": [("all-reduce", 5)]}},
                "compile": {"dropnorm": t, "flax": t}, "compile_dropnorm_over_flax": 1.2,
                "compile_spread": 0.1, "compile_cpu_dropnorm_over_flax": 1.0,
                "compile_cpu_spread": None, "compile_target": 1.15}
        runs.append(run)
    md = bench.markdown({"sharded": {"uptime_before": "u0", "uptime_after": "u1",
                                     "runs": runs}})
    assert "### sharded jit: collectives per BatchNorm layer (512 features" in md
    assert "| 1 / 1 | 8,192 / 8,192 | 1 / 1 | 4,096 / 4,096 | **2.00x** | 1 all-reduce " in md
    assert "### sharded jit: a ResNet train step on 8 devices" in md
    assert "| dropnorm | 2 | 10 | 2 all-reduce |" in md and "**1.20** | <= 1.15 (**not met**)" in md
