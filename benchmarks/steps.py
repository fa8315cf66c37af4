"""The steps table: whole training steps, dropnorm's layers against Flax's in the same model.

Each model is built from flax.linen modules twice, once with Flax's BatchNorm / Dropout
(and attention dropout inside flax.linen.MultiHeadDotProductAttention) and once with
dropnorm's; the variables are the same tree, so both steps run on the same arguments
(:func:`step_models`). :func:`run_steps` times the jitted steps interleaved and their
trace+compile; :func:`steps_markdown` prints the table.
"""

from __future__ import annotations

import functools
import statistics

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

import dropnorm
import dropnorm.linen as dl
from benchmarks.models import RATE, ResNet, Transformer, classifier_step, twelve_layer_step
from benchmarks.timing import (
    pct,
    ratio_stats,
    spread_above,
    time_interleaved,
    time_trace_compile,
    uptime,
)

STEP_TARGETS = {"mlp": 1.1, "resnet": 1.0, "transformer": 1.15}  # Flax / dropnorm step time
COMPILE_TARGET = 1.15  # dropnorm / Flax trace+compile time, every model (issue 14)

STEP_SIZES = {  # full runs; --quick: the tiny ones
    False: {"mlp": {"batch": 512, "width": 256, "depth": 12},
            "resnet": {"batch": 16, "size": 32, "width": 8, "stages": (2, 2, 2)},
            "transformer": {"batch": 16, "length": 64, "dim": 64, "heads": 4, "mlp": 256,
                            "layers": 2}},
    True: {"mlp": {"batch": 64, "width": 32, "depth": 3},
           "resnet": {"batch": 4, "size": 8, "width": 4, "stages": (1, 1)},
           "transformer": {"batch": 2, "length": 8, "dim": 16, "heads": 2, "mlp": 32,
                           "layers": 1}},
}


def step_models(quick: bool = False) -> dict[str, dict]:
    """name -> ``{"label", "sizes", "steps": {"dropnorm": step, "flax": step}, "args"}``.

    mlp: :func:`twelve_layer_step` with ``optax.sgd(0.1, momentum=0.9)``; resnet:
    :class:`ResNet` on one device (no ``axis_name``), cross-entropy, the same SGD;
    transformer: :class:`Transformer` (pre-LN blocks, float32), cross-entropy per token,
    ``optax.adamw(1e-3)``, Flax's attention (and its dropout) against
    ``attention_fn=dropnorm.dot_product_attention``.
    Both steps of a model take the same ``args`` (the variables are the same tree).
    """
    import optax

    sizes = STEP_SIZES[quick]
    sgd = optax.sgd(0.1, momentum=0.9)
    rng = np.random.default_rng(7)
    out = {}
    m = sizes["mlp"]
    mlp = {name: twelve_layer_step(bn, do, m["batch"], m["width"], sgd, m["depth"])
           for name, (bn, do) in {"dropnorm": (dl.BatchNorm, dl.Dropout),
                                  "flax": (nn.BatchNorm, nn.Dropout)}.items()}
    out["mlp"] = {"label": f"{m['depth']}-layer bf16 MLP (Dense/BatchNorm/relu/Dropout), "
                           f"batch {m['batch']}, width {m['width']}, SGD+momentum",
                  "sizes": m, "steps": {k: v[0] for k, v in mlp.items()},
                  "args": mlp["flax"][1]}
    r = sizes["resnet"]
    x = jnp.asarray(rng.standard_normal((r["batch"], r["size"], r["size"], 3)), jnp.float32)
    y = jnp.asarray(rng.integers(0, 10, r["batch"]), jnp.int32)
    res = {"flax": classifier_step(ResNet(nn.BatchNorm, r["stages"], r["width"],
                                            axis_name=None), x, y, sgd, stats=True)}
    params, stats = res["flax"][1][:2]
    res["dropnorm"] = classifier_step(ResNet(dl.BatchNorm, r["stages"], r["width"],
                                               axis_name=None), x, y, sgd, stats=True,
                                       variables={"params": params, "batch_stats": stats})
    nbn = 1 + sum(2 * b for b in r["stages"]) + len(r["stages"]) - 1
    out["resnet"] = {"label": f"ResNet ({len(r['stages'])} stages of {r['stages'][0]} blocks, "
                              f"{nbn} BatchNorm, width {r['width']}), batch {r['batch']} of "
                              f"{r['size']}x{r['size']}x3, SGD+momentum",
                     "sizes": r, "steps": {k: v[0] for k, v in res.items()},
                     "args": res["flax"][1]}
    t = sizes["transformer"]
    x = jnp.asarray(rng.standard_normal((t["batch"], t["length"], t["dim"])), jnp.float32)
    y = jnp.asarray(rng.integers(0, 16, (t["batch"], t["length"])), jnp.int32)
    attn = dropnorm.dot_product_attention
    net = functools.partial(Transformer, layers=t["layers"], heads=t["heads"], mlp=t["mlp"])
    tr = {"flax": classifier_step(net(nn.Dropout, nn.dot_product_attention), x, y,
                                   optax.adamw(1e-3), stats=False)}
    tr["dropnorm"] = classifier_step(net(dl.Dropout, attn), x, y, optax.adamw(1e-3),
                                      stats=False, variables={"params": tr["flax"][1][0]})
    out["transformer"] = {
        "label": f"{t['layers']} pre-LN Transformer blocks (attention + residual dropout "
                 f"{RATE}), batch "
                 f"{t['batch']}, length {t['length']}, width {t['dim']}, {t['heads']} heads, "
                 f"MLP {t['mlp']}, AdamW; dropnorm: attention_fn=dropnorm.dot_product_attention",
        "sizes": t, "steps": {k: v[0] for k, v in tr.items()}, "args": tr["flax"][1]}
    a, b = (mlp[k][1] for k in ("dropnorm", "flax"))  # the same variables, initialised twice
    assert jax.tree.structure(a) == jax.tree.structure(b)
    return out


def run_steps(quick: bool = False, repeats: int = 21, compile_reps: int = 5,
              target_spread: float | None = None, max_repeats: int | None = None) -> dict:
    """The steps table: time per jitted train step and trace+compile time, dropnorm vs Flax.

    Step time: :func:`time_interleaved` (``repeats`` rounds, more while the spread is above
    ``target_spread``, up to ``max_repeats``), ratio Flax / dropnorm, the median of the
    per-round ratios (> 1: dropnorm faster). Trace+compile: :func:`time_trace_compile`
    (``compile_reps`` rounds, caches cleared, fresh ``jit``), ratio dropnorm / Flax, the
    median of per-round ratios of the totals (< 1: dropnorm faster).
    """
    out = {"uptime_before": uptime(), "repeats": repeats, "compile_reps": compile_reps,
           "target_spread": target_spread, "quick": quick, "models": []}
    for name, m in step_models(quick).items():
        steps, args = m["steps"], m["args"]
        times = time_interleaved(steps, args, repeats, spread_above(
            target_spread, [("flax", "dropnorm")]), max_repeats)
        st = ratio_stats(times["flax"], times["dropnorm"])
        lowers = {impl: (lambda f=f, args=args: jax.jit(lambda *a: f(*a)).lower(*args))
                  for impl, f in steps.items()}
        tc = time_trace_compile(lowers, compile_reps)
        ct = ratio_stats(tc["dropnorm"]["total_s"], tc["flax"]["total_s"])
        cpu = ratio_stats(tc["dropnorm"]["total_cpu_s"], tc["flax"]["total_cpu_s"])
        row = {"model": name, "label": m["label"], "sizes": m["sizes"],
               "dropnorm_ms": statistics.median(times["dropnorm"]) * 1e3,
               "flax_ms": statistics.median(times["flax"]) * 1e3,
               "flax_over_dropnorm": st["ratio"], "step_spread": st["spread"],
               "step_interval": [st["lo"], st["hi"]], "rounds": st["rounds"],
               "coverage": st["coverage"], "step_target": STEP_TARGETS[name],
               "compile": {impl: {k: v for k, v in t.items() if k.endswith("_median")}
                           for impl, t in tc.items()},
               "compile_dropnorm_over_flax": ct["ratio"], "compile_spread": ct["spread"],
               "compile_interval": [ct["lo"], ct["hi"]], "compile_coverage": ct["coverage"],
               "compile_cpu_dropnorm_over_flax": cpu["ratio"], "compile_cpu_spread": cpu["spread"],
               "compile_target": COMPILE_TARGET}
        out["models"].append(row)
        print(_step_line(row), flush=True)
    out["uptime_after"] = uptime()
    return out


def _step_line(r: dict) -> str:
    o, f = r["compile"]["dropnorm"], r["compile"]["flax"]
    ok = r["flax_over_dropnorm"] >= r["step_target"]
    cok = r["compile_dropnorm_over_flax"] <= r["compile_target"]
    return (f"step {r['model']:12s} dropnorm {r['dropnorm_ms']:8.2f} ms  flax "
            f"{r['flax_ms']:8.2f} ms  flax/dropnorm {r['flax_over_dropnorm']:5.2f} (target "
            f">= {r['step_target']:.2f}: {'met' if ok else 'NOT met'}; spread "
            f"{pct(r['step_spread'])}, {r['rounds']} rounds)  trace+compile dropnorm "
            f"{o['lower_s_median']:.2f}+{o['compile_s_median']:.2f} s, flax "
            f"{f['lower_s_median']:.2f}+{f['compile_s_median']:.2f} s, dropnorm/flax "
            f"{r['compile_dropnorm_over_flax']:5.2f} (target <= {r['compile_target']:.2f}: "
            f"{'met' if cok else 'NOT met'}; spread {pct(r['compile_spread'])}; CPU seconds "
            f"{r['compile_cpu_dropnorm_over_flax']:5.2f}, spread "
            f"{pct(r['compile_cpu_spread'])})")



def steps_markdown(steps: dict) -> list[str]:
    """The steps table of BENCHMARKS.md from ``run_steps``'s result."""
    out = ["### steps: a whole jitted training step, dropnorm's layers against Flax's", "",
           "The same model built twice from flax.linen modules, with Flax's BatchNorm / Dropout "
           "(and Flax's attention dropout) or dropnorm's; one device; the optax update "
           "included. Step: median ms over the rounds (interleaved, "
           f"{steps['repeats']} rounds or more while the spread was above the target), "
           "ratio = median of per-round Flax / dropnorm (> 1: dropnorm faster), spread as in "
           "the layer tables. Trace+compile: wall-clock seconds, trace+lower + compile, median "
           f"of {steps['compile_reps']} rounds with caches cleared and a fresh `jit`, ratio = "
           "median of per-round dropnorm / Flax totals (< 1: dropnorm faster); CPU: the same "
           "ratio of this process's CPU seconds (all threads).", "",
           "| model | dropnorm ms | flax ms | flax / dropnorm | target | spread (rounds) "
           "| dropnorm trace+compile s | flax trace+compile s | dropnorm / flax | target "
           "| spread | CPU dropnorm / flax (spread) |",
           "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|"]
    for r in steps["models"]:
        o, f = r["compile"]["dropnorm"], r["compile"]["flax"]

        def tc(t):
            return (f"{t['total_s_median']:.2f} ({t['lower_s_median']:.2f} + "
                    f"{t['compile_s_median']:.2f})")

        cpu = ("-" if "compile_cpu_dropnorm_over_flax" not in r else
               f"{r['compile_cpu_dropnorm_over_flax']:.2f} ({pct(r['compile_cpu_spread'])})")
        ok = "met" if r["flax_over_dropnorm"] >= r["step_target"] else "**not met**"
        cok = "met" if r["compile_dropnorm_over_flax"] <= r["compile_target"] else "**not met**"
        out.append(f"| {r['label']} | {r['dropnorm_ms']:.2f} | {r['flax_ms']:.2f} "
                   f"| **{r['flax_over_dropnorm']:.2f}** | >= {r['step_target']:.2f} ({ok}) "
                   f"| {pct(r['step_spread'])} ({r['rounds']}) | {tc(o)} | {tc(f)} "
                   f"| **{r['compile_dropnorm_over_flax']:.2f}** "
                   f"| <= {r['compile_target']:.2f} ({cok}) | {pct(r['compile_spread'])} "
                   f"| {cpu} |")
    out += ["", f"Load: before `{steps['uptime_before']}`; after `{steps['uptime_after']}`.", ""]
    return out
