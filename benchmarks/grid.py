"""The layer grid: each layer alone, dropnorm against flax.linen and flax.nnx, per shape and dtype.

For every shape of :data:`FULL_SHAPES` (``--quick``: :data:`QUICK_SHAPES`), dtype and mode
(``fwd``, ``vjp``, ``loss``, ``eval``; see the package docstring), one jitted function per
contender, timed interleaved (:func:`benchmarks.timing.time_interleaved`) with ``x * 2``
beside them for the memory floor. Also: the bytes each layer keeps for the backward pass
(:func:`benchmarks.timing.residual_bytes_per_element`) and the 12-layer training step's
compiled temp memory (:func:`twelve_layer_memory`). :func:`run` measures,
:func:`layer_markdown`, :func:`copy_residual_markdown` and :func:`twelve_layer_markdown`
print the tables.
"""

from __future__ import annotations

import statistics
from collections.abc import Callable

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

import dropnorm
import dropnorm.linen as dl
from benchmarks import masks
from benchmarks.models import RATE, twelve_layer_temp_bytes
from benchmarks.timing import (
    FLOOR_PASSES,
    copy_x2,
    pct,
    ratio_stats,
    residual_bytes_per_element,
    spread_above,
    time_interleaved,
)

FULL_SHAPES = [(256, 56, 56, 64), (256, 14, 14, 1024), (4096, 4096), (100000, 32)]
QUICK_SHAPES = [(32, 28, 28, 64), (20000, 32)]
DTYPES = {"f32": jnp.float32, "bf16": jnp.bfloat16}
MAIN = ("dropnorm", "flax.linen", "flax.nnx")
MODES = ("fwd", "vjp", "loss", "eval")  # eval: batch norm only (dropout's eval is x itself)


# --- the layers, each as f(x, scale, bias) -> y with scale/bias ignored by dropout ----------

def _dropout_layers() -> dict[str, Callable]:
    linen = nn.Dropout(RATE, deterministic=False)

    def ours(x, scale, bias, key):
        return dropnorm.dropout(key, x, RATE, True)

    def flax_linen(x, scale, bias, key):
        return linen.apply({}, x, rngs={"dropout": key})

    def flax_nnx(x, scale, bias, key):
        # built inside the traced function, as nnx code under jax.jit sees it after merge
        return nnx.Dropout(RATE, rngs=nnx.Rngs(dropout=key))(x, deterministic=False)

    def bits(b):
        return lambda x, scale, bias, key: dropnorm.dropout(key, x, RATE, True, mask_bits=b)

    return {"dropnorm": ours, "flax.linen": flax_linen, "flax.nnx": flax_nnx,
            "packed bits": masks.dropout_packed, "bool mask": masks.dropout_bool,
            "32-bit masks": bits(32)}



def running_mean(bias):
    """The running mean the training-mode cells carry: ``bias / 2`` (0.05 per feature), a
    value computed from an argument, as a training step's state is one of its inputs. A
    state closed over as a constant would let XLA fold the shift away (a zero running mean)
    or merge dropnorm's two subtractions into one input-sized temporary (any other constant:
    2.3x the statistics' time at (4096, 4096) float32), neither of which a training step
    sees (BENCHMARKS.md, run 14)."""
    return bias * 0.5


def batch_norm_layers(features: int, dtype) -> dict[str, Callable]:
    _, bn_state = dropnorm.batch_norm_init(features)
    linen = nn.BatchNorm(use_running_average=False, momentum=0.99, epsilon=1e-5, dtype=dtype)

    def ours(x, scale, bias, key):
        state = bn_state._replace(mean=running_mean(bias))
        return dropnorm.batch_norm(dropnorm.BatchNormParams(scale, bias), state, x, True)[0]

    def flax_linen(x, scale, bias, key):
        stats = {"mean": running_mean(bias), "var": jnp.ones(features)}
        return linen.apply({"params": {"scale": scale, "bias": bias}, "batch_stats": stats}, x,
                           mutable=["batch_stats"])[0]

    def flax_nnx(x, scale, bias, key):
        m = nnx.BatchNorm(features, use_running_average=False, momentum=0.99, epsilon=1e-5,
                          dtype=dtype, rngs=nnx.Rngs(0))
        m.scale.set_value(scale)  # (the ``.value`` setter is deprecated in flax 0.12)
        m.bias.set_value(bias)
        return m(x)

    return {"dropnorm": ours, "flax.linen": flax_linen, "flax.nnx": flax_nnx}


def eval_stats(features: int) -> tuple[jax.Array, jax.Array]:
    """Running statistics for the eval cells: ``(mean, var)``, float32, away from (0, 1)."""
    r = np.random.default_rng(5)
    return (jnp.asarray(r.normal(0.5, 1.0, features), jnp.float32),
            jnp.asarray(r.uniform(0.25, 4.0, features), jnp.float32))


def _batch_norm_eval_layers(features: int, dtype) -> dict[str, Callable]:
    """Batch norm in eval mode (running statistics), each as ``f(x, scale, bias, stats)``.

    ``stats = (mean, var)`` are arguments of the jitted function, as in an eval step (closed
    over, XLA could fold ``rsqrt(var + eps)`` into the executable). dropnorm's contender is
    the pure function, as in the train cells: ``dropnorm.linen.BatchNorm`` in eval mode
    compiles to the same optimised HLO (checked for f32 and bf16 at jax 0.10.2).
    """
    linen = nn.BatchNorm(use_running_average=True, momentum=0.99, epsilon=1e-5, dtype=dtype)

    def ours(x, scale, bias, stats):
        state = dropnorm.BatchNormState(*stats, jnp.zeros((), jnp.int32))
        return dropnorm.batch_norm(dropnorm.BatchNormParams(scale, bias), state, x, False)[0]

    def flax_linen(x, scale, bias, stats):
        return linen.apply({"params": {"scale": scale, "bias": bias},
                            "batch_stats": {"mean": stats[0], "var": stats[1]}}, x)

    def flax_nnx(x, scale, bias, stats):
        m = nnx.BatchNorm(features, use_running_average=True, momentum=0.99, epsilon=1e-5,
                          dtype=dtype, rngs=nnx.Rngs(0))
        m.scale.set_value(scale)
        m.bias.set_value(bias)
        m.mean.set_value(stats[0])
        m.var.set_value(stats[1])
        return m(x)

    return {"dropnorm": ours, "flax.linen": flax_linen, "flax.nnx": flax_nnx}


def mode_fns(layer: Callable, op: str) -> dict[str, Callable]:
    """``{mode: f(x, scale, bias, ct, key)}`` of a layer for the ``fwd``, ``vjp`` and ``loss``
    cells."""
    # The key is an argument of the jitted function: a key closed over as a constant would let
    # XLA fold the whole random mask into the executable at compile time.
    def fwd(x, scale, bias, ct, key):
        return layer(x, scale, bias, key)

    def vjp(x, scale, bias, ct, key):
        if op == "dropout":
            y, back = jax.vjp(lambda x: layer(x, scale, bias, key), x)
        else:
            y, back = jax.vjp(lambda *a: layer(*a, key), x, scale, bias)
        return y, back(ct)

    def loss(x, scale, bias, ct, key):
        def f(*a):
            return jnp.sum(jnp.square(layer(*a, key).astype(jnp.float32)))
        return jax.value_and_grad(f, (0,) if op == "dropout" else (0, 1, 2))(x, scale, bias)

    return {"fwd": fwd, "vjp": vjp, "loss": loss}


COLUMNS = (
    "columns: ms = median seconds per call over the cell's rounds (x 1e3; {r} rounds, more "
    "where the spread was above the target: 'rounds'). linen/this = median over "
    "the rounds of (flax.linen time / this contender's time) in the SAME round: a median of "
    "per-round ratios, which cancels drift that hits both contenders of a round. It is NOT "
    "the quotient of the two median times, printed beside it as 'of medians': with few rounds "
    "on a busy CPU the two can differ widely (1.40 against 1.01 seen in a 3-round --quick run "
    "at load average 5); where they disagree, neither is reliable. spread = width of the "
    "distribution-free 95% interval of the median per-round ratio (order statistics of the "
    "rounds; with under 6 rounds, min to max, which covers less) over the median ratio: how "
    "far two runs of the same rounds' noise may read apart. floor = memory-floor time / "
    "median time (100% = at the floor; see the module docstring).")

BN_TARGET = 0.95  # issue 14: batch_norm at least 0.95x flax.linen.BatchNorm in every cell


def bn_target_summary(rows: list[dict], spread: float = 0.10) -> str:
    """How many batch_norm cells meet ``BN_TARGET`` against flax.linen, and how many have a
    spread below ``spread``, with the cells that miss either."""
    cells = [r for r in rows if r["op"] == "batch_norm" and r["impl"] == "dropnorm"]
    if not cells:
        return ""
    slow = [r for r in cells if r["linen_over_this"] < BN_TARGET]
    wide = [r for r in cells if r.get("linen_spread") is None or r["linen_spread"] >= spread]

    def name(r):
        return f"{tuple(r['shape'])} {r['dtype']} {r['mode']} ({r['linen_over_this']:.2f}x)"

    out = [f"batch_norm: {len(cells) - len(slow)} of {len(cells)} cells at >= {BN_TARGET}x "
           f"flax.linen; {len(cells) - len(wide)} of {len(cells)} with spread below "
           f"{spread:.0%}.", ""]
    if slow:
        out.append("- below the target: " + "; ".join(name(r) for r in slow))
    if wide:
        out.append(f"- spread {spread:.0%} or more: " + "; ".join(
            f"{name(r)} {pct(r.get('linen_spread'))}" for r in wide))
    return "\n".join(out)


def cell_args(shape, dtype) -> tuple:
    """A cell's arguments ``(x, scale, bias, ct, key)``: x standard normal, the cotangent
    half that, scale 1.5 and bias 0.1 per feature (float32), the dropout key."""
    x = jax.random.normal(jax.random.key(1), shape, jnp.float32).astype(dtype)
    ct = (jax.random.normal(jax.random.key(2), shape, jnp.float32) * 0.5).astype(dtype)
    c = shape[-1]
    scale, bias = jnp.full((c,), 1.5, jnp.float32), jnp.full((c,), 0.1, jnp.float32)
    return x, scale, bias, ct, jax.random.key(3)


def run(shapes, repeats: int, ops, modes, layer_shape, policies: bool = True,
        target_spread: float | None = None, max_repeats: int | None = None) -> dict:
    """The layer grid. ``target_spread``: a cell whose dropnorm ratio to flax.linen has a
    spread (:func:`ratio_stats`) above it gets more rounds, ``repeats`` at a time, up to
    ``max_repeats`` (None: exactly ``repeats``). The nnx ratio's spread is recorded too."""
    print(COLUMNS.format(r=repeats), flush=True)
    rows = []
    key = jax.random.key(0)
    more = spread_above(target_spread, [("flax.linen", "dropnorm")])
    for shape in shapes:
        for dname, dtype in DTYPES.items():
            args = cell_args(shape, dtype)
            x, c = args[0], shape[-1]
            eval_args = args[:4] + (eval_stats(c),)  # eval layers take (mean, var) for a key
            copy_t = statistics.median(time_interleaved({"copy": copy_x2}, args, repeats)["copy"])
            for op in ops:
                for mode in modes:
                    if mode == "eval" and op != "batch_norm":
                        continue  # dropout in eval mode returns x: nothing to time
                    if mode == "eval":
                        layers = _batch_norm_eval_layers(c, dtype)
                    else:
                        layers = (_dropout_layers() if op == "dropout"
                                  else batch_norm_layers(c, dtype))
                    fns = {name: mode_fns(layer, op)["fwd" if mode == "eval" else mode]
                           for name, layer in layers.items()
                           if name in MAIN or (policies and (name in masks.BIT_VARIANTS or (
                               name in masks.POLICIES and mode != "fwd")))}
                    fns["copy"] = copy_x2
                    times = time_interleaved(fns, eval_args if mode == "eval" else args,
                                             repeats, more, max_repeats)
                    copy_t = min(copy_t, statistics.median(times["copy"]))
                    for name in (n for n in layers if n in fns):
                        med = statistics.median(times[name])
                        lin = ratio_stats(times["flax.linen"], times[name])
                        nx = ratio_stats(times["flax.nnx"], times[name])
                        passes = FLOOR_PASSES.get((op, mode))
                        floor = None if passes is None else passes / 2 * copy_t
                        rows.append({
                            "op": op, "mode": mode, "shape": list(shape), "dtype": dname,
                            "impl": name, "ms": med * 1e3, "min_ms": min(times[name]) * 1e3,
                            "linen_over_this": lin["ratio"], "nnx_over_this": nx["ratio"],
                            "linen_spread": lin["spread"], "linen_interval": [lin["lo"], lin["hi"]],
                            "nnx_spread": nx["spread"], "nnx_interval": [nx["lo"], nx["hi"]],
                            "rounds": lin["rounds"], "coverage": lin["coverage"],
                            "floor_ms": None if floor is None else floor * 1e3,
                            "floor_fraction": None if floor is None else floor / med,
                        })
                        of_medians = statistics.median(times["flax.linen"]) / med
                        print(f"{op:10s} {mode:4s} {str(shape):20s} {dname:4s} {name:10s} "
                              f"{med * 1e3:9.3f} ms  linen/this {lin['ratio']:5.2f} "
                              f"(of medians {of_medians:5.2f}, spread {pct(lin['spread']):>6s}, "
                              f"{lin['rounds']} rounds)  "
                              f"floor {'' if floor is None else f'{floor / med:6.1%}'}",
                              flush=True)
            rows.append({"op": "copy", "mode": "fwd", "shape": list(shape), "dtype": dname,
                         "impl": "x*2", "ms": copy_t * 1e3,
                         "GB_per_s": 2 * x.nbytes / copy_t / 1e9})
    residuals = []
    for dname, dtype in DTYPES.items():
        x = jax.random.normal(key, layer_shape, jnp.float32).astype(dtype)
        c = layer_shape[-1]
        scale, bias = jnp.ones((c,)), jnp.zeros((c,))
        for op in ops:
            layers = _dropout_layers() if op == "dropout" else batch_norm_layers(c, dtype)
            for name, layer in layers.items():
                if op == "dropout":
                    b = residual_bytes_per_element(lambda x, f=layer: f(x, None, None, key), x)
                else:
                    b = residual_bytes_per_element(lambda *a, f=layer: f(*a, key), x, scale,
                                                   bias)
                residuals.append({"op": op, "dtype": dname, "impl": name,
                                  "bytes_per_element": b, "shape": list(layer_shape)})
    return {"rows": rows, "residuals": residuals}


def fmt(value) -> str:
    """A number with 3 decimals, ``-`` for None."""
    return "-" if value is None else f"{value:.3f}"


def twelve_layer_memory(quick: bool) -> dict:
    """The 12-layer bf16 step's compiled temp memory, dropnorm's layers against Flax's."""
    batch, width = (256, 128) if quick else (512, 256)
    flax_t = twelve_layer_temp_bytes(nn.BatchNorm, nn.Dropout, batch, width)
    ours_t = twelve_layer_temp_bytes(dl.BatchNorm, dl.Dropout, batch, width)
    print(f"12-layer bf16 step temp memory: dropnorm {ours_t / 2**20:.2f} MiB, "
          f"flax {flax_t / 2**20:.2f} MiB, ratio {ours_t / flax_t:.3f}")
    return {"batch": batch, "width": width, "flax_temp_bytes": flax_t,
            "dropnorm_temp_bytes": ours_t, "ratio": ours_t / flax_t}


def layer_markdown(result: dict) -> list[str]:
    """The column legend and the dropout and batch_norm tables of BENCHMARKS.md."""
    rows = result.get("rows", [])
    out = []
    if rows:
        out += [COLUMNS.format(r=result["repeats"]), ""]
    for op in ("dropout", "batch_norm"):
        cells = {(tuple(r["shape"]), r["dtype"], r["mode"], r["impl"]): r
                 for r in rows if r["op"] == op}
        if not cells:
            continue
        has_eval = any(k[2] == "eval" for k in cells)
        out += [f"### {op}" + (f" (rate {result['rate']})" if op == "dropout" else
                               " (train; eval: running statistics)" if has_eval else " (train)"),
                "",
                "| shape | dtype | mode | dropnorm ms | flax.linen ms | flax.nnx ms "
                "| linen / dropnorm (per round) | spread (rounds) | linen ms / dropnorm ms "
                "| nnx / dropnorm (per round) | floor % dropnorm | floor % linen |",
                "|---|---|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|"]
        keys = sorted({k[:3] for k in cells}, key=lambda k: (
            [tuple(r["shape"]) for r in rows].index(k[0]), k[1] != "f32",
            MODES.index(k[2])))
        for shape, dtype, mode in keys:
            ours = cells[(shape, dtype, mode, "dropnorm")]
            lin = cells[(shape, dtype, mode, "flax.linen")]
            nx = cells[(shape, dtype, mode, "flax.nnx")]

            def floor_pct(r):
                return "" if r["floor_fraction"] is None else f"{100 * r['floor_fraction']:.0f}"

            spread = ("-" if "rounds" not in ours else
                      f"{pct(ours['linen_spread'])} ({ours['rounds']})")
            out.append(f"| {shape} | {dtype} | {mode} | {ours['ms']:.2f} | {lin['ms']:.2f} "
                       f"| {nx['ms']:.2f} | **{ours['linen_over_this']:.2f}** | {spread} "
                       f"| {lin['ms'] / ours['ms']:.2f} "
                       f"| {ours['nnx_over_this']:.2f} | {floor_pct(ours)} | {floor_pct(lin)} |")
        out.append("")
        if op == "batch_norm" and all("linen_spread" in r for r in cells.values()):
            out += [bn_target_summary(rows, result.get("target_spread") or 0.10), ""]
    return out


def copy_residual_markdown(result: dict) -> list[str]:
    """The bandwidth reference and the bytes kept for the backward pass."""
    rows = result.get("rows", [])
    out = []
    copies = [r for r in rows if r["op"] == "copy"]
    if copies:
        out += ["### copy `x * 2` (the bandwidth reference)", "",
                "| shape | dtype | ms | GB/s |", "|---|---|---:|---:|"]
        out += [f"| {tuple(r['shape'])} | {r['dtype']} | {r['ms']:.2f} | {r['GB_per_s']:.1f} |"
                for r in copies]
        out.append("")
    if result.get("residuals"):
        out += ["### bytes kept for the backward pass, per element", "",
                "| op | dtype | dropnorm | flax.linen | flax.nnx | packed bits | bool mask |",
                "|---|---|---:|---:|---:|---:|---:|"]
        res = {(r["op"], r["dtype"], r["impl"]): r["bytes_per_element"]
               for r in result["residuals"]}
        for op, dtype in sorted({k[:2] for k in res}, key=lambda k: (k[0] != "dropout", k[1])):
            out.append(f"| {op} | {dtype} | {res[(op, dtype, 'dropnorm')]:.3f} "
                       f"| {res[(op, dtype, 'flax.linen')]:.3f} "
                       f"| {res[(op, dtype, 'flax.nnx')]:.3f} "
                       f"| {fmt(res.get((op, dtype, 'packed bits')))} "
                       f"| {fmt(res.get((op, dtype, 'bool mask')))} |")
        out.append("")
    return out


def twelve_layer_markdown(result: dict) -> list[str]:
    """The 12-layer training step's compiled temp memory (if measured)."""
    out = []
    t = result.get("twelve_layer")
    if t:
        out += ["### 12-layer bf16 training step, compiled temp memory", "",
                f"Batch {t['batch']}, width {t['width']}: dropnorm "
                f"{t['dropnorm_temp_bytes'] / 2**20:.2f} MiB, flax.linen "
                f"{t['flax_temp_bytes'] / 2**20:.2f} MiB, ratio **{t['ratio']:.3f}**.", ""]
    return out
