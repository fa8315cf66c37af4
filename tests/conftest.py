"""Test configuration: 8 simulated CPU devices, fast compiles, warnings as errors.

XLA_FLAGS must be set before JAX initialises its backends, so they are set here, at import
time of the first conftest, for every test module of the session and for the subprocesses
that tests start (they inherit the environment):

- ``--xla_force_host_platform_device_count=8``: 8 simulated CPU devices.
- ``--xla_backend_optimization_level=0``: LLVM's code generation for XLA CPU without its
  optimisation passes. Most of the suite's time is XLA compiling small programs that then
  run once on tiny inputs; this took the suite from 386 s to about 290 s (2026-12-04, idle,
  an empty compilation cache). It acts below XLA's HLO passes, so the compiled programs'
  structure that tests read (collectives, fusions, temp memory, residuals) is the one users
  get. Floating point differs in one respect: without LLVM's passes no multiply-add is
  contracted into an FMA, so float32 results may differ from a default build's in the last
  bits; every tolerance in the suite holds for both, and the one test that checks a figure
  quoted from a default build (the fold example's largest rounding difference,
  tests/test_docs.py) runs it in a subprocess with the default flags. Benchmarks never run
  with it.
- ``--xla_cpu_use_fusion_emitters=false``: XLA CPU's older, LLVM-IR emitters for fused
  computations instead of its MLIR fusion emitters, whose compile pipeline costs about as
  much again for a small program (92 small compiles: 2.2 s with them, 1.0 s without; the
  suite from about 340 s to about 200 s, 2026-12-04, idle). XLA's fusion decisions, buffer
  assignment and collectives are the same: the optimised HLO of a sharded batch norm, its
  gradient, dropout and attention differed only in single operations that the MLIR
  emitters wrap as one-instruction fusions (``wrapped_add``), with identical temp memory.
  Like the flag above, it may change float32 results in the last bits (the fold example's
  largest difference: 2.86e-6 with both flags, 2.38e-6 without), so that test strips it
  too.
- ``--xla_cpu_multi_thread_eigen=false``: no thread pool for Eigen's kernels (pytest-xdist
  runs one process per core, and a test's tiny programs gain nothing from one).

JAX's persistent compilation cache is not used, though it made a second run of the suite
twice as fast: with it, on XLA CPU (jax 0.10.2), a program loaded from the cache sometimes
computed NaN where the same program compiled afresh never did (dropnorm's attention with
dropout at rate 0.5, jitted and called 30 times after ``jax.clear_caches()``: NaN in 11 of
180 calls with the cache, with and without the flag above, and in 0 of 90 without it;
2026-12-04). It showed as
a flaky test_export. A ``JAX_COMPILATION_CACHE_DIR`` set in the environment is JAX's own
setting and is left as it is.

One MLIR context per test file: JAX builds a fresh MLIR context for every program it lowers
(``jax._src.interpreters.mlir.make_ir_context``), loading every dialect into it: 2.0 to
4.6 ms each here (two measurements), 0.6 ms to free, for each of the suite's 6,000-odd
lowerings; and each lowering then uniques its types and attributes afresh. conftest makes
that function return one context, kept until the end of the file (then dropped with JAX's
caches). The modules lowered into it, and so the compiled programs, are the same; only the
uniquing tables are shared. Three files (test_batch_norm, test_linen, test_distributed)
took 52 s instead of 67-69 s in one process (2026-12-04, alternating runs). Set
``DROPNORM_TEST_FRESH_MLIR_CONTEXTS=1`` to lower as JAX does by default; if JAX renames the
function, the suite lowers that way too, only slower.
"""

import ctypes
import gc
import os

# Unknown words stop XLA's flag parsing (the flags after one are ignored): only real flags.
_FLAGS = ["--xla_force_host_platform_device_count=8", "--xla_backend_optimization_level=0",
          "--xla_cpu_use_fusion_emitters=false",
          "--xla_cpu_multi_thread_eigen=false"]
_flags = os.environ.get("XLA_FLAGS", "").split()
for _flag in _FLAGS:
    if not any(f.split("=")[0] == _flag.split("=")[0] for f in _flags):
        _flags.append(_flag)
os.environ["XLA_FLAGS"] = " ".join(_flags)
os.environ.setdefault("JAX_PLATFORMS", "cpu")


import jax  # noqa: E402  (after XLA_FLAGS)
import pytest  # noqa: E402


def _share_mlir_context() -> dict | None:
    """Make JAX lower every program into one MLIR context until ``.clear()`` (docstring
    above); None when asked not to, or when JAX has no such function to replace."""
    if os.environ.get("DROPNORM_TEST_FRESH_MLIR_CONTEXTS"):
        return None
    from jax._src.interpreters import mlir

    fresh = getattr(mlir, "make_ir_context", None)
    if fresh is None:
        return None
    held: dict = {}

    def shared():
        if "context" not in held:
            held["context"] = fresh()
        return held["context"]

    mlir.make_ir_context = shared
    return held


_MLIR_CONTEXT = _share_mlir_context()

# Seconds each file took in one worker (2026-12-04, idle 2-core machine), for the order below.
_FILE_SECONDS = {
    "test_examples.py": 41, "test_distributed.py": 30, "test_memory.py": 22,
    "test_export.py": 20, "test_docs.py": 19, "test_multiprocess.py": 19,
    "test_batch_norm.py": 18, "test_linen.py": 18, "test_transforms.py": 18,
    "test_scale.py": 16, "test_flax_usage.py": 13, "test_family.py": 12, "test_equinox.py": 11,
    "test_readme.py": 11, "test_nnx.py": 11, "test_masks.py": 11, "test_attention.py": 8,
    "test_population.py": 7, "test_mc_dropout.py": 6, "test_drop_block.py": 5,
}


def pytest_collection_modifyitems(config, items):
    """Run the longest files first. pytest-xdist (``--dist=loadfile``) hands whole files to
    the workers in this order, so the short ones fill the end and both workers finish close
    together, instead of one running a long file alone at the end (which cost 10-20 s). The
    order within a file is kept; files not listed (short ones) keep theirs, after these."""
    items.sort(key=lambda item: -_FILE_SECONDS.get(item.path.name, 0))


def pytest_configure(config):
    # Warnings are errors (also set in pyproject.toml, kept here so a bare `pytest tests/x.py`
    # from another rootdir behaves the same).
    config.addinivalue_line("filterwarnings", "error")


def _malloc_trim():
    """glibc's ``malloc_trim(0)``: give the heap's free pages back to the system; a no-op
    where the C library has no such function (macOS, musl)."""
    try:
        return ctypes.CDLL(None).malloc_trim  # this process's own symbols: the C library's
    except (OSError, AttributeError, TypeError):  # no C library symbols (Windows)
        return lambda pad: 0


_trim = _malloc_trim()


@pytest.fixture(autouse=True, scope="module")
def _release_compiled_programs():
    """After each test file, drop JAX's in-memory caches of traced and compiled programs,
    and hand the freed memory back to the system.

    A worker runs whole files (``--dist=loadfile``) and the programs of one file are
    rarely another's; kept, they grew each worker to 4.4 GB by the end of the suite. Freed,
    they stayed in glibc's heap as free but resident pages between live blocks: a worker
    still held 1.3 GB after test_batch_norm.py, and 1.5-1.7 GB for the rest of the suite,
    whatever the next file needed; ``malloc_trim(0)`` returns them (1.3 GB -> 0.33 GB after
    that file, measured 2026-12-04), so each file starts from the worker's live memory."""
    yield
    if _MLIR_CONTEXT is not None:
        _MLIR_CONTEXT.clear()  # the next file lowers into a new one
    jax.clear_caches()
    gc.collect()
    _trim(0)
