"""Dropout's masks: the other backward-pass memory policies, the mask resolution, raw words.

dropnorm's dropout regenerates its mask from the key in the backward pass (0 bytes kept per
element). The layer grid times it, in full runs, against the two other policies (a
bit-packed mask, :func:`pack_bits`, or a bool mask, kept for the backward pass: same masks,
same forward values) and against 32-bit masks instead of the default 16
(:data:`POLICIES`, :data:`BIT_VARIANTS`); :func:`time_random_words` times the raw bits of a
mask, threefry against dropnorm's hash. :func:`masks_markdown` prints their tables.
"""

from __future__ import annotations

import math
import statistics

import jax
import jax.numpy as jnp

import dropnorm
from benchmarks.models import RATE
from benchmarks.timing import time_interleaved
from dropnorm import _masks

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


def dropout_packed(x, scale, bias, key):
    return _packed(x, key)


def dropout_bool(x, scale, bias, key):
    return _bool(x, key)


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


def masks_markdown(result: dict) -> list[str]:
    """The policy, mask-resolution and random-word tables of BENCHMARKS.md (if measured)."""
    rows = result.get("rows", [])
    out = []
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
    return out
