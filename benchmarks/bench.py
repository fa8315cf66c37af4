"""dropnorm against flax.linen and flax.nnx: time, fraction of the memory floor, residual bytes.

Run from the repository root::

    python benchmarks/bench.py            # everything (30-60 minutes on 2 cores; see below)
    python benchmarks/bench.py --quick    # small shapes, few repeats, tiny steps table (minutes)
    python benchmarks/bench.py --scale    # only the scale table (about 5 minutes)
    python benchmarks/bench.py --steps    # only the steps table (about 5 minutes)
    python benchmarks/bench.py --json out.json
    python benchmarks/bench.py --markdown out.json   # the tables of BENCHMARKS.md

The full run's length is mostly the layer grid's extra rounds (``--target-spread``): at load
average 5 the largest shapes' cells ran to the cap; ``--target-spread 0`` gives the fixed
7-round grid (about 10 minutes of the total).

What is timed (one jitted function per cell, inputs already on the device):

* ``fwd``: the layer's forward pass in training mode (dropout at rate 0.1; batch norm
  with batch statistics), output ``y``.
* ``vjp``: forward and backward through ``jax.vjp`` with an explicit cotangent; returns
  ``y`` and every input gradient (``dx``, and ``dscale``, ``dbias`` for batch norm).
  This is the per-layer cost inside a training step.
* ``loss``: ``jax.value_and_grad`` of ``sum(y**2)`` (in float32), the measure the issue
  used; it adds a reduction of ``y`` to a scalar.
* ``eval`` (batch norm only: dropout's eval mode returns ``x``): the forward pass with the
  running statistics (``batch_norm(..., train=False)``, ``use_running_average=True``),
  which are arguments of the jitted function (mean about 0.5, variance 0.25 to 4, so
  nothing folds to the identity). Its floor is 2 passes (read x, write y).

Contenders run interleaved (one call of each per round) and every time is the median
over rounds; the ratio to Flax (``linen/this``, ``nnx/this``, and the ratio columns of the
tables) is the median of the per-round ratios, not the quotient of the two median times:
it cancels drift that hits both contenders of a round. Its ``spread`` is the width of a
distribution-free 95% interval for that median over the median: the rounds' ratios, sorted,
from the k-th smallest to the k-th largest, with k the largest for which the pair brackets
the true median with probability ``1 - 2 P(Binomial(n, 1/2) < k) >= 95%`` (with 7 rounds:
min to max, 98.4%; 21 rounds: the 6th to the 16th, 97.3%; under 6 rounds no pair reaches
95% and min to max is used). It is about how far two runs with this run's round-to-round
noise can read apart; it does not cover a change of load between runs (``uptime``, recorded,
does). A spread below 10%: the 95% interval of the cell's ratio is narrower than a tenth
of the ratio. Full runs give a cell whose spread to flax.linen (the issue's reference) is
above ``--target-spread`` (10%) ``--repeats`` more rounds at a time, up to ``--max-repeats``
(3 x ``--repeats`` in the layer grid: 21, where the interval is the 6th to the 16th ratio;
5 x in the steps table, whose calls are short); ``rounds`` says how many it got. The
quotient of the medians is printed beside it ("of medians", and a column of the batch-norm
and dropout tables);
with few rounds (``--quick``: 3) on a busy CPU the two can differ widely, and a cell
where they disagree is not reliable. The run prints this at its top.
``copy`` is ``x * 2``: its bandwidth (2 passes over ``x``) sets the memory floor,
``passes * x.nbytes / bandwidth``, with passes = 2 (dropout fwd), 4 (dropout vjp: read x,
write y, read dy, write dx), 3 (batch norm fwd: statistics, read x, write y) and 8 (batch
norm vjp). ``floor%`` is floor time over the median measured time (100% = at the floor).

The scale table (full runs and ``--scale``; ``--quick`` leaves it out) compiles one
BatchNorm layer with ``axis_name`` (256 features) under ``shard_map``, ``pmap`` and ``vmap``
on 8 and 64 simulated CPU devices, each device count in its own subprocess with its own
``XLA_FLAGS``, and reads the collectives from the optimised HLO: how many, and their operand
bytes per device (exact, whatever the load), dropnorm against ``flax.linen.BatchNorm``.
It also times trace+compile (medians of fresh compiles, caches cleared) of that layer, of a
small ResNet ``pmap`` train step in the layout of Flax's ImageNet example (15 BatchNorm
layers with ``axis_name``, 8 devices), and of the 12-layer step below.

The steps table (full runs, ``--steps`` alone, and a tiny one in ``--quick``): one jitted
training step with the optax update, on one device, of three models built from flax.linen
modules, once with Flax's BatchNorm / Dropout and once with dropnorm's (same variables, same
arguments): the 12-layer bf16 MLP below (SGD with momentum), a small ResNet (3 stages of 2
blocks, 15 BatchNorm, batch 16 of 32x32x3, width 8, SGD with momentum) and 2 pre-LN
Transformer blocks in the layout of Flax's WMT example (residual dropout, dropout in the MLP
and attention dropout with ``broadcast_dropout=False``; Flax's
``MultiHeadDotProductAttention`` with ``dropout_rate`` against the same module with
``attention_fn=dropnorm.dot_product_attention``; AdamW). Step time: ratio Flax / dropnorm,
21 rounds or more, with its spread; trace+compile time (:func:`time_trace_compile`):
dropnorm / Flax, trace+lower and compile reported apart. The issue's targets are printed
beside them (MLP >= 1.1x, ResNet >= 1.0x, Transformer >= 1.15x; trace+compile <= 1.15x).

The attention table (full runs and ``--attention`` alone; ``--attention --quick``: lengths
64 and 128, 3 rounds): one pre-LN Transformer block (4 heads of 16, batch 2, attention
dropout 0.1 with ``broadcast_dropout=False``, Adam) at lengths 512 and 2048, its jitted train
step's compiled temp memory (exact) and time per step, Flax's ``dot_product_attention``
against ``attention_fn=dropnorm.dot_product_attention`` (issue 15: temp memory <= 0.5x Flax's
at 2048, time no slower), beside dropnorm's in one pass, in other chunk sizes, and the
obvious version (Flax's weights, ``dropnorm.dropout``, the value einsum).

Full runs also time dropnorm's dropout with the two other backward-pass memory policies
(keeping a bit-packed or a bool mask instead of regenerating it from the key) and with
32-bit masks instead of the default 16 (8-bit masks were removed after run 9 measured them
1.3-1.7x slower than 16 bits in the forward pass); ``--quick`` leaves these out.

Residual bytes per element are the arrays the ``jax.vjp`` closure holds (what reverse mode
keeps for the backward pass). The 12-layer figure is the compiled temp memory
(``jit(...).lower(...).compile().memory_analysis()``) of a bf16 training step of
Dense -> BatchNorm -> relu -> Dropout, 12 times, built from flax.linen modules, with
dropnorm's linen shells swapped in for BatchNorm and Dropout.
"""

from __future__ import annotations

import argparse
import datetime
import functools
import json
import math
import os
import platform
import re
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
                ("batch_norm", "fwd"): 3, ("batch_norm", "vjp"): 8, ("batch_norm", "eval"): 2}
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
            "packed bits": _dropout_packed, "bool mask": _dropout_bool,
            "32-bit masks": bits(32)}


# Contenders beside the main three, timed in full runs only (--quick leaves them out).
POLICIES = ("packed bits", "bool mask")  # backward-pass memory policies: vjp and loss only
BIT_VARIANTS = ("32-bit masks",)  # the other mask resolution: every mode
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


def time_interleaved(fns: dict[str, Callable], args, repeats: int,
                     more: Callable[[dict[str, list[float]]], bool] | None = None,
                     max_repeats: int | None = None) -> dict[str, list[float]]:
    """Seconds per call of each function, ``repeats`` rounds, one call of each per round.

    ``more``: when given, after the rounds so far it is asked ``more(times)``; while it says
    True, up to ``repeats`` further rounds run, ``max_repeats`` rounds in all (the spread
    target: :func:`spread_above`).
    """
    compiled = {}
    for name, f in fns.items():
        c = jax.jit(f).lower(*args).compile()
        _block(c(*args))  # warm up: allocations, thread pools
        compiled[name] = c
    times: dict[str, list[float]] = {name: [] for name in fns}

    def rounds(k):
        for _ in range(k):
            for name, c in compiled.items():
                t0 = time.perf_counter()
                _block(c(*args))
                times[name].append(time.perf_counter() - t0)

    rounds(repeats)
    done = repeats
    while more is not None and max_repeats is not None and done < max_repeats and more(times):
        rounds(min(repeats, max_repeats - done))
        done = min(done + repeats, max_repeats)
    return times


SPREAD_LEVEL = 0.95  # the coverage of the interval behind the spread statistic


def median_interval(values, level: float = SPREAD_LEVEL) -> tuple[float, float, float]:
    """A distribution-free interval for the median of ``values``: ``(lo, hi, coverage)``.

    Of n independent draws, sorted, the k-th smallest and the k-th largest bracket the true
    median with probability ``1 - 2 P(B <= k - 1)``, ``B ~ Binomial(n, 1/2)``, whatever the
    distribution of the draws; k is the largest for which that is at least ``level``. Below
    6 draws no pair reaches 95%: the interval is then (min, max) and ``coverage`` says what
    it is (75% for 3 rounds, 93.75% for 5; 98.4% for 7, where (min, max) is the interval).
    """
    v = sorted(values)
    n = len(v)

    def coverage(k):
        return 1 - 2 * sum(math.comb(n, i) for i in range(k)) / 2**n

    k = 1
    while k < (n + 1) // 2 and coverage(k + 1) >= level:
        k += 1
    return v[k - 1], v[n - k], coverage(k)


def ratio_stats(num: list[float], den: list[float]) -> dict:
    """The median of the per-round ratios ``num[i] / den[i]``, and its spread.

    ``spread`` is the width of :func:`median_interval` (``lo`` to ``hi``) over the median:
    two runs whose rounds vary the way this one's did land within it of each other (each
    run's median lies in the interval with probability ``coverage``). It measures the
    round-to-round noise of one run, not a change of load between runs (``uptime`` records
    that).
    """
    r = [a / b for a, b in zip(num, den, strict=True)]
    med = statistics.median(r)
    lo, hi, cov = median_interval(r)
    return {"ratio": med, "lo": lo, "hi": hi, "coverage": cov,
            "spread": (hi - lo) / med if len(r) > 1 else None, "rounds": len(r)}


def spread_above(target: float | None, pairs) -> Callable[[dict], bool] | None:
    """``more`` for :func:`time_interleaved`: True while the spread of a ratio of ``pairs``
    (``(numerator name, denominator name)``) is above ``target`` (None: never)."""
    if target is None:
        return None
    def more(t):
        spreads = [ratio_stats(t[a], t[b])["spread"] for a, b in pairs]
        return any(s is None or s > target for s in spreads)

    return more


def _pct(value) -> str:
    """A spread as a percentage, ``-`` where there is none (a single round)."""
    return "-" if value is None else f"{100 * value:.1f}%"


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
    step, args = twelve_layer_step(bn, dropout, batch, width)
    compiled = jax.jit(step).lower(*args).compile()
    return int(compiled.memory_analysis().temp_size_in_bytes)


# --- scale: collectives across devices, trace+compile time --------------------------------
#
# What crosses devices is read from the compiled program, so it is exact and independent of
# the load on the machine: every collective instruction of the optimised HLO (after XLA's
# all-reduce combiner, which may merge several psums into one tuple-shaped all-reduce) and
# the bytes of its operands. The scale table runs in a subprocess per device count, because
# XLA_FLAGS (--xla_force_host_platform_device_count) is read once, when JAX starts.

COLLECTIVES = ("all-reduce", "all-gather", "reduce-scatter", "collective-permute", "all-to-all")
SCALE_DEVICES = (8, 64)
SCALE_FEATURES = 256
SCALE_PER_DEVICE = 4  # examples per device in the layer probes
_DTYPE_BYTES = {"pred": 1, "s8": 1, "u8": 1, "s16": 2, "u16": 2, "f16": 2, "bf16": 2,
                "s32": 4, "u32": 4, "f32": 4, "s64": 8, "u64": 8, "f64": 8, "c64": 8,
                "c128": 16}
_ARRAY = re.compile(r"\b(" + "|".join(_DTYPE_BYTES) + r")\[([0-9,]*)\]")
_INSTR = re.compile(r"^\s*(?:ROOT\s+)?%?([\w.\-]+)\s*=\s*(.*?)\s+([a-z][\w\-]*)\((.*)$")


def _shape_bytes(shape: str) -> int:
    """Bytes of an HLO shape string (an array, or a tuple of arrays): ``f32[2,256]{1,0}``."""
    return sum(_DTYPE_BYTES[dt] * math.prod(int(d) for d in dims.split(",") if d)
               for dt, dims in _ARRAY.findall(shape))


def hlo_collectives(hlo_text: str) -> list[tuple[str, int]]:
    """``(opcode, operand bytes)`` of every cross-device collective in an HLO module's text.

    ``hlo_text`` is ``jax.jit(f).lower(...).compile().as_text()`` (the optimised module). Async
    pairs (``all-reduce-start`` / ``-done``, as GPU backends emit) count once, at the start.
    Operand shapes are looked up by name, so an all-gather's bytes are what each device sends.
    """
    shapes, found = {}, []
    for line in hlo_text.splitlines():
        m = _INSTR.match(line)
        if not m:
            continue
        name, shape, op, rest = m.groups()
        shapes[name] = shape
        base = op.removesuffix("-start")
        if base in COLLECTIVES and not op.endswith("-done"):
            args = rest.split(")", 1)[0]
            names = [a.strip().split()[-1].lstrip("%") for a in args.split(",") if a.strip()]
            found.append((base, sum(_shape_bytes(shapes.get(a, "")) for a in names)))
    return found


def _compiled(lower: Callable) -> tuple[object, dict[str, float]]:
    """``lower()`` then compile: the compiled function and the seconds each took.

    ``lower_s``, ``compile_s``: wall-clock; ``lower_cpu_s``, ``compile_cpu_s``: CPU time of
    this process (every thread: XLA compiles on several). On a loaded CPU the CPU time
    moved about as much as the wall-clock (BENCHMARKS.md), so neither replaces a quiet
    machine.
    """
    t0, c0 = time.perf_counter(), time.process_time()
    lowered = lower()
    t1, c1 = time.perf_counter(), time.process_time()
    compiled = lowered.compile()
    t2, c2 = time.perf_counter(), time.process_time()
    return compiled, {"lower_s": t1 - t0, "compile_s": t2 - t1,
                      "lower_cpu_s": c1 - c0, "compile_cpu_s": c2 - c1}


def _probe(lower: Callable) -> dict:
    compiled, times = _compiled(lower)
    ops = hlo_collectives(compiled.as_text())
    return {"count": len(ops), "bytes": sum(b for _, b in ops), "ops": ops, **times}


def _groups(n: int, g: int) -> list[list[int]]:
    """``g`` groups of unequal sizes covering ``n`` devices: one of size 1, the rest even."""
    rest = np.array_split(np.arange(1, n), g - 1)
    return [[0]] + [[int(i) for i in r] for r in rest]


@functools.cache
def _flax_bn_variables(features: int) -> dict:
    return nn.BatchNorm(use_running_average=False).init(jax.random.key(0),
                                                        jnp.ones((2, features)))


def _bn_layers(features: int, groups=None, mask=False, ghost=None) -> dict[str, tuple]:
    """name -> (layer(p, s, x, m) -> (y, new_stats), params, stats), with ``axis_name="b"``.

    ``ghost``: dropnorm's ``virtual_batch_size`` (Flax has no ghost batches: dropnorm only).
    """
    p, s = dropnorm.batch_norm_init(features)

    def ours(p, s, x, m):
        return dropnorm.batch_norm(p, s, x, True, axis_name="b", axis_index_groups=groups,
                                   mask=m if mask else None, virtual_batch_size=ghost)

    if ghost is not None:
        return {"dropnorm": (ours, p, s)}

    lin = nn.BatchNorm(use_running_average=False, axis_name="b", axis_index_groups=groups)
    fv = _flax_bn_variables(features)  # the same variables whatever axis_name and groups

    def theirs(p, s, x, m):
        y, upd = lin.apply({"params": p, "batch_stats": s}, x, mask=m if mask else None,
                           mutable=["batch_stats"])
        return y, upd["batch_stats"]

    return {"dropnorm": (ours, p, s), "flax": (theirs, fv["params"], fv["batch_stats"])}


def _fwd_bwd(layer: Callable) -> Callable:
    """Forward and backward of one layer: gradients of ``sum(y * ct)`` w.r.t. params and x."""
    def f(p, s, x, m, ct):
        def loss(p, x):
            y, ns = layer(p, s, x, m)
            return jnp.sum(y.astype(jnp.float32) * ct), ns

        (_, ns), g = jax.value_and_grad(loss, (0, 1), has_aux=True)(p, x)
        return g, ns

    return f


def _stack_state(f: Callable) -> Callable:
    """``f`` with its new state given a leading axis, to leave ``shard_map`` as ``P("b")``."""
    def g(*a):
        out, ns = f(*a)
        return out, jax.tree.map(lambda v: v[None], ns)

    return g


def scale_layers(n: int, features: int = SCALE_FEATURES, reps: int = 1, only=None) -> dict:
    """Collectives and trace+compile time of one BatchNorm layer with ``axis_name`` on n devices.

    Under ``shard_map`` (batch split over a 1-D mesh "b"), ``pmap`` (one example block per
    device) and ``jax.vmap(..., axis_name="b")`` (n lanes on one device); ``fwd`` is the layer
    in training mode, ``fwd+bwd`` adds the gradients w.r.t. params and x. Variants: ``mask``
    (a padding mask), ``groups=g`` (``axis_index_groups``, g unequal groups; Flax supports
    those under ``pmap`` only), ``ghost=2 devices`` (``virtual_batch_size`` twice the local
    batch; dropnorm only). Times are medians of ``reps`` fresh traces and compiles.
    ``only``: None for every cell, or a collection of ``(transform, variant, mode)`` to probe.
    """
    from jax.sharding import Mesh
    from jax.sharding import PartitionSpec as P

    assert jax.device_count() >= n, (jax.device_count(), n)
    mesh = Mesh(np.array(jax.devices()[:n]), ("b",))
    b = SCALE_PER_DEVICE
    x = jnp.asarray(np.random.default_rng(0).standard_normal((n * b, features), np.float32))
    m = jnp.arange(n * b)[:, None] % 3 != 0  # a third of the rows padded, unevenly per device
    m = jnp.broadcast_to(m, x.shape)
    ct = jnp.ones_like(x)
    variants = {"plain": {}, "mask": {"mask": True}}
    variants |= {f"groups={g}": {"groups": _groups(n, g)} for g in (2, 4)}
    variants["ghost=2 devices"] = {"ghost": 2 * b}  # each ghost batch spans 2 devices
    out = []

    def record(transform, variant, impl, mode, lower):
        if only is not None and (transform, variant, mode) not in only:
            return
        cells = []
        for _ in range(reps):
            jax.clear_caches()  # every repetition traces and compiles afresh
            cells.append(_probe(lower))
        c = dict(cells[0])
        for k in ("lower_s", "compile_s", "lower_cpu_s", "compile_cpu_s"):
            c[k] = statistics.median(x[k] for x in cells)
        out.append({"devices": n, "transform": transform, "variant": variant, "impl": impl,
                    "mode": mode, **c})

    shp = (n, b, features)
    for variant, kw in variants.items():
        if only is not None and not any(v == variant for _, v, _ in only):
            continue
        for impl, (layer, p, s) in _bn_layers(features, **kw).items():
            grouped = "groups" in kw
            flat, mapped = (p, s, x, m, ct), (p, s, x.reshape(shp), m.reshape(shp),
                                              ct.reshape(shp))
            for mode in ("fwd", "fwd+bwd"):
                f = (lambda p, s, x, m, ct, g=layer: g(p, s, x, m)) if mode == "fwd" else \
                    _fwd_bwd(layer)
                if not (grouped and impl == "flax"):  # JAX: no grouped psum in shard_map
                    st = P() if not grouped else P("b")  # per-group statistics vary
                    sm = jax.shard_map(
                        _stack_state(f) if grouped else f, mesh=mesh,
                        in_specs=(P(), P(), P("b"), P("b"), P("b")),
                        out_specs=(P("b"), st) if mode == "fwd" else ((P(), P("b")), st))
                    record("shard_map", variant, impl, mode,
                           functools.partial(lambda sm, a: jax.jit(sm).lower(*a), sm, flat))
                pm = jax.pmap(f, axis_name="b", in_axes=(None, None, 0, 0, 0))
                record("pmap", variant, impl, mode,
                       functools.partial(lambda pm, a: pm.lower(*a), pm, mapped))
                if not grouped and "ghost" not in kw:
                    vm = jax.vmap(f, in_axes=(None, None, 0, 0, 0), axis_name="b",
                                  out_axes=(0, None) if mode == "fwd" else ((0, 0), None))
                    record("vmap", variant, impl, mode,
                           functools.partial(lambda vm, a: jax.jit(vm).lower(*a), vm, mapped))
    return {"devices": n, "features": features, "per_device": b, "layers": out}


class _Block(nn.Module):
    """The basic residual block of Flax's ImageNet example (``ResNetBlock``)."""
    filters: int
    norm: Callable
    strides: tuple[int, int] = (1, 1)

    @nn.compact
    def __call__(self, x):
        conv = functools.partial(nn.Conv, use_bias=False)
        y = nn.relu(self.norm()(conv(self.filters, (3, 3), self.strides)(x)))
        y = self.norm(scale_init=nn.initializers.zeros)(conv(self.filters, (3, 3))(y))
        if x.shape != y.shape:
            x = self.norm()(conv(self.filters, (1, 1), self.strides)(x))
        return nn.relu(x + y)


class _ResNet(nn.Module):
    """A small ResNet in the layout of Flax's ImageNet example: 3 stages of 2 blocks, 15 BN."""
    bn: type
    stages: tuple[int, ...] = (2, 2, 2)
    width: int = 16
    classes: int = 10
    axis_name: str | None = "batch"  # None: one device, under jit (the steps table)

    @nn.compact
    def __call__(self, x, train: bool):
        norm = functools.partial(self.bn, use_running_average=not train, momentum=0.9,
                                 epsilon=1e-5, axis_name=self.axis_name)
        x = nn.relu(norm()(nn.Conv(self.width, (3, 3), use_bias=False)(x)))
        for i, blocks in enumerate(self.stages):
            for j in range(blocks):
                x = _Block(self.width * 2**i, norm, (2, 2) if i > 0 and j == 0 else (1, 1))(x)
        return nn.Dense(self.classes)(jnp.mean(x, axis=(1, 2)))


def resnet_pmap_step(bn: type, devices: int, per_device: int = 8, size: int = 32):
    """A ``pmap`` train step of :class:`_ResNet` as Flax's ImageNet example writes it.

    Cross-entropy, gradients averaged with ``lax.pmean(..., "batch")``, SGD with momentum;
    BatchNorm with ``axis_name="batch"``. Returns ``(lower, args)``: ``lower()`` traces and
    lowers a fresh ``jax.pmap`` of the step.
    """
    import optax

    net = _ResNet(bn)
    x = jnp.ones((devices, per_device, size, size, 3))
    y = jnp.zeros((devices, per_device), jnp.int32)
    variables = jax.jit(net.init, static_argnums=2)(jax.random.key(0), x[0], False)
    tx = optax.sgd(0.1, momentum=0.9)
    rep = jax.tree.map(lambda a: jnp.broadcast_to(a, (devices,) + a.shape), variables)
    opt = jax.tree.map(lambda a: jnp.broadcast_to(a, (devices,) + a.shape),
                       tx.init(variables["params"]))

    def step(params, stats, opt_state, x, y):
        def loss_fn(p):
            logits, upd = net.apply({"params": p, "batch_stats": stats}, x, True,
                                    mutable=["batch_stats"])
            return optax.softmax_cross_entropy_with_integer_labels(logits, y).mean(), upd

        (loss, upd), grads = jax.value_and_grad(loss_fn, has_aux=True)(params)
        grads = jax.lax.pmean(grads, "batch")
        updates, opt_state = tx.update(grads, opt_state, params)
        return optax.apply_updates(params, updates), upd["batch_stats"], opt_state, loss

    args = (rep["params"], rep["batch_stats"], opt, x, y)
    return (lambda: jax.pmap(lambda *a: step(*a), axis_name="batch").lower(*args)), args


def twelve_layer_step(bn, dropout, batch: int, width: int, tx=None, depth: int = 12):
    """The benchmark's 12-layer bf16 training step: ``(step, args)``, ``step`` not yet jitted.

    Without ``tx`` the step returns the loss, the gradients and the new statistics (the
    memory and trace+compile figures); with an optax ``tx`` it applies the update and
    returns ``(params, batch_stats, opt_state, loss)`` (the steps table).
    """
    net = _Net(bn, dropout, width, depth)
    x = (jnp.ones((batch, width), jnp.bfloat16) if tx is None else
         jnp.asarray(np.random.default_rng(6).standard_normal((batch, width)), jnp.bfloat16))
    variables = net.init({"params": jax.random.key(0)}, x, False)

    def loss(p, stats, x, key):
        y, upd = net.apply({"params": p, "batch_stats": stats}, x, True,
                           rngs={"dropout": key}, mutable=["batch_stats"])
        return jnp.mean(jnp.square(y.astype(jnp.float32))), upd

    def step(params, stats, x, key):
        (value, upd), grads = jax.value_and_grad(loss, has_aux=True)(params, stats, x, key)
        return value, grads, upd

    if tx is None:
        return step, (variables["params"], variables["batch_stats"], x, jax.random.key(1))

    import optax

    def train_step(params, stats, opt_state, x, key):
        (value, upd), grads = jax.value_and_grad(loss, has_aux=True)(params, stats, x, key)
        updates, opt_state = tx.update(grads, opt_state, params)
        return optax.apply_updates(params, updates), upd["batch_stats"], opt_state, value

    params = variables["params"]
    return train_step, (params, variables["batch_stats"], tx.init(params), x,
                        jax.random.key(1))


def time_trace_compile(lowers: dict[str, Callable], reps: int) -> dict[str, dict]:
    """Seconds to trace+lower and to compile each function, ``reps`` rounds, interleaved.

    Each round clears JAX's caches and builds a fresh ``jit``/``pmap``, so every round pays
    the whole trace and compile. Reported: the median of each over the rounds, and the
    median total (trace+lower+compile of the same round), in wall-clock and CPU seconds.
    """
    keys = ("lower_s", "compile_s", "total_s", "lower_cpu_s", "compile_cpu_s", "total_cpu_s")
    times = {name: {k: [] for k in keys} for name in lowers}
    for _ in range(reps):
        for name, lower in lowers.items():
            jax.clear_caches()
            _, t = _compiled(lower)
            t["total_s"] = t["lower_s"] + t["compile_s"]
            t["total_cpu_s"] = t["lower_cpu_s"] + t["compile_cpu_s"]
            for k in keys:
                times[name][k].append(t[k])
    return {name: {k + "_median": statistics.median(v) for k, v in t.items()} | t
            for name, t in times.items()}


def scale_models(reps: int, devices: int = 8) -> dict:
    """Trace+compile time: the ResNet ``pmap`` step and the 12-layer step, dropnorm vs Flax."""
    resnet = {"dropnorm": resnet_pmap_step(dl.BatchNorm, devices)[0],
              "flax": resnet_pmap_step(nn.BatchNorm, devices)[0]}
    twelve = {}
    for name, (bn, do) in {"dropnorm": (dl.BatchNorm, dl.Dropout),
                           "flax": (nn.BatchNorm, nn.Dropout)}.items():
        step, args = twelve_layer_step(bn, do, 512, 256)
        twelve[name] = lambda step=step, args=args: jax.jit(lambda *a: step(*a)).lower(*args)
    return {"devices": devices, "reps": reps,
            "resnet_pmap": time_trace_compile(resnet, reps),
            "twelve_layer": time_trace_compile(twelve, reps)}


# --- steps: whole training steps, dropnorm's layers against Flax's in the same model -------
#
# Each model is built from flax.linen modules twice, once with Flax's BatchNorm / Dropout
# (and attention dropout inside flax.linen.MultiHeadDotProductAttention) and once with
# dropnorm's; the variables are the same tree, so both steps run on the same arguments.

STEP_TARGETS = {"mlp": 1.1, "resnet": 1.0, "transformer": 1.15}  # Flax / dropnorm step time
COMPILE_TARGET = 1.15  # dropnorm / Flax trace+compile time, every model (issue 14)


class _EncoderBlock(nn.Module):
    """A pre-LN Transformer encoder block in the layout of Flax's WMT example
    (``Encoder1DBlock``: attention dropout with ``broadcast_dropout=False``, dropout after the
    attention, inside the MLP after the activation, and after the MLP)."""
    dropout: type
    attention_fn: Callable
    heads: int
    mlp: int

    @nn.compact
    def __call__(self, x, train: bool):
        det = not train
        h = nn.MultiHeadDotProductAttention(
            self.heads, dropout_rate=RATE, broadcast_dropout=False, deterministic=det,
            attention_fn=self.attention_fn)(nn.LayerNorm()(x))
        x = x + self.dropout(RATE, deterministic=det)(h)
        h = nn.relu(nn.Dense(self.mlp)(nn.LayerNorm()(x)))
        h = nn.Dense(x.shape[-1])(self.dropout(RATE, deterministic=det)(h))
        return x + self.dropout(RATE, deterministic=det)(h)


class _Transformer(nn.Module):
    """``layers`` encoder blocks, a final LayerNorm and a per-token classifier."""
    dropout: type
    attention_fn: Callable
    layers: int = 2
    heads: int = 4
    mlp: int = 256
    classes: int = 16

    @nn.compact
    def __call__(self, x, train: bool):
        for _ in range(self.layers):
            x = _EncoderBlock(self.dropout, self.attention_fn, self.heads, self.mlp)(x, train)
        return nn.Dense(self.classes)(nn.LayerNorm()(x))


def _classifier_step(net, x, y, tx, stats: bool, variables=None):
    """A jitted-later train step of ``net`` with cross-entropy and the optax ``tx``:
    ``(step, args)``; ``step(params, batch_stats, opt_state, x, y, key)`` returns the new
    params, statistics ({} without BatchNorm) and optimiser state, and the loss.
    ``variables``: ``net``'s, or None to initialise them (compiling the initialisers takes
    seconds on CPU: the second model of a pair takes the first one's)."""
    import optax

    rngs = {"params": jax.random.key(0), "dropout": jax.random.key(1)}
    if variables is None:
        variables = jax.jit(net.init, static_argnums=2)(rngs, x, False)
    shapes = jax.eval_shape(lambda r: net.init(r, x, False), rngs)
    assert jax.tree.structure(shapes) == jax.tree.structure(variables), type(net).__name__
    params, batch_stats = variables["params"], variables.get("batch_stats", {})

    def train_step(params, batch_stats, opt_state, x, y, key):
        def loss_fn(p):
            variables = {"params": p} | ({"batch_stats": batch_stats} if stats else {})
            logits, upd = net.apply(variables, x, True, rngs={"dropout": key},
                                    mutable=["batch_stats"] if stats else [])
            loss = optax.softmax_cross_entropy_with_integer_labels(logits, y).mean()
            return loss, upd.get("batch_stats", {})

        (loss, new_stats), grads = jax.value_and_grad(loss_fn, has_aux=True)(params)
        updates, opt_state = tx.update(grads, opt_state, params)
        return optax.apply_updates(params, updates), new_stats, opt_state, loss

    return train_step, (params, batch_stats, tx.init(params), x, y, jax.random.key(2))


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
    :class:`_ResNet` on one device (no ``axis_name``), cross-entropy, the same SGD;
    transformer: :class:`_Transformer` (pre-LN blocks, float32), cross-entropy per token,
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
    res = {"flax": _classifier_step(_ResNet(nn.BatchNorm, r["stages"], r["width"],
                                            axis_name=None), x, y, sgd, stats=True)}
    params, stats = res["flax"][1][:2]
    res["dropnorm"] = _classifier_step(_ResNet(dl.BatchNorm, r["stages"], r["width"],
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
    net = functools.partial(_Transformer, layers=t["layers"], heads=t["heads"], mlp=t["mlp"])
    tr = {"flax": _classifier_step(net(nn.Dropout, nn.dot_product_attention), x, y,
                                   optax.adamw(1e-3), stats=False)}
    tr["dropnorm"] = _classifier_step(net(dl.Dropout, attn), x, y, optax.adamw(1e-3),
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
    out = {"uptime_before": _load(), "repeats": repeats, "compile_reps": compile_reps,
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
    out["uptime_after"] = _load()
    return out


def _step_line(r: dict) -> str:
    o, f = r["compile"]["dropnorm"], r["compile"]["flax"]
    ok = r["flax_over_dropnorm"] >= r["step_target"]
    cok = r["compile_dropnorm_over_flax"] <= r["compile_target"]
    return (f"step {r['model']:12s} dropnorm {r['dropnorm_ms']:8.2f} ms  flax "
            f"{r['flax_ms']:8.2f} ms  flax/dropnorm {r['flax_over_dropnorm']:5.2f} (target "
            f">= {r['step_target']:.2f}: {'met' if ok else 'NOT met'}; spread "
            f"{_pct(r['step_spread'])}, {r['rounds']} rounds)  trace+compile dropnorm "
            f"{o['lower_s_median']:.2f}+{o['compile_s_median']:.2f} s, flax "
            f"{f['lower_s_median']:.2f}+{f['compile_s_median']:.2f} s, dropnorm/flax "
            f"{r['compile_dropnorm_over_flax']:5.2f} (target <= {r['compile_target']:.2f}: "
            f"{'met' if cok else 'NOT met'}; spread {_pct(r['compile_spread'])}; CPU seconds "
            f"{r['compile_cpu_dropnorm_over_flax']:5.2f}, spread "
            f"{_pct(r['compile_cpu_spread'])})")


def _load() -> str:
    """``uptime``'s line (the load average says how busy the shared CPU was)."""
    try:
        return subprocess.run(["uptime"], capture_output=True, text=True, check=True).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return "load average " + ", ".join(f"{v:.2f}" for v in os.getloadavg())


def run_scale(devices=SCALE_DEVICES, reps: int = 5, models: bool = True,
              timeout: float = 1800) -> dict:
    """The scale table: one subprocess per device count, each with its own ``XLA_FLAGS``.

    The ResNet ``pmap`` step and the 12-layer step are timed in the 8-device subprocess
    only (``models``). ``uptime`` is recorded before and after: the times are wall-clock
    on a shared CPU, the collective counts and bytes are exact.
    """
    out = {"uptime_before": _load(), "reps": reps, "runs": []}
    for n in devices:
        flags = re.sub(r"--xla_force_host_platform_device_count=\d+", "",
                       os.environ.get("XLA_FLAGS", ""))
        env = dict(os.environ, JAX_PLATFORMS="cpu",
                   XLA_FLAGS=f"{flags} --xla_force_host_platform_device_count={n}".strip())
        cmd = [sys.executable, os.path.abspath(__file__), "--scale-worker", str(n),
               "--repeats", str(reps)] + (["--models"] if models and n == min(devices) else [])
        proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=timeout)
        if proc.returncode:
            raise RuntimeError(f"scale worker ({n} devices) failed:\n{proc.stderr[-4000:]}")
        res = json.loads(proc.stdout.strip().splitlines()[-1])
        for c in res["layers"]:
            print(f"scale {n:3d} devices {c['transform']:9s} {c['variant']:8s} {c['mode']:7s} "
                  f"{c['impl']:8s} {c['count']} collectives {c['bytes']:9d} bytes  "
                  f"trace+compile {c['lower_s'] + c['compile_s']:6.3f} s "
                  f"({c['lower_cpu_s'] + c['compile_cpu_s']:6.3f} s CPU)", flush=True)
        for step in ("resnet_pmap", "twelve_layer"):
            for impl, t in res.get("models", {}).get(step, {}).items():
                print(f"scale {step:12s} {impl:8s} trace+lower {t['lower_s_median']:6.3f} s  "
                      f"compile {t['compile_s_median']:6.3f} s  total {t['total_s_median']:6.3f} s"
                      f"  CPU {t['total_cpu_s_median']:6.3f} s",
                      flush=True)
        out["runs"].append(res)
    out["uptime_after"] = _load()
    return out


def scale_worker(n: int, reps: int, models: bool) -> dict:
    """The body of one scale subprocess (``--scale-worker``): layers, then the models."""
    res = scale_layers(n, reps=min(reps, 3))  # counts and bytes are exact; times: median of 3
    if models:
        res["models"] = scale_models(reps, n)
    return res


# --- attention dropout (issue 15): a Transformer block's training step, two attentions ----
#
# One pre-LN Transformer block (LayerNorm -> flax.linen.MultiHeadDotProductAttention with
# attention dropout -> residual; LayerNorm -> MLP -> residual), jitted with its optax update.
# Contenders differ only in the block's attention_fn; they share the variables and the
# arguments. Compiled temp memory is exact (XLA's buffer assignment); times are medians over
# interleaved rounds (time_interleaved), ratios medians of per-round ratios.

ATTENTION_LENGTHS = {False: (512, 2048), True: (64, 128)}  # full runs; --quick
ATTENTION_TARGET = 0.5  # issue 15: temp memory <= 0.5x Flax's at length 2048, time no slower
ATTENTION_SWEEP = (32, 64, 128, 256, 512)  # query rows per chunk, beside the default and one
# pass (the ones below the length, other than the default)


class _AttentionBlock(nn.Module):
    """Pre-LN block: 4 heads of 16 (qkv_features 64), attention dropout RATE with
    ``broadcast_dropout=False`` (no other dropout), MLP 64 -> 256 -> 64."""
    attention_fn: Callable

    @nn.compact
    def __call__(self, x):
        h = nn.MultiHeadDotProductAttention(
            num_heads=4, qkv_features=64, dropout_rate=RATE, broadcast_dropout=False,
            deterministic=False, attention_fn=self.attention_fn)(nn.LayerNorm()(x))
        x = x + h
        h = nn.Dense(x.shape[-1])(nn.gelu(nn.Dense(256)(nn.LayerNorm()(x))))
        return x + h


def _obvious_attention(query, key, value, bias=None, mask=None, broadcast_dropout=True,
                       dropout_rng=None, dropout_rate=0.0, deterministic=False, dtype=None,
                       precision=None):
    """The obvious version (issue 15's baseline): Flax's weights, then dropnorm.dropout (mask
    regenerated, but the weights and dropped weights kept), then the value einsum."""
    w = nn.dot_product_attention_weights(query, key, bias, mask, deterministic=True,
                                         dtype=dtype, precision=precision)
    if not deterministic and dropout_rate > 0.0:
        dims = tuple(range(w.ndim - 2)) if broadcast_dropout else ()
        w = dropnorm.dropout(dropout_rng, w, dropout_rate, True, broadcast_dims=dims)
    return jnp.einsum("...hqk,...khd->...qhd", w, value, precision=precision)


def attention_contenders(length: int) -> dict[str, Callable]:
    """name -> attention_fn: Flax's, dropnorm's (default chunks), dropnorm's in one pass and
    in chunks of ATTENTION_SWEEP rows, and the obvious version."""
    ours = dropnorm.dot_product_attention
    default = _default_chunk_rows(length)
    fns = {"flax": nn.dot_product_attention, "dropnorm": ours,
           "obvious (flax weights + dropnorm.dropout)": _obvious_attention,
           f"dropnorm, one pass ({length} rows)": functools.partial(
               ours, query_chunk_size=length)}
    for rows in ATTENTION_SWEEP:
        if rows < length and rows != default:
            fns[f"dropnorm, chunks of {rows} rows"] = functools.partial(
                ours, query_chunk_size=rows)
    return fns


def attention_step(attention_fn: Callable, length: int, batch: int = 2, variables=None):
    """``(step, args)``: ``step(params, opt_state, x, key)`` is value_and_grad of the mean
    squared output of :class:`_AttentionBlock` and an Adam update."""
    import optax

    block, tx = _AttentionBlock(attention_fn), optax.adam(1e-3)
    x = jax.random.normal(jax.random.key(1), (batch, length, 64))
    if variables is None:
        variables = jax.jit(block.init)({"params": jax.random.key(0),
                                         "dropout": jax.random.key(0)}, x)

    def step(params, opt_state, x, key):
        def loss(p):
            return jnp.mean(block.apply(p, x, rngs={"dropout": key}) ** 2)

        value, grads = jax.value_and_grad(loss)(params)
        updates, opt_state = tx.update(grads, opt_state, params)
        return optax.apply_updates(params, updates), opt_state, value

    return step, (variables, tx.init(variables), x, jax.random.key(2))


def _default_chunk_rows(length: int, batch: int = 2, heads: int = 4) -> int:
    from dropnorm import _attention

    return min(length, max(1, _attention._CHUNK_ELEMENTS // (batch * heads * length)))


def run_attention(quick: bool = False, repeats: int = 7) -> dict:
    """The attention table: compiled temp memory and time per step, each contender against
    Flax's attention, at each of ATTENTION_LENGTHS; ``uptime`` before and after."""
    out = {"uptime_before": _load(), "repeats": repeats, "rate": RATE, "batch": 2,
           "heads": 4, "head_dim": 16, "target": ATTENTION_TARGET, "lengths": []}
    for length in ATTENTION_LENGTHS[quick]:
        fns = attention_contenders(length)
        steps = {}
        variables = None
        for name, fn in fns.items():
            steps[name], args = attention_step(fn, length, variables=variables)
            variables = args[0]
        temp = {name: jax.jit(s).lower(*args).compile().memory_analysis().temp_size_in_bytes
                for name, s in steps.items()}
        times = time_interleaved(steps, args, repeats)
        rows = []
        for name in steps:
            st = ratio_stats(times["flax"], times[name])
            rows.append({"impl": name, "temp_bytes": temp[name],
                         "temp_over_flax": temp[name] / temp["flax"],
                         "ms": statistics.median(times[name]) * 1e3,
                         "flax_over_this": st["ratio"], "spread": st["spread"],
                         "interval": [st["lo"], st["hi"]], "rounds": st["rounds"],
                         "coverage": st["coverage"]})
            r = rows[-1]
            print(f"attention L={length:5d} {name:42s} temp {r['temp_bytes'] / 1e6:8.1f} MB "
                  f"({r['temp_over_flax']:.3f}x flax)  {r['ms']:9.1f} ms  flax/this "
                  f"{r['flax_over_this']:5.2f} (spread {_pct(r['spread'])})", flush=True)
        out["lengths"].append({"length": length, "default_rows": _default_chunk_rows(length),
                               "rows": rows})
    out["uptime_after"] = _load()
    return out


def attention_markdown(att: dict) -> list[str]:
    """The attention table of BENCHMARKS.md from ``run_attention``'s result."""
    out = [f"### attention dropout: one Transformer block's training step (rate {att['rate']})",
           "", f"Pre-LN block, `flax.linen.MultiHeadDotProductAttention` with {att['heads']} "
           f"heads of {att['head_dim']} (qkv_features {att['heads'] * att['head_dim']}), "
           f"batch {att['batch']}, `broadcast_dropout=False`, MLP 64-256-64, Adam; the "
           "contenders differ only in `attention_fn`. Temp memory: the compiled step's "
           "`memory_analysis().temp_size_in_bytes` (exact). ms: median over "
           f"{att['repeats']} interleaved rounds; flax / this: median of the per-round ratios "
           "(> 1: faster than Flax), with its spread.", "",
           "| length | attention_fn | temp MB | temp / flax | ms | flax / this (per round) "
           "| spread |", "|---:|---|---:|---:|---:|---:|---:|"]
    for cell in att["lengths"]:
        for r in cell["rows"]:
            name = r["impl"]
            if name == "dropnorm":
                name = f"dropnorm (default: chunks of {cell['default_rows']} rows)"
            bold = "**" if r["impl"] == "dropnorm" else ""
            out.append(f"| {cell['length']} | {name} | {r['temp_bytes'] / 1e6:.1f} "
                       f"| {bold}{r['temp_over_flax']:.3f}{bold} | {r['ms']:.1f} "
                       f"| {bold}{r['flax_over_this']:.2f}{bold} | {_pct(r['spread'])} |")
    last = att["lengths"][-1]
    ours = next(r for r in last["rows"] if r["impl"] == "dropnorm")
    met = ours["temp_over_flax"] <= att["target"] and ours["flax_over_this"] >= 1.0
    out += ["", f"Target (issue 15): temp memory <= {att['target']}x Flax's at length "
            f"{last['length']} with time no slower: temp {ours['temp_over_flax']:.3f}x, "
            f"time {ours['flax_over_this']:.2f}x faster: {'met' if met else 'NOT met'}.", "",
            f"Load: before `{att['uptime_before']}`; after `{att['uptime_after']}`.", ""]
    return out


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
            f"{name(r)} {_pct(r.get('linen_spread'))}" for r in wide))
    return "\n".join(out)


def code_version() -> dict:
    """Which dropnorm was measured: its path, and the git commit (and dirty files) there."""
    where = os.path.dirname(os.path.dirname(os.path.abspath(dropnorm.__file__)))
    info = {"dropnorm": os.path.abspath(dropnorm.__file__)}
    try:
        git = ["git", "-C", where]
        info["commit"] = subprocess.run(git + ["log", "-1", "--format=%h %s"], capture_output=True,
                                        text=True, check=True).stdout.strip()
        status = subprocess.run(git + ["status", "--short", "dropnorm"], capture_output=True,
                                text=True, check=True).stdout
        info["dirty"] = [line[3:] for line in status.splitlines()]
    except (OSError, subprocess.CalledProcessError):
        pass
    return info


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
            x = jax.random.normal(jax.random.key(1), shape, jnp.float32).astype(dtype)
            ct = (jax.random.normal(jax.random.key(2), shape, jnp.float32) * 0.5).astype(dtype)
            c = shape[-1]
            scale, bias = jnp.full((c,), 1.5, jnp.float32), jnp.full((c,), 0.1, jnp.float32)
            args = (x, scale, bias, ct, jax.random.key(3))
            eval_args = args[:4] + (eval_stats(c),)  # eval layers take (mean, var) for a key
            copy_t = statistics.median(time_interleaved({"copy": _copy}, args, repeats)["copy"])
            for op in ops:
                for mode in modes:
                    if mode == "eval" and op != "batch_norm":
                        continue  # dropout in eval mode returns x: nothing to time
                    if mode == "eval":
                        layers = _batch_norm_eval_layers(c, dtype)
                    else:
                        layers = (_dropout_layers() if op == "dropout"
                                  else _batch_norm_layers(c, dtype))
                    fns = {name: _modes(layer, op)["fwd" if mode == "eval" else mode]
                           for name, layer in layers.items()
                           if name in MAIN or (policies and (
                               name in BIT_VARIANTS or (name in POLICIES and mode != "fwd")))}
                    fns["copy"] = _copy
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
                              f"(of medians {of_medians:5.2f}, spread {_pct(lin['spread']):>6s}, "
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


def scale_markdown(scale: dict) -> list[str]:
    """The scale tables of BENCHMARKS.md from ``run_scale``'s result."""
    runs = {r["devices"]: r for r in scale["runs"]}
    reps = scale["reps"]
    cells = {(c["devices"], c["transform"], c["variant"], c["mode"], c["impl"]): c
             for r in runs.values() for c in r["layers"]}
    feats = next(iter(runs.values()))["features"]
    ns = sorted(runs)
    per = " / ".join(str(n) for n in ns)
    cpu = all("lower_cpu_s" in c for c in cells.values())
    out = [f"### scale: collectives per BatchNorm layer ({feats} features, compiled HLO)", "",
           "Counted from `jit(f).lower(...).compile().as_text()` (after XLA's all-reduce "
           "combiner); bytes are operand bytes per device, exact and independent of the load. "
           f"Columns with `{per}` give the value at {per} devices. trace+compile: "
           f"{'CPU' if cpu else 'wall-clock'} seconds, median of {min(reps, 3)} fresh traces "
           "and compiles (on a shared CPU: noisy).", "",
           f"| transform | variant | pass | dropnorm collectives ({per}) "
           f"| dropnorm bytes ({per}) | flax collectives ({per}) | flax bytes ({per}) "
           f"| dropnorm / flax bytes ({ns[-1]} devices) "
           f"| dropnorm trace+compile {'CPU ' if cpu else ''}s ({per}) "
           f"| flax trace+compile {'CPU ' if cpu else ''}s ({per}) |",
           "|---|---|---|---:|---:|---:|---:|---:|---:|---:|"]
    keys = sorted({k[1:4] for k in cells}, key=lambda k: (
        ("shard_map", "pmap", "vmap").index(k[0]),
        (k[1] != "plain", k[1] != "mask", k[1].startswith("ghost"), k[1]),
        k[2]))

    def col(row, f):
        return " / ".join("-" if c is None else f(c) for c in row)

    def count(c):
        return str(c["count"])

    def nbytes(c):
        return f"{c['bytes']:,}"

    def tc(c):
        if cpu:
            return f"{c['lower_cpu_s'] + c['compile_cpu_s']:.2f}"
        return f"{c['lower_s'] + c['compile_s']:.2f}"

    for transform, variant, mode in keys:
        ours = [cells.get((n, transform, variant, mode, "dropnorm")) for n in ns]
        lin = [cells.get((n, transform, variant, mode, "flax")) for n in ns]
        ratio = ("-" if None in (ours[-1], lin[-1]) or not lin[-1]["bytes"]
                 else f"**{ours[-1]['bytes'] / lin[-1]['bytes']:.2f}x**")
        out.append(f"| {transform} | {variant} | {mode} | {col(ours, count)} "
                   f"| {col(ours, nbytes)} | {col(lin, count)} | {col(lin, nbytes)} | {ratio} "
                   f"| {col(ours, tc)} | {col(lin, tc)} |")
    out.append("")
    models = [r for r in runs.values() if "models" in r]
    if models:
        m = models[0]["models"]
        out += [f"### scale: trace+compile of a training step (s, median of {m['reps']} rounds)",
                "", "Each round clears JAX's caches and traces, lowers and compiles a fresh "
                "`jit`/`pmap`, dropnorm and Flax interleaved. Wall: wall-clock seconds "
                "(trace+lower + compile); CPU: this process's CPU seconds, all threads (XLA "
                "compiles on several). Ratios are of the medians of the totals. Both clocks "
                "are wall-clock-like on a shared CPU: noisy.", "",
                "| step | dropnorm wall | flax wall | wall ratio | dropnorm CPU | flax CPU "
                "| CPU ratio |", "|---|---:|---:|---:|---:|---:|---:|"]
        names = {"resnet_pmap": f"ResNet (15 BatchNorm, `axis_name`), `pmap` on "
                                f"{m['devices']} devices",
                 "twelve_layer": "12-layer bf16 Dense/BatchNorm/Dropout, one device"}
        for step, label in names.items():
            o, f = m[step]["dropnorm"], m[step]["flax"]

            def wall(t):
                return (f"{t['total_s_median']:.2f} ({t['lower_s_median']:.2f} + "
                        f"{t['compile_s_median']:.2f})")

            cpu_cells = ("- | - | -" if "total_cpu_s_median" not in o else
                         f"{o['total_cpu_s_median']:.2f} | {f['total_cpu_s_median']:.2f} "
                         f"| **{o['total_cpu_s_median'] / f['total_cpu_s_median']:.2f}**")
            out.append(f"| {label} | {wall(o)} | {wall(f)} "
                       f"| **{o['total_s_median'] / f['total_s_median']:.2f}** | {cpu_cells} |")
        out.append("")
    out += [f"Load: before `{scale['uptime_before']}`; after `{scale['uptime_after']}`.", ""]
    return out


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
               f"{r['compile_cpu_dropnorm_over_flax']:.2f} ({_pct(r['compile_cpu_spread'])})")
        ok = "met" if r["flax_over_dropnorm"] >= r["step_target"] else "**not met**"
        cok = "met" if r["compile_dropnorm_over_flax"] <= r["compile_target"] else "**not met**"
        out.append(f"| {r['label']} | {r['dropnorm_ms']:.2f} | {r['flax_ms']:.2f} "
                   f"| **{r['flax_over_dropnorm']:.2f}** | >= {r['step_target']:.2f} ({ok}) "
                   f"| {_pct(r['step_spread'])} ({r['rounds']}) | {tc(o)} | {tc(f)} "
                   f"| **{r['compile_dropnorm_over_flax']:.2f}** "
                   f"| <= {r['compile_target']:.2f} ({cok}) | {_pct(r['compile_spread'])} "
                   f"| {cpu} |")
    out += ["", f"Load: before `{steps['uptime_before']}`; after `{steps['uptime_after']}`.", ""]
    return out


def markdown(result: dict) -> str:
    """The tables of BENCHMARKS.md from a ``--json`` result."""
    out = []
    rows = result.get("rows", [])
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

            def pct(r):
                return "" if r["floor_fraction"] is None else f"{100 * r['floor_fraction']:.0f}"

            spread = ("-" if "rounds" not in ours else
                      f"{_pct(ours['linen_spread'])} ({ours['rounds']})")
            out.append(f"| {shape} | {dtype} | {mode} | {ours['ms']:.2f} | {lin['ms']:.2f} "
                       f"| {nx['ms']:.2f} | **{ours['linen_over_this']:.2f}** | {spread} "
                       f"| {lin['ms'] / ours['ms']:.2f} "
                       f"| {ours['nnx_over_this']:.2f} | {pct(ours)} | {pct(lin)} |")
        out.append("")
        if op == "batch_norm" and all("linen_spread" in r for r in cells.values()):
            out += [bn_target_summary(rows, result.get("target_spread") or 0.10), ""]
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
    if any(k[3] == "32-bit masks" for k in bit):
        eight = any(k[3] == "8-bit masks" for k in bit)  # runs before 8-bit masks were removed
        out += [f"### dropout mask resolution (ms; dropnorm's default is {BITS} bits)", "",
                "| shape | dtype | mode | " + ("8 bits | " if eight else "") + "16 bits | "
                "32 bits | " + ("8 / 16 | " if eight else "") + "32 / 16 |",
                "|---|---|---|" + "---:|" * (5 if eight else 3)]
        order = [tuple(r["shape"]) for r in rows]
        cells = sorted({k[:3] for k in bit if k[3] == "32-bit masks"}, key=lambda k: (
            order.index(k[0]), k[1] != "f32", ("fwd", "vjp", "loss").index(k[2])))
        for shape, dtype, mode in cells:
            d, t = (bit[(shape, dtype, mode, n)] for n in ("dropnorm", "32-bit masks"))
            e = bit.get((shape, dtype, mode, "8-bit masks")) if eight else None
            # ratios of times, from the per-round ratios to flax.linen (same rounds)
            out.append(f"| {shape} | {dtype} | {mode} | "
                       + (f"{e['ms']:.2f} | " if e else "") + f"{d['ms']:.2f} "
                       f"| {t['ms']:.2f} | "
                       + (f"{d['linen_over_this'] / e['linen_over_this']:.2f} | " if e else "")
                       + f"{d['linen_over_this'] / t['linen_over_this']:.2f} |")
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
    if result.get("steps"):
        out += steps_markdown(result["steps"])
    if result.get("scale"):
        out += scale_markdown(result["scale"])
    t = result.get("twelve_layer")
    if t:
        out += ["### 12-layer bf16 training step, compiled temp memory", "",
                f"Batch {t['batch']}, width {t['width']}: dropnorm "
                f"{t['dropnorm_temp_bytes'] / 2**20:.2f} MiB, flax.linen "
                f"{t['flax_temp_bytes'] / 2**20:.2f} MiB, ratio **{t['ratio']:.3f}**.", ""]
    if result.get("attention"):
        out += attention_markdown(result["attention"])
    return "\n".join(out)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--quick", action="store_true", help="small shapes, few repeats")
    parser.add_argument("--json", metavar="PATH", help="write every number to this file")
    parser.add_argument("--repeats", type=int, default=None,
                        help="rounds per cell (default 7, --quick 3; steps table 21, --quick 3)")
    parser.add_argument("--max-repeats", type=int, default=None,
                        help="rounds per cell at most while its spread is above --target-spread "
                             "(default 3 x --repeats, steps table 5 x; --quick: --repeats)")
    parser.add_argument("--target-spread", type=float, default=None,
                        help="a cell whose ratio spread is above this gets more rounds "
                             "(default 0.10; --quick: none; 0: none)")
    parser.add_argument("--compile-reps", type=int, default=None,
                        help="trace+compile rounds per model in the steps table (default 5, "
                             "--quick 1)")
    parser.add_argument("--modes", default=",".join(MODES),
                        help="comma-separated subset of " + ",".join(MODES)
                             + " (eval: batch norm only)")
    parser.add_argument("--ops", default="dropout,batch_norm", help="comma-separated subset")
    parser.add_argument("--markdown", metavar="JSON",
                        help="print the BENCHMARKS.md tables of an earlier --json run and exit")
    parser.add_argument("--scale", action="store_true",
                        help="only the scale table (collectives and trace+compile time)")
    parser.add_argument("--steps", action="store_true",
                        help="only the steps table (whole training steps, time and compile)")
    parser.add_argument("--attention", action="store_true",
                        help="only the attention table (issue 15: a Transformer block's "
                             "train step, temp memory and time, at lengths 512 and 2048)")
    parser.add_argument("--scale-worker", type=int, metavar="DEVICES", help=argparse.SUPPRESS)
    parser.add_argument("--models", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.markdown:
        with open(args.markdown) as f:
            print(markdown(json.load(f)))
        return 0
    if args.scale_worker:  # one subprocess of run_scale: the result as JSON on the last line
        print(json.dumps(scale_worker(args.scale_worker, args.repeats or 5, args.models)))
        return 0
    shapes = QUICK_SHAPES if args.quick else FULL_SHAPES
    repeats = args.repeats or (3 if args.quick else 7)
    ops, modes = args.ops.split(","), args.modes.split(",")
    if bad := [m for m in modes if m not in MODES]:
        parser.error(f"--modes: unknown mode(s) {bad}; choose from {','.join(MODES)}")
    target = (None if args.quick else 0.10) if args.target_spread is None else args.target_spread
    target = target or None  # 0: no extra rounds
    max_repeats = args.max_repeats or (repeats if args.quick else 3 * repeats)
    step_repeats = args.repeats or (3 if args.quick else 21)
    steps = functools.partial(
        run_steps, args.quick, step_repeats, args.compile_reps or (1 if args.quick else 5),
        target, args.max_repeats or (step_repeats if args.quick else 5 * step_repeats))
    t0 = time.perf_counter()
    info = machine()
    print(json.dumps({k: v for k, v in info.items() if k != "lscpu"}))
    if args.scale:
        result = {"scale": run_scale(reps=args.repeats or 5)}
    elif args.steps:
        result = {"steps": steps()}
    elif args.attention:
        result = {"attention": run_attention(args.quick, args.repeats or (3 if args.quick
                                                                          else 7))}
    else:
        # --quick leaves out the two alternative dropout memory policies and the scale table
        # (to stay under a minute)
        result = run(shapes, repeats, ops, modes, layer_shape=(256, 64),
                     policies=not args.quick, target_spread=target, max_repeats=max_repeats)
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
        print(bn_target_summary(result["rows"], target or 0.10))
        result["steps"] = steps()  # --quick: the tiny models, 3 rounds, 1 compile
        if not args.quick:
            result["scale"] = run_scale(reps=5)
            result["attention"] = run_attention(False, repeats)
    result.update(machine=info, quick=args.quick, repeats=repeats, rate=RATE,
                  target_spread=target, max_repeats=max_repeats,
                  code=code_version(), seconds=time.perf_counter() - t0)
    print(f"total {result['seconds']:.1f} s")
    if args.json:
        with open(args.json, "w") as f:
            json.dump(result, f, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
