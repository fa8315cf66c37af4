"""Why a batch-norm cell misses its target: the price of exact statistics, in the same run.

Issue 19 asks that a cell below 0.95x Flax show why in the run that measured it. Three
tables, each timed interleaved against Flax's formulas in the same rounds:

* ``sums``: the statistics alone, at the grid's float32 shapes. Flax sums ``x`` and
  ``x^2``; dropnorm sums ``x - shift`` and its square (the shift is the running mean), the
  subtraction that keeps the variance exact at any mean. On XLA CPU the sum of squares is
  a fused reduction of ``x`` alone, while the subtraction is one more elementwise operation
  per element (run 14: 1.2x to 1.8x the time of Flax's sums, the most at 32 features).
* ``variants``: the training-mode forward of the grid's float32 cells with the library
  as it is; with the second round always run (what a 2-D mesh would need for no collective
  over ``model``: no predicate); and with Flax's raw sums in one round (no shift, never a
  second round: not exact; what the subtraction and the conditional cost together);
  flax.linen beside them. Ratio: flax.linen / variant, per round.
* ``resnet``: the steps table's ResNet training step with the same three variants.

The variants are programs traced with two functions of ``dropnorm._moments`` replaced
(:func:`statistics_variant`), JAX's caches cleared before and after; the library itself
has one statistics path and no such option.
"""

from __future__ import annotations

import contextlib
import functools
import statistics

import jax
import jax.numpy as jnp

import dropnorm._moments as moments
from benchmarks import grid
from benchmarks.steps import step_models
from benchmarks.timing import compile_all, pct, ratio_stats, spread_above, time_compiled

AS_IS = "as is"
ALWAYS = "second round always"
RAW = "raw sums, one round"
VARIANTS = (AS_IS, ALWAYS, RAW)


def _without_shift(shifted_moments, x, reduction_axes, shift=None, **kw):
    return shifted_moments(x, reduction_axes, None, **kw)


def _fixed_predicate(flag: bool, poor, s1, s2, count):
    mean_d, m2, _ = poor(s1, s2, count)
    return mean_d, m2, flag


@contextlib.contextmanager
def statistics_variant(name: str):
    """Trace dropnorm's statistics as ``name`` (one of :data:`VARIANTS`) inside the block.

    ``ALWAYS``: the second round's predicate the constant True, so every call runs both
    rounds (XLA drops the conditional); ``RAW``: no shift (the sums of ``x`` and ``x^2``)
    and the predicate the constant False, so the second round never runs (nor is it in the
    program). JAX's caches are cleared on entry and exit, so that no program traced under
    one setting is reused under another.
    """
    if name not in VARIANTS:
        raise ValueError(f"statistics_variant: unknown variant {name!r}; one of {VARIANTS}")
    saved = moments._poor, moments.shifted_moments
    jax.clear_caches()
    try:
        if name != AS_IS:
            moments._poor = functools.partial(_fixed_predicate, name == ALWAYS, saved[0])
        if name == RAW:
            moments.shifted_moments = functools.partial(_without_shift, saved[1])
        yield
    finally:
        moments._poor, moments.shifted_moments = saved
        jax.clear_caches()


def _compiled_variants(fns: dict[str, tuple[str, object]], args) -> dict:
    """``{label: compiled}`` for ``{label: (variant, f)}``, each traced under its variant."""
    out = {}
    for label, (variant, f) in fns.items():
        with statistics_variant(variant):
            out.update(compile_all({label: f}, args))
    return out


def _row(times: dict[str, list[float]], reference: str, **info) -> dict:
    row = dict(info, ms={k: statistics.median(v) * 1e3 for k, v in times.items()})
    row["ratio"] = {}
    row["spread"] = {}
    for k in times:
        if k != reference:
            st = ratio_stats(times[reference], times[k])
            row["ratio"][k], row["spread"][k] = st["ratio"], st["spread"]
    row["rounds"] = len(times[reference])
    return row


def _sums_fns(shape) -> dict[str, tuple[str, object]]:
    axes = tuple(range(len(shape) - 1))

    def flax_sums(x, scale, bias, ct, key):
        return jnp.sum(x, axes), jnp.sum(x * x, axes)

    def shifted_sums(x, scale, bias, ct, key):
        # The shift an argument of the program, as the running mean is in real use (a
        # constant shift compiles to another, slower, reduction on XLA CPU: 3x here).
        return jnp.sum(x - bias, axes), jnp.sum(jnp.square(x + (-bias)), axes)

    return {"flax sums": (AS_IS, flax_sums), "dropnorm sums": (AS_IS, shifted_sums)}


def run_why(shapes, repeats: int, quick: bool = False, resnet: bool = True,
            target_spread: float | None = None, max_repeats: int | None = None) -> dict:
    """The three tables (see the module docstring) at ``shapes`` (float32), ``repeats``
    rounds each, more (up to ``max_repeats``) while a ratio's spread is above
    ``target_spread``, as in the layer grid; and (``resnet``) the ResNet step of the steps
    table (``quick``: the tiny one), ``3 x repeats`` rounds."""
    out = {"sums": [], "variants": [], "resnet": None, "repeats": repeats}

    def timed(fns, args, reference, rounds=repeats, most=max_repeats):
        more = spread_above(target_spread, [(reference, k) for k in fns if k != reference])
        return time_compiled(_compiled_variants(fns, args), args, rounds, more, most)

    for shape in shapes:
        args = grid.cell_args(shape, jnp.float32)
        times = timed(_sums_fns(shape), args, "flax sums")
        out["sums"].append(_row(times, "flax sums", shape=list(shape)))
        print(f"why sums {str(shape):20s} flax/dropnorm "
              f"{out['sums'][-1]['ratio']['dropnorm sums']:.2f}", flush=True)
        layers = grid.batch_norm_layers(shape[-1], jnp.float32)
        fwd = {v: (v, grid.mode_fns(layers["dropnorm"], "batch_norm")["fwd"]) for v in VARIANTS}
        fwd["flax.linen"] = (AS_IS, grid.mode_fns(layers["flax.linen"], "batch_norm")["fwd"])
        times = timed(fwd, args, "flax.linen")
        out["variants"].append(_row(times, "flax.linen", shape=list(shape)))
        print(f"why fwd  {str(shape):20s} " + "  ".join(
            f"{k} {v:.2f}" for k, v in out["variants"][-1]["ratio"].items()), flush=True)
    if not resnet:
        return out
    m = step_models(quick)["resnet"]
    step = {v: (v, m["steps"]["dropnorm"]) for v in VARIANTS} | {
        "flax": (AS_IS, m["steps"]["flax"])}
    times = timed(step, m["args"], "flax", 3 * repeats, max_repeats and 3 * max_repeats)
    out["resnet"] = _row(times, "flax", label=m["label"])
    print("why resnet step " + "  ".join(
        f"{k} {v:.2f}" for k, v in out["resnet"]["ratio"].items()), flush=True)
    return out


def why_markdown(why: dict) -> list[str]:
    """The tables of BENCHMARKS.md for :func:`run_why`'s result."""
    out = ["", "### why: the statistics alone (float32; Flax's sums of x and x^2 against "
               "dropnorm's of x - shift and its square)", "",
           "| shape | flax sums ms | dropnorm sums ms | flax / dropnorm | spread (rounds) |",
           "|---|---:|---:|---:|---:|"]
    for r in why["sums"]:
        k = "dropnorm sums"
        out.append(f"| {tuple(r['shape'])} | {r['ms']['flax sums']:.3f} | {r['ms'][k]:.3f} | "
                   f"**{r['ratio'][k]:.2f}** | {pct(r['spread'][k])} ({r['rounds']}) |")
    out += ["", "### why: batch_norm train forward (float32), dropnorm's statistics three ways",
            "", "| shape | " + " | ".join(f"{v} ms" for v in VARIANTS) + " | flax.linen ms | "
            + " | ".join(f"linen / {v}" for v in VARIANTS) + " | rounds |",
            "|---|" + "---:|" * (2 * len(VARIANTS) + 2)]
    for r in why["variants"]:
        out.append(f"| {tuple(r['shape'])} | " + " | ".join(
            f"{r['ms'][v]:.3f}" for v in VARIANTS) + f" | {r['ms']['flax.linen']:.3f} | "
            + " | ".join(f"**{r['ratio'][v]:.2f}** ({pct(r['spread'][v])})" for v in VARIANTS)
            + f" | {r['rounds']} |")
    r = why["resnet"]
    if r is None:
        return out
    out += ["", f"### why: the ResNet step ({r['label']}), dropnorm's statistics three ways",
            "", "| | " + " | ".join(VARIANTS) + " | flax |", "|---|" + "---:|" * 4,
            "| ms | " + " | ".join(f"{r['ms'][v]:.2f}" for v in VARIANTS)
            + f" | {r['ms']['flax']:.2f} |",
            "| flax / this (spread) | " + " | ".join(
                f"**{r['ratio'][v]:.3f}** ({pct(r['spread'][v])})" for v in VARIANTS)
            + " | |", "", f"Rounds: {r['rounds']}, interleaved."]
    return out
