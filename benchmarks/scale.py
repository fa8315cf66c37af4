"""The scale tables: what crosses devices, read from the compiled program, and compile time.

What crosses devices is read from the compiled program, so it is exact and independent of
the load on the machine: every collective instruction of the optimised HLO (after XLA's
all-reduce combiner, which may merge several psums into one tuple-shaped all-reduce) and
the bytes of its operands (:func:`hlo_collectives`). Each device count runs in its own
subprocess (:func:`run_worker`), because ``XLA_FLAGS``
(``--xla_force_host_platform_device_count``) is read once, when JAX starts.

Two tables, the two ways JAX programs scale:

* ``axis_name`` (:func:`run_scale`, ``--scale``): one BatchNorm layer with ``axis_name``
  under ``shard_map``, ``pmap`` and ``vmap`` (:func:`scale_layers`), and the trace+compile
  time of a ResNet ``pmap`` step and of the 12-layer step (:func:`scale_models`).
* sharded ``jit`` (:func:`run_sharded`, ``--sharded``, also part of ``--scale``): the batch
  split by a ``NamedSharding`` over a mesh ``("data",)``, a plain ``jax.jit``, no
  ``axis_name``; XLA's SPMD partitioner inserts the collectives. Programs with one BatchNorm
  layer each (:func:`sharded_layers`: forward, train step, evaluation, a 2-D mesh, the NNX
  shells) and a ResNet train step (:func:`sharded_models`: collectives per step and
  trace+compile time).
"""

from __future__ import annotations

import functools
import json
import math
import os
import re
import statistics
import subprocess
import sys
from collections import Counter
from collections.abc import Callable

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

import dropnorm
import dropnorm.linen as dl
from benchmarks.models import (
    DenseBatchNormDropout,
    ResNet,
    classifier_step,
    twelve_layer_step,
)
from benchmarks.timing import compile_timed, pct, ratio_stats, time_trace_compile, uptime

# --- reading the compiled program ------------------------------------------------------------

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


_COMPUTATION = re.compile(r"^(?:ENTRY\s+)?%?([\w.\-]+)\s+\(.*\{\s*$")
_BRANCHES = re.compile(r"(?:branch_computations=\{([^}]*)\}|true_computation=%?([\w.\-]+)|"
                       r"false_computation=%?([\w.\-]+))")
_CALLS = re.compile(r"(?:calls|to_apply|body|condition)=%?([\w.\-]+)")


def conditional_collectives(hlo_text: str) -> list[bool]:
    """For each collective of :func:`hlo_collectives` (same order): whether it sits in a
    branch of a ``conditional`` (``lax.cond``), i.e. runs only when that branch is taken.

    A computation is conditional when a ``conditional`` instruction names it as a branch, or
    when a conditional computation calls it.
    """
    owner, calls, branches, flags = None, {}, set(), []
    for line in hlo_text.splitlines():
        m = _COMPUTATION.match(line)
        if m:
            owner = m.group(1)
            calls.setdefault(owner, set())
            continue
        for b in _BRANCHES.finditer(line):
            names = b.group(1).split(",") if b.group(1) else [b.group(2) or b.group(3)]
            branches.update(n.strip().lstrip("%") for n in names if n.strip())
        if owner is not None:
            calls[owner].update(c for c in _CALLS.findall(line))
        m = _INSTR.match(line)
        if m and m.group(3).removesuffix("-start") in COLLECTIVES and \
                not m.group(3).endswith("-done"):
            flags.append(owner)
    inside, todo = set(), list(branches)
    while todo:
        c = todo.pop()
        if c not in inside:
            inside.add(c)
            todo.extend(calls.get(c, ()))
    return [o in inside for o in flags]


def _probe(lower: Callable) -> dict:
    compiled, times = compile_timed(lower)
    text = compiled.as_text()
    ops = hlo_collectives(text)
    cond = conditional_collectives(text)
    cond_bytes = sum(b for (_, b), c in zip(ops, cond, strict=True) if c)
    return {"count": len(ops), "bytes": sum(b for _, b in ops), "ops": ops,
            "cond_count": sum(cond), "cond_bytes": cond_bytes, **times}


# --- axis_name: one layer under shard_map, pmap and vmap; the pmap ResNet step ----------------


def _probe_median(lower, reps: int) -> dict:
    """:func:`_probe` ``reps`` times, each tracing and compiling afresh: the structure of the
    first, the median of each time."""
    cells = []
    for _ in range(reps):
        jax.clear_caches()  # every repetition traces and compiles afresh
        cells.append(_probe(lower))
    c = dict(cells[0])
    for k in ("lower_s", "compile_s", "lower_cpu_s", "compile_cpu_s"):
        c[k] = statistics.median(x[k] for x in cells)
    return c

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
        out.append({"devices": n, "transform": transform, "variant": variant, "impl": impl,
                    "mode": mode, **_probe_median(lower, reps)})

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


def resnet_pmap_step(bn: type, devices: int, per_device: int = 8, size: int = 32):
    """A ``pmap`` train step of the ResNet (:class:`~benchmarks.models.ResNet`) as Flax's
    ImageNet example writes it.

    Cross-entropy, gradients averaged with ``lax.pmean(..., "batch")``, SGD with momentum;
    BatchNorm with ``axis_name="batch"``. Returns ``(lower, args)``: ``lower()`` traces and
    lowers a fresh ``jax.pmap`` of the step.
    """
    import optax

    net = ResNet(bn)
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


def run_scale(devices=SCALE_DEVICES, reps: int = 5, models: bool = True,
              timeout: float = 1800) -> dict:
    """The scale table: one subprocess per device count, each with its own ``XLA_FLAGS``.

    The ResNet ``pmap`` step and the 12-layer step are timed in the 8-device subprocess
    only (``models``). ``uptime`` is recorded before and after: the times are wall-clock
    on a shared CPU, the collective counts and bytes are exact.
    """
    out = {"uptime_before": uptime(), "reps": reps, "runs": []}
    for n in devices:
        res = run_worker("--scale-worker", n, ["--repeats", str(reps)]
                         + (["--models"] if models and n == min(devices) else []), timeout)
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
    out["uptime_after"] = uptime()
    return out


def scale_worker(n: int, reps: int, models: bool) -> dict:
    """The body of one scale subprocess (``--scale-worker``): layers, then the models."""
    res = scale_layers(n, reps=min(reps, 3))  # counts and bytes are exact; times: median of 3
    if models:
        res["models"] = scale_models(reps, n)
    return res


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


# --- the subprocesses ------------------------------------------------------------------------

BENCH_SCRIPT = os.path.join(os.path.dirname(os.path.abspath(__file__)), "bench.py")


def worker_env(n: int) -> dict[str, str]:
    """This process's environment for a subprocess with ``n`` simulated CPU devices.

    ``XLA_FLAGS`` gets ``--xla_force_host_platform_device_count=n`` (any other count
    removed), and ``PYTHONPATH`` starts with the directory this process imported dropnorm
    from, so the subprocess measures the same code.
    """
    flags = re.sub(r"--xla_force_host_platform_device_count=\d+", "",
                   os.environ.get("XLA_FLAGS", ""))
    root = os.path.dirname(os.path.dirname(os.path.abspath(dropnorm.__file__)))
    path = os.pathsep.join(p for p in (root, os.environ.get("PYTHONPATH", "")) if p)
    return dict(os.environ, JAX_PLATFORMS="cpu", PYTHONPATH=path,
                XLA_FLAGS=f"{flags} --xla_force_host_platform_device_count={n}".strip())


def run_worker(flag: str, n: int, extra: list[str], timeout: float) -> dict:
    """Run ``bench.py <flag> n <extra>`` on ``n`` simulated devices; its last line, as JSON."""
    cmd = [sys.executable, BENCH_SCRIPT, flag, str(n), *extra]
    proc = subprocess.run(cmd, env=worker_env(n), capture_output=True, text=True,
                          timeout=timeout)
    if proc.returncode:
        raise RuntimeError(f"{flag} ({n} devices) failed:\n{proc.stderr[-4000:]}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


# --- sharded jit: the batch on a mesh, a plain jax.jit, no axis_name ------------------------
#
# The way most JAX programs scale today (jax.make_mesh tutorials, MaxText, big_vision): the
# batch is put on a mesh with a NamedSharding, parameters and statistics are replicated, and
# the step is jitted as written for one device. XLA's SPMD partitioner inserts whatever
# collectives the batch statistics need; they are read from the compiled HLO as above.

SHARDED_DEVICES = (8, 64)  # --quick: 8 only
SHARDED_FEATURES = 512
SHARDED_BATCH = 256
SHARDED_MODEL_AXIS = 4  # the 2-D mesh: (devices // 4, 4), batch on "data", features on "model"
SHARDED_RESNET = {  # the ResNet train step (8 devices); --quick: the tiny one
    False: {"batch": 64, "size": 32, "width": 16, "stages": (2, 2, 2)},
    True: {"batch": 16, "size": 8, "width": 4, "stages": (1, 1)},
}
SHARDED_COMPILE_TARGET = 1.15  # issue 19: the ResNet step's trace+compile <= 1.15x Flax's
# (name, label): the programs of sharded_layers, in the table's order. Each holds exactly one
# BatchNorm layer, so its counts are per layer.
SHARDED_PROGRAMS = (
    ("batch_norm fwd", "`dropnorm.batch_norm(params, state, x, train=True)` alone vs "
                       "`flax.linen.BatchNorm`, forward"),
    ("batch_norm grad", "the same layer, gradients of `sum(y * ct)` w.r.t. params and x"),
    ("batch_norm eval", "the same layer, evaluation (running statistics)"),
    ("model fwd", "`Dense -> BatchNorm -> relu -> Dropout -> Dense`, `dropnorm.linen` vs "
                  "`flax.linen` layers, forward (train)"),
    ("model step", "the same model, `jax.grad` of a loss (train step)"),
    ("model eval", "the same model, evaluation"),
    ("batch_norm 2-D fwd", "`batch_norm` alone on a 2-D mesh `(\"data\", \"model\")`, batch "
                           "on `data`, features on `model`, forward"),
    ("nnx fwd", "`dropnorm.nnx.BatchNorm` vs `flax.nnx.BatchNorm`, forward (train)"),
)


def _sharded_programs(n: int, only=None) -> dict[str, dict[str, Callable]]:
    """program name -> impl -> ``lower()``: a fresh ``jax.jit`` of it, lowered on its args.

    The arguments are put on the devices first (``jax.device_put`` with a ``NamedSharding``:
    x split on its batch axis, everything else replicated), so the plain ``jax.jit`` sees
    the shardings as a user's step does. ``only``: None, or the program names to build (the
    model's and the NNX programs are built only when asked for).
    """
    from jax.sharding import Mesh, NamedSharding
    from jax.sharding import PartitionSpec as P

    feats, batch = SHARDED_FEATURES, SHARDED_BATCH
    mesh = Mesh(np.array(jax.devices()[:n]), ("data",))
    mesh2 = Mesh(np.array(jax.devices()[:n]).reshape(n // SHARDED_MODEL_AXIS,
                                                     SHARDED_MODEL_AXIS), ("data", "model"))

    def put(tree, mesh, spec=None):
        return jax.device_put(tree, NamedSharding(mesh, P() if spec is None else spec))

    rng = np.random.default_rng(0)
    x_host = jnp.asarray(rng.normal(3.0, 2.0, (batch, feats)), jnp.float32)
    x, ct = put(x_host, mesh, P("data")), put(jnp.ones_like(x_host), mesh, P("data"))
    x2 = put(x_host, mesh2, P("data", "model"))
    key = put(jax.random.key(1), mesh)

    # Running statistics away from (0, 1), the same for both libraries, in every program.
    mean, var = (jnp.asarray(rng.normal(0.5, 1.0, feats), jnp.float32),
                 jnp.asarray(rng.uniform(0.25, 4.0, feats), jnp.float32))
    p, s = dropnorm.batch_norm_init(feats)
    p, s = put((p, s._replace(mean=mean, var=var)), mesh)
    lin = {t: nn.BatchNorm(use_running_average=not t, momentum=0.99, epsilon=1e-5)
           for t in (True, False)}
    fv = {"params": {"scale": p.scale, "bias": p.bias},  # Flax's tree, dropnorm's values
          "batch_stats": {"mean": mean, "var": var}}
    assert jax.tree.structure(fv) == jax.tree.structure(
        jax.eval_shape(lin[True].init, jax.random.key(0), x_host[:2]))
    fv, fv2 = put(fv, mesh), put(fv, mesh2)
    p2, s2 = put((p, s), mesh2)

    def ours(train):
        return lambda p, s, x: dropnorm.batch_norm(p, s, x, train=train)

    def theirs(train):
        return lambda v, x: lin[train].apply(v, x, mutable=["batch_stats"])

    def ours_grad(p, s, x, ct):
        def loss(p, x):
            y, ns = dropnorm.batch_norm(p, s, x, train=True)
            return jnp.sum(y * ct), ns
        return jax.grad(loss, (0, 1), has_aux=True)(p, x)

    def theirs_grad(v, x, ct):
        def loss(params, x):
            y, upd = lin[True].apply({"params": params, "batch_stats": v["batch_stats"]}, x,
                                     mutable=["batch_stats"])
            return jnp.sum(y * ct), upd
        return jax.grad(loss, (0, 1), has_aux=True)(v["params"], x)

    def jitted(f, *args):
        return lambda: jax.jit(f).lower(*args)

    progs = {
        "batch_norm fwd": {"dropnorm": jitted(ours(True), p, s, x),
                           "flax": jitted(theirs(True), fv, x)},
        "batch_norm grad": {"dropnorm": jitted(ours_grad, p, s, x, ct),
                            "flax": jitted(theirs_grad, fv, x, ct)},
        "batch_norm eval": {"dropnorm": jitted(ours(False), p, s, x),
                            "flax": jitted(theirs(False), fv, x)},
        "batch_norm 2-D fwd": {"dropnorm": jitted(ours(True), p2, s2, x2),
                               "flax": jitted(theirs(True), fv2, x2)},
    }

    if only is None or any(name.startswith("model") for name in only):
        progs |= _model_programs(x_host, x, key, put, mesh, jitted)
    if only is None or "nnx fwd" in only:
        progs["nnx fwd"] = _nnx_programs(x, put, mesh, jitted)
    return progs


def _model_programs(x_host, x, key, put, mesh, jitted) -> dict[str, dict[str, Callable]]:
    """The ``Dense -> BatchNorm -> relu -> Dropout -> Dense`` programs of _sharded_programs."""
    # The model, built twice from flax.linen modules; the same variables for both.
    feats = SHARDED_FEATURES
    nets = {"dropnorm": DenseBatchNormDropout(dl.BatchNorm, dl.Dropout, feats),
            "flax": DenseBatchNormDropout(nn.BatchNorm, nn.Dropout, feats)}
    mv = put(jax.jit(nets["flax"].init, static_argnums=2)(jax.random.key(0), x_host[:2],
                                                          False), mesh)

    def model_fwd(net):
        return lambda v, x, key: net.apply(v, x, True, rngs={"dropout": key},
                                           mutable=["batch_stats"])

    def model_step(net):
        def step(v, x, key):
            def loss(params):
                y, upd = net.apply({"params": params, "batch_stats": v["batch_stats"]}, x,
                                   True, rngs={"dropout": key}, mutable=["batch_stats"])
                return jnp.mean(jnp.square(y)), upd
            return jax.grad(loss, has_aux=True)(v["params"])
        return step

    def model_eval(net):
        return lambda v, x: net.apply(v, x, False)

    return {"model fwd": {k: jitted(model_fwd(net), mv, x, key) for k, net in nets.items()},
            "model step": {k: jitted(model_step(net), mv, x, key) for k, net in nets.items()},
            "model eval": {k: jitted(model_eval(net), mv, x) for k, net in nets.items()}}


def _nnx_programs(x, put, mesh, jitted) -> dict[str, Callable]:
    """``nnx fwd`` of _sharded_programs: the module split into a graph and a state, merged
    inside the jitted function (NNX's functional API under a plain ``jax.jit``)."""
    from flax import nnx

    import dropnorm.nnx as dnnx

    def nnx_fwd(cls):
        m = cls(SHARDED_FEATURES, use_running_average=False, momentum=0.99, epsilon=1e-5,
                rngs=nnx.Rngs(0))
        graphdef, state = nnx.split(m)

        def f(state, x):
            m = nnx.merge(graphdef, state)
            return m(x), nnx.state(m)

        return jitted(f, put(state, mesh), x)

    return {"dropnorm": nnx_fwd(dnnx.BatchNorm), "flax": nnx_fwd(nnx.BatchNorm)}


def sharded_layers(n: int, reps: int = 1, only=None) -> dict:
    """Collectives and trace+compile time of the sharded-``jit`` programs on n devices.

    Programs: :data:`SHARDED_PROGRAMS` (each with one BatchNorm layer, dropnorm's and
    Flax's), ``SHARDED_BATCH`` x ``SHARDED_FEATURES`` float32 inputs. Times are medians of
    ``reps`` fresh traces and compiles. ``only``: None, or a collection of program names.
    """
    assert jax.device_count() >= n, (jax.device_count(), n)
    out = []
    for program, impls in _sharded_programs(n, only).items():
        if only is not None and program not in only:
            continue
        for impl, lower in impls.items():
            out.append({"devices": n, "program": program, "impl": impl,
                        **_probe_median(lower, reps)})
    return {"devices": n, "features": SHARDED_FEATURES, "batch": SHARDED_BATCH,
            "model_axis": SHARDED_MODEL_AXIS, "layers": out}


def resnet_sharded_step(bn: type, devices: int, sizes: dict, variables=None):
    """A train step of :class:`~benchmarks.models.ResNet` under a batch-sharded ``jax.jit``.

    The ResNet without ``axis_name``, cross-entropy, SGD with momentum
    (:func:`~benchmarks.models.classifier_step`); images and labels split over a 1-D mesh
    ``("data",)`` of ``devices`` devices, everything else replicated. Returns ``(lower,
    args)``: ``lower()`` traces and lowers a fresh ``jax.jit`` of the step.
    """
    import optax
    from jax.sharding import Mesh, NamedSharding
    from jax.sharding import PartitionSpec as P

    mesh = Mesh(np.array(jax.devices()[:devices]), ("data",))
    rng = np.random.default_rng(7)
    b, size = sizes["batch"], sizes["size"]
    x = jnp.asarray(rng.standard_normal((b, size, size, 3)), jnp.float32)
    y = jnp.asarray(rng.integers(0, 10, b), jnp.int32)
    net = ResNet(bn, sizes["stages"], sizes["width"], axis_name=None)
    step, args = classifier_step(net, x, y, optax.sgd(0.1, momentum=0.9), stats=True,
                                 variables=variables)
    rep, data = NamedSharding(mesh, P()), NamedSharding(mesh, P("data"))
    args = tuple(jax.device_put(a, data if i in (3, 4) else rep) for i, a in enumerate(args))
    return (lambda: jax.jit(lambda *a: step(*a)).lower(*args)), args


def sharded_models(reps: int, quick: bool = False, devices: int = 8) -> dict:
    """The ResNet train step under a batch-sharded ``jit``: collectives per step (exact) and
    trace+compile time (:func:`~benchmarks.timing.time_trace_compile`, ``reps`` rounds),
    dropnorm's BatchNorm against Flax's in the same model (same variables)."""
    sizes = SHARDED_RESNET[quick]
    flax_lower, args = resnet_sharded_step(nn.BatchNorm, devices, sizes)
    variables = {"params": args[0], "batch_stats": args[1]}
    lowers = {"dropnorm": resnet_sharded_step(dl.BatchNorm, devices, sizes, variables)[0],
              "flax": flax_lower}
    hlo = {}
    for impl, lower in lowers.items():
        ops = hlo_collectives(lower().compile().as_text())
        hlo[impl] = {"count": len(ops), "bytes": sum(b for _, b in ops), "ops": ops}
    tc = time_trace_compile(lowers, reps)
    nbn = 1 + sum(2 * b for b in sizes["stages"]) + len(sizes["stages"]) - 1
    ratio = ratio_stats(tc["dropnorm"]["total_s"], tc["flax"]["total_s"])
    cpu = ratio_stats(tc["dropnorm"]["total_cpu_s"], tc["flax"]["total_cpu_s"])
    return {"devices": devices, "reps": reps, "sizes": sizes, "batch_norm_layers": nbn,
            "collectives": hlo,
            "compile": {impl: {k: v for k, v in t.items() if k.endswith("_median")}
                        for impl, t in tc.items()},
            "compile_dropnorm_over_flax": ratio["ratio"], "compile_spread": ratio["spread"],
            "compile_cpu_dropnorm_over_flax": cpu["ratio"], "compile_cpu_spread": cpu["spread"],
            "compile_target": SHARDED_COMPILE_TARGET}


def sharded_worker(n: int, reps: int, models: bool, quick: bool) -> dict:
    """The body of one sharded-``jit`` subprocess (``--sharded-worker``)."""
    res = sharded_layers(n, reps=1 if quick else min(reps, 3))
    if models:
        res["models"] = sharded_models(1 if quick else reps, quick, n)
    return res


def kinds(ops) -> str:
    """``[(opcode, bytes), ...]`` as ``2 all-reduce + 1 collective-permute`` (``0``: none)."""
    c = Counter(op for op, _ in ops)
    return " + ".join(f"{v} {k}" for k, v in sorted(c.items())) or "0"


def run_sharded(quick: bool = False, reps: int = 5, timeout: float = 1800) -> dict:
    """The sharded-``jit`` table: one subprocess per device count (:data:`SHARDED_DEVICES`,
    ``quick``: 8 only), the ResNet step in the 8-device one; ``uptime`` before and after."""
    devices = SHARDED_DEVICES[:1] if quick else SHARDED_DEVICES
    out = {"uptime_before": uptime(), "reps": reps, "quick": quick, "runs": []}
    for n in devices:
        extra = ["--repeats", str(reps)] + (["--models"] if n == min(devices) else [])
        res = run_worker("--sharded-worker", n, extra + (["--quick"] if quick else []),
                         timeout)
        for c in res["layers"]:
            print(f"sharded {n:3d} devices {c['program']:18s} {c['impl']:8s} {c['count']:2d} "
                  f"collectives {c['bytes']:9d} bytes ({kinds(c['ops'])})  trace+compile "
                  f"{c['lower_s'] + c['compile_s']:6.3f} s", flush=True)
        m = res.get("models")
        if m:
            for impl in ("dropnorm", "flax"):
                h, t = m["collectives"][impl], m["compile"][impl]
                print(f"sharded resnet step {n} devices {impl:8s} {h['count']:3d} collectives "
                      f"{h['bytes']:9d} bytes ({kinds(h['ops'])})  trace+compile "
                      f"{t['lower_s_median']:.2f}+{t['compile_s_median']:.2f} s "
                      f"(CPU {t['total_cpu_s_median']:.2f} s)", flush=True)
            ok = m["compile_dropnorm_over_flax"] <= m["compile_target"]
            print(f"sharded resnet step trace+compile dropnorm/flax "
                  f"{m['compile_dropnorm_over_flax']:5.2f} (target <= {m['compile_target']:.2f}:"
                  f" {'met' if ok else 'NOT met'}; CPU seconds "
                  f"{m['compile_cpu_dropnorm_over_flax']:5.2f})", flush=True)
        out["runs"].append(res)
    out["uptime_after"] = uptime()
    return out


def sharded_markdown(sharded: dict) -> list[str]:
    """The sharded-``jit`` tables of BENCHMARKS.md from ``run_sharded``'s result."""
    runs = {r["devices"]: r for r in sharded["runs"]}
    ns = sorted(runs)
    per = " / ".join(str(n) for n in ns)
    first = runs[ns[0]]
    cells = {(c["devices"], c["program"], c["impl"]): c for r in runs.values()
             for c in r["layers"]}
    labels = dict(SHARDED_PROGRAMS)
    out = [f"### sharded jit: collectives per BatchNorm layer ({first['features']} features, "
           f"batch {first['batch']}, compiled HLO)", "",
           "The batch split by a `NamedSharding` over a 1-D mesh `(\"data\",)` (2-D: "
           f"`(devices // {first['model_axis']}, {first['model_axis']})`), parameters and "
           "statistics replicated, a plain `jax.jit` without `axis_name`: XLA's SPMD "
           "partitioner inserts the collectives. Each program holds one BatchNorm layer. "
           "Counted from `jit(f).lower(...).compile().as_text()` (a tuple all-reduce counts "
           f"once, with all its operand bytes per device). Columns with `{per}` give the value "
           f"at {per} devices.", "",
           f"| program | dropnorm collectives ({per}) | dropnorm bytes ({per}) "
           f"| flax collectives ({per}) | flax bytes ({per}) "
           f"| dropnorm / flax bytes ({ns[-1]} devices) | dropnorm's kinds ({ns[-1]} devices) "
           f"| flax's kinds ({ns[-1]} devices) "
           f"| dropnorm's in a conditional branch ({ns[-1]} devices) |",
           "|---|---:|---:|---:|---:|---:|---|---|---|"]

    def col(row, f):
        return " / ".join("-" if c is None else f(c) for c in row)

    def count(c):
        return str(c["count"])

    def conditional(c):  # the statistics' second round: it runs only when taken
        if c is None or "cond_count" not in c:
            return "-"
        return f"{c['cond_count']} ({c['cond_bytes']:,} B)"

    def nbytes(c):
        return f"{c['bytes']:,}"

    for program, _ in SHARDED_PROGRAMS:
        ours = [cells.get((n, program, "dropnorm")) for n in ns]
        lin = [cells.get((n, program, "flax")) for n in ns]
        if all(c is None for c in ours + lin):
            continue
        ratio = ("-" if None in (ours[-1], lin[-1]) or not lin[-1]["bytes"]
                 else f"**{ours[-1]['bytes'] / lin[-1]['bytes']:.2f}x**")
        out.append(f"| {labels[program]} | {col(ours, count)} | {col(ours, nbytes)} "
                   f"| {col(lin, count)} | {col(lin, nbytes)} | {ratio} "
                   f"| {'-' if ours[-1] is None else kinds(ours[-1]['ops'])} "
                   f"| {'-' if lin[-1] is None else kinds(lin[-1]['ops'])} "
                   f"| {conditional(ours[-1])} |")
    out.append("")
    models = [r for r in runs.values() if "models" in r]
    if models:
        m = models[0]["models"]
        z = m["sizes"]
        out += [f"### sharded jit: a ResNet train step on {m['devices']} devices", "",
                f"The ResNet of the steps table ({len(z['stages'])} stages of "
                f"{z['stages'][0]} blocks, {m['batch_norm_layers']} BatchNorm, width "
                f"{z['width']}), batch {z['batch']} of {z['size']}x{z['size']}x3 split over "
                f"`(\"data\",)`, cross-entropy, SGD with momentum, a plain `jax.jit`; "
                "dropnorm's BatchNorm against Flax's in the same model. Collectives: per step, "
                "from the compiled HLO (exact). Trace+compile: wall-clock seconds, trace+lower "
                f"+ compile, median of {m['reps']} rounds with caches cleared and a fresh "
                "`jit`, ratio = median of per-round dropnorm / Flax totals (< 1: dropnorm "
                "faster); CPU: the same ratio of this process's CPU seconds.", "",
                "| BatchNorm | collectives per step | bytes per step | kinds "
                "| trace+compile s | dropnorm / flax | target | spread | CPU dropnorm / flax |",
                "|---|---:|---:|---|---:|---:|---:|---:|---:|"]
        for impl in ("dropnorm", "flax"):
            h, t = m["collectives"][impl], m["compile"][impl]
            tc = (f"{t['total_s_median']:.2f} ({t['lower_s_median']:.2f} + "
                  f"{t['compile_s_median']:.2f})")
            if impl == "dropnorm":
                ok = ("met" if m["compile_dropnorm_over_flax"] <= m["compile_target"]
                      else "**not met**")
                rest = (f"**{m['compile_dropnorm_over_flax']:.2f}** "
                        f"| <= {m['compile_target']:.2f} ({ok}) | {pct(m['compile_spread'])} "
                        f"| {m['compile_cpu_dropnorm_over_flax']:.2f} "
                        f"({pct(m['compile_cpu_spread'])})")
            else:
                rest = "| | |"
            out.append(f"| {impl} | {h['count']} | {h['bytes']:,} | {kinds(h['ops'])} | {tc} "
                       f"| {rest} |")
        out.append("")
    out += [f"Load: before `{sharded['uptime_before']}`; after `{sharded['uptime_after']}`.", ""]
    return out
