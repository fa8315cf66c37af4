"""dropnorm against flax.linen and flax.nnx: time, fraction of the memory floor, residual bytes.

Run from the repository root::

    python benchmarks/bench.py            # the full grid (several minutes on 2 CPU cores)
    python benchmarks/bench.py --quick    # small shapes and few repeats (under a minute)
    python benchmarks/bench.py --json out.json
    python benchmarks/bench.py --markdown out.json   # the tables of BENCHMARKS.md

What is timed (one jitted function per cell, inputs already on the device):

* ``fwd``: the layer's forward pass in training mode (dropout at rate 0.1; batch norm
  with batch statistics), output ``y``.
* ``vjp``: forward and backward through ``jax.vjp`` with an explicit cotangent; returns
  ``y`` and every input gradient (``dx``, and ``dscale``, ``dbias`` for batch norm).
  This is the per-layer cost inside a training step.
* ``loss``: ``jax.value_and_grad`` of ``sum(y**2)`` (in float32), the measure the issue
  used; it adds a reduction of ``y`` to a scalar.

Contenders run interleaved (one call of each per round) and every number is the median
over rounds; the ratio to Flax is the median of the per-round ratios, which cancels most
of the drift from other processes sharing the CPU. ``copy`` is ``x * 2``: its bandwidth
(2 passes over ``x``) sets the memory floor, ``passes * x.nbytes / bandwidth``, with
passes = 2 (dropout fwd), 4 (dropout vjp: read x, write y, read dy, write dx), 3 (batch
norm fwd: statistics, read x, write y) and 8 (batch norm vjp). ``floor%`` is floor time
over measured time (100% = at the floor).

Full runs also time dropnorm's dropout with the two other backward-pass memory policies
(keeping a bit-packed or a bool mask instead of regenerating it from the key) and with
8- and 32-bit masks instead of the default 16; ``--quick`` leaves these out.

Residual bytes per element are the arrays the ``jax.vjp`` closure holds (what reverse mode
keeps for the backward pass). The 12-layer figure is the compiled temp memory
(``jit(...).lower(...).compile().memory_analysis()``) of a bf16 training step of
Dense -> BatchNorm -> relu -> Dropout, 12 times, built from flax.linen modules, with
dropnorm's linen shells swapped in for BatchNorm and Dropout.
"""

from __future__ import annotations

import argparse
import datetime
import json
import math
import platform
import statistics
import subprocess
import sys
import time
from collections.abc import Callable

import flax
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

import dropnorm
import dropnorm.linen as dl
from dropnorm import _masks

RATE = 0.1
FULL_SHAPES = [(256, 56, 56, 64), (256, 14, 14, 1024), (4096, 4096), (100000, 32)]
QUICK_SHAPES = [(32, 28, 28, 64), (20000, 32)]
DTYPES = {"f32": jnp.float32, "bf16": jnp.bfloat16}
MAIN = ("dropnorm", "flax.linen", "flax.nnx")
FLOOR_PASSES = {("dropout", "fwd"): 2, ("dropout", "vjp"): 4,
                ("batch_norm", "fwd"): 3, ("batch_norm", "vjp"): 8}


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
            "packed bits": _dropout_packed, "bool mask": _dropout_bool,
            "8-bit masks": bits(8), "32-bit masks": bits(32)}


# Contenders beside the main three, timed in full runs only (--quick leaves them out).
POLICIES = ("packed bits", "bool mask")  # backward-pass memory policies: vjp and loss only
BIT_VARIANTS = ("8-bit masks", "32-bit masks")  # other mask resolutions: every mode
BITS = _masks.DEFAULT_BITS  # dropnorm's default


# The two other memory policies for dropout's backward pass, for comparison with dropnorm's
# (regenerate the mask from the key: 0 bytes per element). Same masks, same forward values.
_BIT_WEIGHTS = (1, 2, 4, 8, 16, 32, 64, 128)


def _mask(key, shape):
    return _masks.keep_mask(key, shape, _masks.keep_threshold(RATE, BITS), BITS)


def _apply_mask(x, keep):
    k = _masks.keep_threshold(RATE, BITS)
    scale = jnp.asarray(_masks.inverse_keep(k, BITS), jnp.promote_types(x.dtype, jnp.float32))
    return jnp.where(keep, x * scale, 0).astype(x.dtype)


def pack_bits(keep):
    """A bool mask packed 8 elements to a byte (uint8, ``ceil(size / 8)``)."""
    flat = keep.reshape(-1)
    if flat.size % 8:
        flat = jnp.concatenate([flat, jnp.zeros((-flat.size % 8,), bool)])
    bits = flat.reshape(-1, 8).astype(jnp.uint8) * jnp.asarray(_BIT_WEIGHTS, jnp.uint8)
    return jnp.sum(bits, axis=1, dtype=jnp.uint8)


def unpack_bits(packed, shape):
    bits = (packed[:, None] & jnp.asarray(_BIT_WEIGHTS, jnp.uint8)) != 0
    return bits.reshape(-1)[: math.prod(shape)].reshape(shape)


@jax.custom_jvp
def _packed(x, key):
    return dropnorm.dropout(key, x, RATE, True)


@_packed.defjvp
def _packed_jvp(primals, tangents):
    x, key = primals
    keep = _mask(key, x.shape)
    # tangent from the packed mask under jax.checkpoint: reverse mode keeps 1 bit per element
    t = jax.checkpoint(lambda t, p: _apply_mask(t, unpack_bits(p, t.shape)))(
        tangents[0], pack_bits(keep))
    return _apply_mask(x, keep), t


@jax.custom_jvp
def _bool(x, key):
    return dropnorm.dropout(key, x, RATE, True)


@_bool.defjvp
def _bool_jvp(primals, tangents):
    x, key = primals
    keep = _mask(key, x.shape)
    # tangent from the bool mask under jax.checkpoint: reverse mode keeps 1 byte per element
    return _apply_mask(x, keep), jax.checkpoint(_apply_mask)(tangents[0], keep)


def _dropout_packed(x, scale, bias, key):
    return _packed(x, key)


def _dropout_bool(x, scale, bias, key):
    return _bool(x, key)


def _batch_norm_layers(features: int, dtype) -> dict[str, Callable]:
    _, bn_state = dropnorm.batch_norm_init(features)
    linen = nn.BatchNorm(use_running_average=False, momentum=0.99, epsilon=1e-5, dtype=dtype)
    stats = {"mean": jnp.zeros(features), "var": jnp.ones(features)}

    def ours(x, scale, bias, key):
        return dropnorm.batch_norm(dropnorm.BatchNormParams(scale, bias), bn_state, x, True)[0]

    def flax_linen(x, scale, bias, key):
        return linen.apply({"params": {"scale": scale, "bias": bias}, "batch_stats": stats}, x,
                           mutable=["batch_stats"])[0]

    def flax_nnx(x, scale, bias, key):
        m = nnx.BatchNorm(features, use_running_average=False, momentum=0.99, epsilon=1e-5,
                          dtype=dtype, rngs=nnx.Rngs(0))
        m.scale.value, m.bias.value = scale, bias
        return m(x)

    return {"dropnorm": ours, "flax.linen": flax_linen, "flax.nnx": flax_nnx}


def _modes(layer: Callable, op: str) -> dict[str, Callable]:
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


def _copy(x, scale, bias, ct, key):
    return x * 2


# --- timing -----------------------------------------------------------------------------

def _block(out):
    jax.block_until_ready(out)


def time_interleaved(fns: dict[str, Callable], args, repeats: int) -> dict[str, list[float]]:
    """Seconds per call of each function, ``repeats`` rounds, one call of each per round."""
    compiled = {}
    for name, f in fns.items():
        c = jax.jit(f).lower(*args).compile()
        _block(c(*args))  # warm up: allocations, thread pools
        compiled[name] = c
    times: dict[str, list[float]] = {name: [] for name in fns}
    for _ in range(repeats):
        for name, c in compiled.items():
            t0 = time.perf_counter()
            _block(c(*args))
            times[name].append(time.perf_counter() - t0)
    return times


def time_random_words(shapes, repeats: int) -> list[dict]:
    """The raw bits of a default (16-bit) mask of each shape: threefry against dropnorm's hash.

    ``jax.random.bits`` is what a threefry-based mask would draw for the same number of
    32-bit words; ``_masks.random_words`` is dropnorm's keyed counter hash.
    """
    out = []
    for shape in shapes:
        n = -(-math.prod(shape) * BITS // 32)
        fns = {"threefry": lambda key, n=n: jax.random.bits(key, (n,), jnp.uint32),
               "dropnorm": lambda key, n=n: _masks.random_words(key, n)}
        times = time_interleaved(fns, (jax.random.key(4),), repeats)
        t3, th = (statistics.median(times[k]) for k in ("threefry", "dropnorm"))
        ratio = statistics.median(a / b for a, b in zip(times["threefry"], times["dropnorm"],
                                                        strict=True))
        out.append({"shape": list(shape), "words": n, "threefry_ms": t3 * 1e3,
                    "dropnorm_ms": th * 1e3, "threefry_over_dropnorm": ratio})
        print(f"random words {n:>10d}: threefry {t3 * 1e3:8.3f} ms, dropnorm {th * 1e3:7.3f} ms, "
              f"ratio {ratio:6.1f}", flush=True)
    return out


def residual_bytes_per_element(fn: Callable, x, *rest) -> float:
    _, back = jax.vjp(fn, x, *rest)
    return sum(leaf.size * leaf.dtype.itemsize for leaf in jax.tree.leaves(back)) / x.size


# --- the 12-layer model -------------------------------------------------------------------

class _Net(nn.Module):
    bn: type
    dropout: type
    width: int
    depth: int = 12

    @nn.compact
    def __call__(self, x, train: bool):
        for _ in range(self.depth):
            x = nn.Dense(self.width, dtype=jnp.bfloat16)(x)
            x = self.bn(use_running_average=not train, dtype=jnp.bfloat16)(x)
            x = nn.relu(x)
            x = self.dropout(RATE, deterministic=not train)(x)
        return x


def twelve_layer_temp_bytes(bn, dropout, batch: int, width: int) -> int:
    net = _Net(bn, dropout, width)
    x = jnp.ones((batch, width), jnp.bfloat16)
    variables = net.init({"params": jax.random.key(0)}, x, False)

    def step(params, stats, x, key):
        def loss(p):
            y, upd = net.apply({"params": p, "batch_stats": stats}, x, True,
                               rngs={"dropout": key}, mutable=["batch_stats"])
            return jnp.mean(jnp.square(y.astype(jnp.float32))), upd

        (value, upd), grads = jax.value_and_grad(loss, has_aux=True)(params)
        return value, grads, upd

    compiled = jax.jit(step).lower(variables["params"], variables["batch_stats"], x,
                                   jax.random.key(1)).compile()
    return int(compiled.memory_analysis().temp_size_in_bytes)


# --- the run ------------------------------------------------------------------------------

def machine() -> dict:
    info = {"platform": platform.platform(), "python": platform.python_version(),
            "jax": jax.__version__, "flax": flax.__version__, "numpy": np.__version__,
            "backend": jax.default_backend(), "devices": [str(d) for d in jax.devices()],
            "date_utc": datetime.datetime.now(datetime.UTC).strftime("%Y-%m-%d %H:%M")}
    try:
        lscpu = subprocess.run(["lscpu"], capture_output=True, text=True, check=True).stdout
        keep = ("Model name", "CPU(s):", "Thread(s) per core", "L2 cache", "L3 cache", "Flags")
        info["lscpu"] = {k.strip(): v.strip() for k, v in
                         (line.split(":", 1) for line in lscpu.splitlines() if ":" in line)
                         if k.strip().startswith(keep) and not k.strip().startswith("Flags")}
    except (OSError, subprocess.CalledProcessError):
        pass
    return info


def run(shapes, repeats: int, ops, modes, layer_shape, policies: bool = True) -> dict:
    rows = []
    key = jax.random.key(0)
    for shape in shapes:
        for dname, dtype in DTYPES.items():
            x = jax.random.normal(jax.random.key(1), shape, jnp.float32).astype(dtype)
            ct = (jax.random.normal(jax.random.key(2), shape, jnp.float32) * 0.5).astype(dtype)
            c = shape[-1]
            scale, bias = jnp.full((c,), 1.5, jnp.float32), jnp.full((c,), 0.1, jnp.float32)
            args = (x, scale, bias, ct, jax.random.key(3))
            copy_t = statistics.median(time_interleaved({"copy": _copy}, args, repeats)["copy"])
            for op in ops:
                layers = _dropout_layers() if op == "dropout" else _batch_norm_layers(c, dtype)
                for mode in modes:
                    fns = {name: _modes(layer, op)[mode] for name, layer in layers.items()
                           if name in MAIN or (policies and (
                               name in BIT_VARIANTS or (name in POLICIES and mode != "fwd")))}
                    fns["copy"] = _copy
                    times = time_interleaved(fns, args, repeats)
                    copy_t = min(copy_t, statistics.median(times["copy"]))
                    for name in (n for n in layers if n in fns):
                        med = statistics.median(times[name])
                        ratio_linen = statistics.median(
                            a / b for a, b in zip(times["flax.linen"], times[name], strict=True))
                        ratio_nnx = statistics.median(
                            a / b for a, b in zip(times["flax.nnx"], times[name], strict=True))
                        passes = FLOOR_PASSES.get((op, mode))
                        floor = None if passes is None else passes / 2 * copy_t
                        rows.append({
                            "op": op, "mode": mode, "shape": list(shape), "dtype": dname,
                            "impl": name, "ms": med * 1e3, "min_ms": min(times[name]) * 1e3,
                            "linen_over_this": ratio_linen, "nnx_over_this": ratio_nnx,
                            "floor_ms": None if floor is None else floor * 1e3,
                            "floor_fraction": None if floor is None else floor / med,
                        })
                        print(f"{op:10s} {mode:4s} {str(shape):20s} {dname:4s} {name:10s} "
                              f"{med * 1e3:9.3f} ms  linen/this {ratio_linen:5.2f}  "
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
            layers = _dropout_layers() if op == "dropout" else _batch_norm_layers(c, dtype)
            for name, layer in layers.items():
                if op == "dropout":
                    b = residual_bytes_per_element(lambda x, f=layer: f(x, None, None, key), x)
                else:
                    b = residual_bytes_per_element(lambda *a, f=layer: f(*a, key), x, scale,
                                                   bias)
                residuals.append({"op": op, "dtype": dname, "impl": name,
                                  "bytes_per_element": b, "shape": list(layer_shape)})
    return {"rows": rows, "residuals": residuals}


def _fmt(value) -> str:
    return "-" if value is None else f"{value:.3f}"


def markdown(result: dict) -> str:
    """The tables of BENCHMARKS.md from a ``--json`` result."""
    out = []
    rows = result["rows"]
    for op in ("dropout", "batch_norm"):
        cells = {(tuple(r["shape"]), r["dtype"], r["mode"], r["impl"]): r
                 for r in rows if r["op"] == op}
        if not cells:
            continue
        out += [f"### {op}" + (f" (rate {result['rate']})" if op == "dropout" else " (train)"),
                "",
                "| shape | dtype | mode | dropnorm ms | flax.linen ms | flax.nnx ms "
                "| linen / dropnorm | nnx / dropnorm | floor % dropnorm | floor % linen |",
                "|---|---|---|---:|---:|---:|---:|---:|---:|---:|"]
        keys = sorted({k[:3] for k in cells}, key=lambda k: (
            [tuple(r["shape"]) for r in rows].index(k[0]), k[1] != "f32",
            ["fwd", "vjp", "loss"].index(k[2])))
        for shape, dtype, mode in keys:
            ours = cells[(shape, dtype, mode, "dropnorm")]
            lin = cells[(shape, dtype, mode, "flax.linen")]
            nx = cells[(shape, dtype, mode, "flax.nnx")]

            def pct(r):
                return "" if r["floor_fraction"] is None else f"{100 * r['floor_fraction']:.0f}"

            out.append(f"| {shape} | {dtype} | {mode} | {ours['ms']:.2f} | {lin['ms']:.2f} "
                       f"| {nx['ms']:.2f} | **{ours['linen_over_this']:.2f}** "
                       f"| {ours['nnx_over_this']:.2f} | {pct(ours)} | {pct(lin)} |")
        out.append("")
    pol = {(tuple(r["shape"]), r["dtype"], r["mode"], r["impl"]): r
           for r in rows if r["op"] == "dropout" and r["mode"] != "fwd"}
    if any(k[3] == "packed bits" for k in pol):
        out += ["### dropout backward-pass memory policy (ms; same masks)", "",
                "| shape | dtype | mode | regenerate from the key (dropnorm) | packed bits "
                "| bool mask | packed / regenerate | bool / regenerate |",
                "|---|---|---|---:|---:|---:|---:|---:|"]
        for shape, dtype, mode in sorted({k[:3] for k in pol}, key=lambda k: (
                [tuple(r["shape"]) for r in rows].index(k[0]), k[1] != "f32", k[2] != "vjp")):
            g, p, b = (pol[(shape, dtype, mode, n)] for n in ("dropnorm", "packed bits",
                                                               "bool mask"))
            out.append(f"| {shape} | {dtype} | {mode} | {g['ms']:.2f} | {p['ms']:.2f} "
                       f"| {b['ms']:.2f} | {g['linen_over_this'] / p['linen_over_this']:.2f} "
                       f"| {g['linen_over_this'] / b['linen_over_this']:.2f} |")
        out.append("")
    bit = {(tuple(r["shape"]), r["dtype"], r["mode"], r["impl"]): r
           for r in rows if r["op"] == "dropout"}
    if any(k[3] == "8-bit masks" for k in bit):
        out += [f"### dropout mask resolution (ms; dropnorm's default is {BITS} bits)", "",
                "| shape | dtype | mode | 8 bits | 16 bits | 32 bits | 8 / 16 | 32 / 16 |",
                "|---|---|---|---:|---:|---:|---:|---:|"]
        order = [tuple(r["shape"]) for r in rows]
        cells = sorted({k[:3] for k in bit if k[3] == "8-bit masks"}, key=lambda k: (
            order.index(k[0]), k[1] != "f32", ("fwd", "vjp", "loss").index(k[2])))
        for shape, dtype, mode in cells:
            e, d, t = (bit[(shape, dtype, mode, n)] for n in ("8-bit masks", "dropnorm",
                                                               "32-bit masks"))
            # ratios of times, from the per-round ratios to flax.linen (same rounds)
            out.append(f"| {shape} | {dtype} | {mode} | {e['ms']:.2f} | {d['ms']:.2f} "
                       f"| {t['ms']:.2f} | {d['linen_over_this'] / e['linen_over_this']:.2f} "
                       f"| {d['linen_over_this'] / t['linen_over_this']:.2f} |")
        out.append("")
    words = result.get("random_words")
    if words:
        out += [f"### random words: the raw bits of one {BITS}-bit mask (ms)", "",
                "| mask shape | 32-bit words | threefry (`jax.random.bits`) | dropnorm's hash "
                "| threefry / hash |", "|---|---:|---:|---:|---:|"]
        out += [f"| {tuple(w['shape'])} | {w['words']} | {w['threefry_ms']:.2f} "
                f"| {w['dropnorm_ms']:.2f} | {w['threefry_over_dropnorm']:.1f} |" for w in words]
        out.append("")
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
                       f"| {_fmt(res.get((op, dtype, 'packed bits')))} "
                       f"| {_fmt(res.get((op, dtype, 'bool mask')))} |")
        out.append("")
    t = result.get("twelve_layer")
    if t:
        out += ["### 12-layer bf16 training step, compiled temp memory", "",
                f"Batch {t['batch']}, width {t['width']}: dropnorm "
                f"{t['dropnorm_temp_bytes'] / 2**20:.2f} MiB, flax.linen "
                f"{t['flax_temp_bytes'] / 2**20:.2f} MiB, ratio **{t['ratio']:.3f}**.", ""]
    return "\n".join(out)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--quick", action="store_true", help="small shapes, few repeats")
    parser.add_argument("--json", metavar="PATH", help="write every number to this file")
    parser.add_argument("--repeats", type=int, default=None, help="rounds per cell")
    parser.add_argument("--modes", default="fwd,vjp,loss", help="comma-separated subset")
    parser.add_argument("--ops", default="dropout,batch_norm", help="comma-separated subset")
    parser.add_argument("--markdown", metavar="JSON",
                        help="print the BENCHMARKS.md tables of an earlier --json run and exit")
    args = parser.parse_args(argv)
    if args.markdown:
        with open(args.markdown) as f:
            print(markdown(json.load(f)))
        return 0
    shapes = QUICK_SHAPES if args.quick else FULL_SHAPES
    repeats = args.repeats or (3 if args.quick else 7)
    ops, modes = args.ops.split(","), args.modes.split(",")
    t0 = time.perf_counter()
    info = machine()
    print(json.dumps({k: v for k, v in info.items() if k != "lscpu"}))
    # --quick leaves out the two alternative dropout memory policies (to stay under a minute)
    result = run(shapes, repeats, ops, modes, layer_shape=(256, 64), policies=not args.quick)
    if "dropout" in ops:
        result["random_words"] = time_random_words(shapes, repeats)
    batch, width = (256, 128) if args.quick else (512, 256)
    flax_t = twelve_layer_temp_bytes(nn.BatchNorm, nn.Dropout, batch, width)
    ours_t = twelve_layer_temp_bytes(dl.BatchNorm, dl.Dropout, batch, width)
    result["twelve_layer"] = {"batch": batch, "width": width, "flax_temp_bytes": flax_t,
                              "dropnorm_temp_bytes": ours_t, "ratio": ours_t / flax_t}
    print(f"12-layer bf16 step temp memory: dropnorm {ours_t / 2**20:.2f} MiB, "
          f"flax {flax_t / 2**20:.2f} MiB, ratio {ours_t / flax_t:.3f}")
    for r in result["residuals"]:
        print(f"residual {r['op']:10s} {r['dtype']:4s} {r['impl']:10s} "
              f"{r['bytes_per_element']:.3f} bytes/element")
    result.update(machine=info, quick=args.quick, repeats=repeats, rate=RATE,
                  seconds=time.perf_counter() - t0)
    print(f"total {result['seconds']:.1f} s")
    if args.json:
        with open(args.json, "w") as f:
            json.dump(result, f, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
