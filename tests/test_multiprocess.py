"""A real multi-process run: 2 processes of 4 CPU devices each, through ``jax.distributed``.

Simulated devices (tests/conftest.py) share one process and one XLA client; here two
Python processes on this machine each own 4 CPU devices, join through
``jax.distributed.initialize(coordinator_address="127.0.0.1:<free port>",
num_processes=2, process_id=i)`` and exchange data with JAX's CPU collectives between
processes (gloo over TCP, JAX 0.10's default ``jax_cpu_collectives_implementation``). The
coordinator listens on 127.0.0.1; gloo connects to the address this machine's host name
resolves to (``/etc/hosts``: 127.0.0.1 here).

* ``examples/data_parallel.py --distributed`` trains on the 8 devices of the 2 processes and
  must give the losses and final BatchNorm statistics of one process with 8 devices.
* ``batch_norm(..., axis_name="b")`` under ``shard_map`` over a mesh of the 8 devices of
  both processes (plain, masked uneven shards, groups that straddle the two processes):
  outputs, new state and gradients equal the single-device result on the whole batch.

Each test launches both processes itself, with a deadline, and kills them (by their own
process ids) if either fails or the deadline passes, so a hung collective cannot hang the
test session. Run as a script, this file is the worker of the second test.
"""

from __future__ import annotations

import os
import pathlib
import socket
import subprocess
import sys
import tempfile
import time

import numpy as np

ROOT = pathlib.Path(__file__).resolve().parents[1]
PROCESSES, LOCAL_DEVICES = 2, 4
TIMEOUT = 300  # seconds for both processes together; measured 8 to 55 s (idle to load 6)
F = 16  # features of the shard_map layer


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _launch(argv_of, timeout: float = TIMEOUT) -> list[str]:
    """Start ``PROCESSES`` processes, ``argv_of(i, address)``; their outputs, or fail.

    Each process gets ``LOCAL_DEVICES`` CPU devices. If one exits with an error, the others
    are killed at once (they would wait for it in a collective); so are all of them at the
    deadline. Outputs go to files, so a full pipe can never block a process.
    """
    # The benchmark's subprocess environment: the session's XLA flags (tests/conftest.py: its
    # fast compiles) with LOCAL_DEVICES devices, and the dropnorm under test first on the path.
    sys.path.insert(0, str(ROOT / "benchmarks"))
    from bench import scale

    address = f"127.0.0.1:{_free_port()}"
    env = scale.worker_env(LOCAL_DEVICES)
    with tempfile.TemporaryDirectory() as tmp:
        logs = [open(os.path.join(tmp, f"{i}.log"), "w+") for i in range(PROCESSES)]
        procs = [subprocess.Popen(argv_of(i, address), env=env, cwd=str(ROOT), stdout=logs[i],
                                  stderr=subprocess.STDOUT) for i in range(PROCESSES)]
        deadline, failed = time.monotonic() + timeout, None
        try:
            while any(p.poll() is None for p in procs):
                failed = next((i for i, p in enumerate(procs) if p.poll()), None)
                if failed is not None or time.monotonic() > deadline:
                    break
                time.sleep(0.2)
            failed = next((i for i, p in enumerate(procs) if p.poll()), failed)
        finally:
            for p in procs:
                if p.poll() is None:
                    p.kill()
                p.wait()
        outs = []
        for log in logs:
            log.seek(0)
            outs.append(log.read())
            log.close()
    codes = [p.returncode for p in procs]
    report = "\n".join(f"--- process {i} (exit {c}) ---\n{o[-3000:]}"
                       for i, (c, o) in enumerate(zip(codes, outs, strict=True)))
    assert failed is None and codes == [0] * PROCESSES, (
        f"{'timed out after ' + str(timeout) + ' s' if failed is None else 'failed'}:\n{report}")
    return outs


def test_data_parallel_example_on_two_processes_equals_one_process(tmp_path):
    # 10 steps: ten losses and the BatchNorm state carried through ten updates, compared
    # with one process's. Each step costs about 90 ms of gloo collectives between the two
    # processes on CPU (a few ms in one process); 40 steps cost 5 CPU-seconds more.
    steps = 10
    out = tmp_path / "two.npz"
    outs = _launch(lambda i, address: [
        sys.executable, "examples/data_parallel.py", "--steps", str(steps), "--distributed",
        "--coordinator-address", address, "--num-processes", str(PROCESSES),
        "--process-id", str(i)] + (["--save", str(out)] if i == 0 else []))
    assert "8 devices (cpu), 2 process(es)" in outs[0], outs[0]
    assert "state replicated on all 8 devices: True" in outs[0], outs[0]
    two = np.load(out)

    # One process with the 8 devices of this session (tests/conftest.py), same command.
    import importlib.util

    spec = importlib.util.spec_from_file_location("data_parallel_mp",
                                                  ROOT / "examples" / "data_parallel.py")
    example = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(example)
    one = example.main(steps=steps, log_every=0, verbose=False)
    assert one["devices"] == int(two["devices"]) == 8 and one["processes"] == 1
    assert int(two["processes"]) == 2
    # Same program on the same 8-device mesh; only the transport of the cross-device sums
    # differs (gloo between the processes, in-process within one), which adds them in
    # another order: float32 rounding of O(1) sums. Measured (2026-12-01, 40 steps, before
    # and after the O(features) moments): not bitwise equal; losses differ by at most
    # 1.2e-7, running means by 8e-7 and variances by 3.6e-7 (values up to 2.4). 1e-5 leaves
    # a margin of 10 over that, far below what one wrong shard (a different batch, a local
    # statistic) changes.
    np.testing.assert_allclose(two["losses"], one["losses"], rtol=1e-5, atol=1e-6)
    for i, s in enumerate(one["states"]):
        for k in s._fields:
            np.testing.assert_allclose(two[f"bn{i + 1}_{k}"], np.asarray(getattr(s, k)),
                                       rtol=1e-5, atol=1e-5, err_msg=f"bn{i + 1}.{k}")


def _cases():
    """(name, x, mask, groups, ct, params, state): the same numbers in every process."""
    import dropnorm

    rng = np.random.default_rng(0)
    n = PROCESSES * LOCAL_DEVICES
    x = (2.0 + 3.0 * rng.standard_normal((n * 6, F))).astype(np.float32)
    ct = rng.standard_normal(x.shape).astype(np.float32)
    p, s = dropnorm.batch_norm_init(F)
    p = dropnorm.BatchNormParams(1.0 + 0.3 * rng.standard_normal(F).astype(np.float32),
                                 0.2 * rng.standard_normal(F).astype(np.float32))
    s = s._replace(mean=0.1 * np.arange(F, dtype=np.float32))
    # Uneven valid rows per device (device d keeps d % 6 + 1 of its 6 rows).
    mask = (np.arange(6)[None, :] <= np.arange(n)[:, None] % 6).reshape(-1, 1)
    mask = np.broadcast_to(mask, x.shape)
    groups = [[0, 1, 2], [3, 4, 5, 6, 7]]  # unequal; the second spans both processes
    return [("plain", x, None, None, ct, p, s), ("mask", x, mask, None, ct, p, s),
            ("groups", x, None, groups, ct, p, s)]


def _layer(p, s, x, m, ct, groups):
    """Output, new state and the gradients of ``sum(y * ct)`` w.r.t. params and x."""
    import jax
    import jax.numpy as jnp

    import dropnorm

    def loss(p, x):
        y, ns = dropnorm.batch_norm(p, s, x, True, momentum=0.9, mask=m, axis_name="b",
                                    axis_index_groups=groups)
        return jnp.sum(y * ct), (y, ns)

    (_, (y, ns)), g = jax.value_and_grad(loss, (0, 1), has_aux=True)(p, x)
    return y, ns, g


def _worker(process_id: int, address: str, out: str) -> None:
    import jax

    jax.distributed.initialize(coordinator_address=address, num_processes=PROCESSES,
                               process_id=process_id)
    from jax.experimental import multihost_utils
    from jax.sharding import Mesh, NamedSharding
    from jax.sharding import PartitionSpec as P

    assert jax.process_count() == PROCESSES and jax.local_device_count() == LOCAL_DEVICES
    mesh = Mesh(np.array(jax.devices()), ("b",))  # 8 devices, 4 per process
    rows, rep = NamedSharding(mesh, P("b")), NamedSharding(mesh, P())
    saved = {}
    for name, x, m, groups, ct, p, s in _cases():
        def shard(a):  # this process's consecutive half of the global batch
            half = a.shape[0] // PROCESSES
            local = a[process_id * half:(process_id + 1) * half]
            return jax.make_array_from_process_local_data(rows, np.ascontiguousarray(local),
                                                          a.shape)

        def body(p, s, x, m, ct, groups=groups, masked=m is not None):
            y, ns, (gp, gx) = _layer(p, s, x, m if masked else None, ct, groups)
            if groups is not None:  # per-group statistics differ between devices
                ns = jax.tree.map(lambda a: a[None], ns)
            return y, ns, gp, gx

        st = P() if groups is None else P("b")
        f = jax.jit(jax.shard_map(body, mesh=mesh,
                                  in_specs=(P(), P(), P("b"), P("b"), P("b")),
                                  out_specs=(P("b"), st, P(), P("b"))))
        mm = shard(np.ones(x.shape, bool) if m is None else m)
        pr, sr = jax.device_put((p, s), rep)
        y, ns, gp, gx = f(pr, sr, shard(x), mm, shard(ct))
        for k, v in {"y": y, "dx": gx, "dscale": gp.scale, "dbias": gp.bias,
                     **{f"state_{f}": getattr(ns, f) for f in ns._fields}}.items():
            saved[f"{name}_{k}"] = np.asarray(multihost_utils.process_allgather(v, tiled=True))
    if process_id == 0:
        np.savez(out, **saved)
    print(f"process {process_id}: {len(saved)} arrays, devices {jax.device_count()}", flush=True)


def test_batch_norm_under_shard_map_across_two_processes_equals_one_device(tmp_path):
    import jax

    import dropnorm

    out = tmp_path / "bn.npz"
    _launch(lambda i, address: [sys.executable, __file__, str(i), address, str(out)])
    got = np.load(out)
    one = jax.devices()[0]
    for name, x, m, groups, ct, p, s in _cases():
        # The single-device reference on the whole batch (per group, for groups).
        parts = [slice(None)] if groups is None else [
            slice(g[0] * 6, (g[-1] + 1) * 6) for g in groups]
        dscale = dbias = 0.0
        for part in parts:
            xs = jax.device_put(x[part], one)
            ms = None if m is None else jax.device_put(m[part], one)

            def loss(p, x, s=s, ms=ms, cs=ct[part]):
                y, ns = dropnorm.batch_norm(p, s, x, True, momentum=0.9, mask=ms)
                return (y * cs).sum(), (y, ns)

            (_, (y, ns)), (gp, gx) = jax.jit(jax.value_and_grad(loss, (0, 1), has_aux=True))(
                p, xs)
            dscale, dbias = dscale + np.asarray(gp.scale), dbias + np.asarray(gp.bias)
            want = {"y": y, "dx": gx, "state_mean": ns.mean, "state_var": ns.var,
                    "state_count": ns.count}
            for k, v in want.items():
                g = got[f"{name}_{k}"]
                if groups is not None and k.startswith("state"):
                    g = g[part.start // 6]  # the state held by the group's first device
                elif k in ("y", "dx"):
                    g = g[part]
                # 1e-5 as in tests/test_distributed.py: float32 sums in another order.
                np.testing.assert_allclose(g, np.asarray(v), rtol=1e-5, atol=1e-5,
                                           err_msg=f"{name}: {k}")
        # Parameter gradients are sums over the whole batch (over every group's loss).
        np.testing.assert_allclose(got[f"{name}_dscale"], dscale, rtol=1e-5, atol=1e-5)
        np.testing.assert_allclose(got[f"{name}_dbias"], dbias, rtol=1e-5, atol=1e-5)
        if groups is not None:  # and every device of a group holds its group's state
            for g in groups:
                held = got[f"{name}_state_var"][g]
                np.testing.assert_array_equal(held, np.broadcast_to(held[0], held.shape))


if __name__ == "__main__":
    _worker(int(sys.argv[1]), sys.argv[2], sys.argv[3])
