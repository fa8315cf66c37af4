"""The attention table (issue 15): a Transformer block's training step, two attentions.

One pre-LN Transformer block (LayerNorm -> flax.linen.MultiHeadDotProductAttention with
attention dropout -> residual; LayerNorm -> MLP -> residual), jitted with its optax update.
Contenders differ only in the block's ``attention_fn``; they share the variables and the
arguments. Compiled temp memory is exact (XLA's buffer assignment); times are medians over
interleaved rounds (:func:`benchmarks.timing.time_interleaved`), ratios medians of
per-round ratios. :func:`run_attention` measures, :func:`attention_markdown` prints.
"""

from __future__ import annotations

import functools
import statistics
from collections.abc import Callable

import flax.linen as nn
import jax
import jax.numpy as jnp

import dropnorm
from benchmarks.models import RATE
from benchmarks.timing import pct, ratio_stats, time_interleaved, uptime

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
    out = {"uptime_before": uptime(), "repeats": repeats, "rate": RATE, "batch": 2,
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
                  f"{r['flax_over_this']:5.2f} (spread {pct(r['spread'])})", flush=True)
        out["lengths"].append({"length": length, "default_rows": _default_chunk_rows(length),
                               "rows": rows})
    out["uptime_after"] = uptime()
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
                       f"| {bold}{r['flax_over_this']:.2f}{bold} | {pct(r['spread'])} |")
    last = att["lengths"][-1]
    ours = next(r for r in last["rows"] if r["impl"] == "dropnorm")
    met = ours["temp_over_flax"] <= att["target"] and ours["flax_over_this"] >= 1.0
    out += ["", f"Target (issue 15): temp memory <= {att['target']}x Flax's at length "
            f"{last['length']} with time no slower: temp {ours['temp_over_flax']:.3f}x, "
            f"time {ours['flax_over_this']:.2f}x faster: {'met' if met else 'NOT met'}.", "",
            f"Load: before `{att['uptime_before']}`; after `{att['uptime_after']}`.", ""]
    return out
