"""The benchmark's entry point: ``python benchmarks/bench.py [options]`` (``--help``).

The code is the ``benchmarks`` package beside this file (its docstring says what each table
measures, ``python -m benchmarks`` is the same command). Run as a script, or imported as
``bench`` with ``benchmarks/`` on ``sys.path`` (as the tests do), this file loads that
package from its own directory, without putting the repository root on ``sys.path``, so
``dropnorm`` is still the one the environment provides. The names tests and docs use from
``bench`` are re-exported here.
"""

from __future__ import annotations

import importlib.util
import pathlib
import sys


def _load_package():
    """The ``benchmarks`` package of this directory (imported once, then from sys.modules)."""
    here = pathlib.Path(__file__).resolve().parent
    found = sys.modules.get("benchmarks")
    if found is not None and pathlib.Path(found.__file__ or "").resolve().parent == here:
        return found
    spec = importlib.util.spec_from_file_location(
        "benchmarks", here / "__init__.py", submodule_search_locations=[str(here)])
    module = importlib.util.module_from_spec(spec)
    sys.modules["benchmarks"] = module
    spec.loader.exec_module(module)
    return module


_load_package()

# Re-exported: what tests/test_bench.py, tests/test_scale.py, tests/test_memory.py and
# BENCHMARKS.md use as ``bench.<name>``.
from benchmarks import (  # noqa: E402
    attention,
    grid,
    masks,
    models,
    report,
    scale,
    steps,
    timing,
    why,
)
from benchmarks.cli import main  # noqa: E402
from benchmarks.grid import (  # noqa: E402
    DTYPES,
    MAIN,
    MODES,
    bn_target_summary,
    eval_stats,
    run,
)
from benchmarks.grid import _batch_norm_eval_layers as _batch_norm_eval_layers  # noqa: E402
from benchmarks.models import (  # noqa: E402
    RATE,
    ResNet,
    Transformer,
    twelve_layer_step,
    twelve_layer_temp_bytes,
)
from benchmarks.report import markdown  # noqa: E402
from benchmarks.scale import (  # noqa: E402
    SCALE_FEATURES,
    conditional_collectives,
    hlo_collectives,
    run_scale,
    run_sharded,
    scale_layers,
    sharded_layers,
)
from benchmarks.steps import STEP_SIZES, run_steps, step_models  # noqa: E402
from benchmarks.timing import (  # noqa: E402
    SPREAD_LEVEL,
    median_interval,
    ratio_stats,
    spread_above,
    time_interleaved,
)

__all__ = [
    "DTYPES", "MAIN", "MODES", "RATE", "SCALE_FEATURES", "SPREAD_LEVEL", "STEP_SIZES",
    "ResNet", "Transformer", "attention", "bn_target_summary", "conditional_collectives",
    "eval_stats", "grid",
    "hlo_collectives", "main", "markdown", "masks", "median_interval", "models",
    "ratio_stats", "report", "run", "run_scale", "run_sharded", "run_steps", "scale",
    "scale_layers", "sharded_layers", "spread_above", "step_models", "steps",
    "time_interleaved", "timing", "twelve_layer_step", "twelve_layer_temp_bytes", "why",
]

if __name__ == "__main__":
    sys.exit(main())
