"""The tables of BENCHMARKS.md from a ``--json`` result, in the order the page shows them.

Each table module prints its own tables (``grid.layer_markdown``, ``masks.masks_markdown``,
``steps.steps_markdown``, ``scale.scale_markdown``, ``scale.sharded_markdown``,
``attention.attention_markdown``, ``why.why_markdown``); :func:`markdown` puts together
those a result holds.
"""

from __future__ import annotations

from benchmarks import grid, masks
from benchmarks.attention import attention_markdown
from benchmarks.scale import scale_markdown, sharded_markdown
from benchmarks.steps import steps_markdown
from benchmarks.why import why_markdown


def markdown(result: dict) -> str:
    """The tables of BENCHMARKS.md from a ``--json`` result (any subset of the tables)."""
    out = grid.layer_markdown(result)
    out += masks.masks_markdown(result)
    out += grid.copy_residual_markdown(result)
    if result.get("steps"):
        out += steps_markdown(result["steps"])
    if result.get("why"):
        out += why_markdown(result["why"])
    if result.get("scale"):
        out += scale_markdown(result["scale"])
    if result.get("sharded"):
        out += sharded_markdown(result["sharded"])
    out += grid.twelve_layer_markdown(result)
    if result.get("attention"):
        out += attention_markdown(result["attention"])
    return "\n".join(out)
