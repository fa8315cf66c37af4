"""The command line: ``python benchmarks/bench.py [options]`` or ``python -m benchmarks``.

Which tables a run measures, with what settings (the package docstring says what each
table is); ``--json`` writes every number, ``--markdown`` prints the tables of an earlier
result. Two hidden options, ``--scale-worker N`` and ``--sharded-worker N``, run the body of
one scale subprocess (on N simulated devices) and print its result as JSON.
"""

from __future__ import annotations

import argparse
import functools
import json
import time

import benchmarks
from benchmarks import grid, masks, report, scale, timing
from benchmarks.attention import run_attention
from benchmarks.models import RATE
from benchmarks.steps import run_steps
from benchmarks.why import run_why


def main(argv=None) -> int:
    """Parse ``argv`` (default: ``sys.argv[1:]``), run the tables asked for, print them."""
    parser = argparse.ArgumentParser(description=benchmarks.__doc__.split("\n")[0])
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
    parser.add_argument("--modes", default=",".join(grid.MODES),
                        help="comma-separated subset of " + ",".join(grid.MODES)
                             + " (eval: batch norm only)")
    parser.add_argument("--ops", default="dropout,batch_norm", help="comma-separated subset")
    parser.add_argument("--markdown", metavar="JSON",
                        help="print the BENCHMARKS.md tables of an earlier --json run and exit")
    parser.add_argument("--scale", action="store_true",
                        help="only the scale tables (collectives and trace+compile time): "
                             "axis_name and sharded jit")
    parser.add_argument("--sharded", action="store_true",
                        help="only the sharded-jit table (the batch on a mesh, a plain "
                             "jax.jit: collectives per BatchNorm layer at 8 and 64 devices, "
                             "a ResNet step's collectives and trace+compile; --quick: 8 "
                             "devices, the tiny ResNet)")
    parser.add_argument("--steps", action="store_true",
                        help="only the steps table (whole training steps, time and compile)")
    parser.add_argument("--attention", action="store_true",
                        help="only the attention table (issue 15: a Transformer block's "
                             "train step, temp memory and time, at lengths 512 and 2048)")
    parser.add_argument("--why", action="store_true",
                        help="only the why tables: the statistics alone, and the forward and "
                             "the ResNet step with dropnorm's statistics three ways (as is, "
                             "second round always, Flax's raw sums), against Flax")
    parser.add_argument("--scale-worker", type=int, metavar="DEVICES", help=argparse.SUPPRESS)
    parser.add_argument("--sharded-worker", type=int, metavar="DEVICES", help=argparse.SUPPRESS)
    parser.add_argument("--models", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.markdown:
        with open(args.markdown) as f:
            print(report.markdown(json.load(f)))
        return 0
    if args.scale_worker:  # one subprocess of run_scale: the result as JSON on the last line
        print(json.dumps(scale.scale_worker(args.scale_worker, args.repeats or 5,
                                            args.models)))
        return 0
    if args.sharded_worker:  # one subprocess of run_sharded, the same way
        print(json.dumps(scale.sharded_worker(args.sharded_worker, args.repeats or 5,
                                              args.models, args.quick)))
        return 0
    shapes = grid.QUICK_SHAPES if args.quick else grid.FULL_SHAPES
    repeats = args.repeats or (3 if args.quick else 7)
    ops, modes = args.ops.split(","), args.modes.split(",")
    if bad := [m for m in modes if m not in grid.MODES]:
        parser.error(f"--modes: unknown mode(s) {bad}; choose from {','.join(grid.MODES)}")
    target = (None if args.quick else 0.10) if args.target_spread is None else args.target_spread
    target = target or None  # 0: no extra rounds
    max_repeats = args.max_repeats or (repeats if args.quick else 3 * repeats)
    step_repeats = args.repeats or (3 if args.quick else 21)
    steps = functools.partial(
        run_steps, args.quick, step_repeats, args.compile_reps or (1 if args.quick else 5),
        target, args.max_repeats or (step_repeats if args.quick else 5 * step_repeats))
    t0 = time.perf_counter()
    info = timing.machine()
    print(json.dumps({k: v for k, v in info.items() if k != "lscpu"}))
    if args.scale:
        result = {"scale": scale.run_scale(reps=args.repeats or 5),
                  "sharded": scale.run_sharded(reps=args.repeats or 5)}
    elif args.sharded:
        result = {"sharded": scale.run_sharded(args.quick, args.repeats or 5)}
    elif args.steps:
        result = {"steps": steps()}
    elif args.why:
        result = {"why": run_why(shapes, repeats, args.quick, target_spread=target,
                                 max_repeats=max_repeats)}
    elif args.attention:
        result = {"attention": run_attention(args.quick, args.repeats or (3 if args.quick
                                                                          else 7))}
    else:
        # --quick leaves out the two alternative dropout memory policies, the axis_name scale
        # table and the attention table, and runs a small sharded-jit table (8 devices)
        result = grid.run(shapes, repeats, ops, modes, layer_shape=(256, 64),
                     policies=not args.quick, target_spread=target, max_repeats=max_repeats)
        if "dropout" in ops:
            result["random_words"] = masks.time_random_words(shapes, repeats)
        result["twelve_layer"] = grid.twelve_layer_memory(args.quick)
        for r in result["residuals"]:
            print(f"residual {r['op']:10s} {r['dtype']:4s} {r['impl']:10s} "
                  f"{r['bytes_per_element']:.3f} bytes/element")
        print(grid.bn_target_summary(result["rows"], target or 0.10))
        result["steps"] = steps()  # --quick: the tiny models, 3 rounds, 1 compile
        if "batch_norm" in ops:  # why a batch-norm cell misses, in the same run
            result["why"] = run_why(shapes, repeats, args.quick, target_spread=target,
                                    max_repeats=max_repeats)
        if args.quick:
            result["sharded"] = scale.run_sharded(True, 1)  # 8 devices, 1 compile
        else:
            result["scale"] = scale.run_scale(reps=5)
            result["sharded"] = scale.run_sharded(False, 5)
            result["attention"] = run_attention(False, repeats)
    result.update(machine=info, quick=args.quick, repeats=repeats, rate=RATE,
                  target_spread=target, max_repeats=max_repeats,
                  code=timing.code_version(), seconds=time.perf_counter() - t0)
    print(f"total {result['seconds']:.1f} s")
    if args.json:
        with open(args.json, "w") as f:
            json.dump(result, f, indent=1)
    return 0
