"""Timing and statistics shared by every table: interleaved rounds, the spread, the floor.

* :func:`time_interleaved`: contenders run one call each per round, for ``repeats`` rounds
  and more while :func:`spread_above` asks for them.
* :func:`ratio_stats` / :func:`median_interval`: the median of per-round ratios and its
  distribution-free 95% interval (the "spread").
* :data:`FLOOR_PASSES` and :func:`copy_x2`: the memory floor, ``passes * x.nbytes /
  bandwidth`` with the bandwidth of ``x * 2``.
* :func:`time_trace_compile` / :func:`compile_timed`: trace+lower and compile, wall-clock
  and CPU seconds.
* :func:`uptime`, :func:`machine`, :func:`code_version`: what a result records about the run.
"""

from __future__ import annotations

import datetime
import math
import os
import platform
import statistics
import subprocess
import time
from collections.abc import Callable

import flax
import jax
import numpy as np

import dropnorm

# The memory floor of a layer's cell: passes over x at the bandwidth of ``x * 2`` (2 passes).
FLOOR_PASSES = {("dropout", "fwd"): 2, ("dropout", "vjp"): 4,
                ("batch_norm", "fwd"): 3, ("batch_norm", "vjp"): 8, ("batch_norm", "eval"): 2}


def copy_x2(x, scale, bias, ct, key):
    """The bandwidth reference of the layer grid: ``x * 2`` reads and writes ``x`` once."""
    return x * 2


def _block(out):
    jax.block_until_ready(out)


def compile_all(fns: dict[str, Callable], args) -> dict[str, Callable]:
    """Each function jitted and compiled for ``args``, and called once (warm-up: allocations,
    thread pools)."""
    compiled = {}
    for name, f in fns.items():
        c = jax.jit(f).lower(*args).compile()
        _block(c(*args))
        compiled[name] = c
    return compiled


def time_interleaved(fns: dict[str, Callable], args, repeats: int,
                     more: Callable[[dict[str, list[float]]], bool] | None = None,
                     max_repeats: int | None = None) -> dict[str, list[float]]:
    """Seconds per call of each function, ``repeats`` rounds, one call of each per round.

    ``more``: when given, after the rounds so far it is asked ``more(times)``; while it says
    True, up to ``repeats`` further rounds run, ``max_repeats`` rounds in all (the spread
    target: :func:`spread_above`).
    """
    return time_compiled(compile_all(fns, args), args, repeats, more, max_repeats)


def time_compiled(compiled: dict[str, Callable], args, repeats: int,
                  more: Callable[[dict[str, list[float]]], bool] | None = None,
                  max_repeats: int | None = None) -> dict[str, list[float]]:
    """:func:`time_interleaved` of functions already compiled for ``args`` (programs traced
    under different settings: :mod:`benchmarks.why`)."""
    times: dict[str, list[float]] = {name: [] for name in compiled}

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


def pct(value) -> str:
    """A spread as a percentage, ``-`` where there is none (a single round)."""
    return "-" if value is None else f"{100 * value:.1f}%"



def residual_bytes_per_element(fn: Callable, x, *rest) -> float:
    _, back = jax.vjp(fn, x, *rest)
    return sum(leaf.size * leaf.dtype.itemsize for leaf in jax.tree.leaves(back)) / x.size



def compile_timed(lower: Callable) -> tuple[object, dict[str, float]]:
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
            _, t = compile_timed(lower)
            t["total_s"] = t["lower_s"] + t["compile_s"]
            t["total_cpu_s"] = t["lower_cpu_s"] + t["compile_cpu_s"]
            for k in keys:
                times[name][k].append(t[k])
    return {name: {k + "_median": statistics.median(v) for k, v in t.items()} | t
            for name, t in times.items()}


def uptime() -> str:
    """``uptime``'s line (the load average says how busy the shared CPU was)."""
    try:
        return subprocess.run(["uptime"], capture_output=True, text=True, check=True).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return "load average " + ", ".join(f"{v:.2f}" for v in os.getloadavg())


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
