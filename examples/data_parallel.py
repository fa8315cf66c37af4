"""Data-parallel training with dropnorm: the batch sharded over every device, plain ``jax.jit``.

A small classifier ``Dense -> batch_norm -> relu -> dropout`` (twice) ``-> Dense`` learns
scikit-learn's 8x8 handwritten digits (shipped with scikit-learn: nothing is downloaded)
with dropnorm's pure functions and optax's Adam. Each step's batch is split over all
devices with a ``NamedSharding`` along the mesh axis ``"batch"``; parameters, optimiser
state and the BatchNorm running statistics are replicated. The step is an ordinary
``jax.jit``-ed function with no ``axis_name`` anywhere: XLA sees the sharded batch and
inserts the cross-device reductions itself, so the batch statistics, the dropout masks
and the gradients are exactly those of one device holding the whole batch.

Run it the same way on any machine:

* CPU, 8 simulated devices:
  ``XLA_FLAGS=--xla_force_host_platform_device_count=8 python examples/data_parallel.py``
* one or more GPUs or TPU cores: ``python examples/data_parallel.py``
* several hosts (or several processes on one host): start the same command on every
  host with ``--distributed``; it calls ``jax.distributed.initialize`` first, with
  ``--coordinator-address``, ``--num-processes`` and ``--process-id`` where given (else
  JAX finds them itself on TPU pods, SLURM and the like, or reads
  ``JAX_COORDINATOR_ADDRESS``, ``JAX_NUM_PROCESSES`` and ``JAX_PROCESS_ID``). The mesh then
  spans every device of every host, each process supplies its own slice of the global
  batch (``jax.make_array_from_process_local_data``), and nothing else changes. Two
  processes of 4 CPU devices each on one machine (what ``tests/test_multiprocess.py``
  runs; JAX's CPU collectives between processes are gloo's, its default)::

      for i in 0 1; do
        XLA_FLAGS=--xla_force_host_platform_device_count=4 python examples/data_parallel.py \
          --distributed --coordinator-address 127.0.0.1:12345 --num-processes 2 \
          --process-id $i &
      done; wait

  On GPU or TPU hosts leave out ``XLA_FLAGS`` and give each host's own ``--process-id``
  (0 on the host whose address is the coordinator's).

It finishes in a few seconds on a CPU and prints the test accuracy (about 99%) and the
running statistics BatchNorm learned.

References:
  Ioffe & Szegedy, "Batch Normalization", ICML 2015. Srivastava et al., "Dropout",
  JMLR 2014. JAX documentation, "Distributed arrays and automatic parallelization".
"""

from __future__ import annotations

import argparse
import time

import jax
import jax.numpy as jnp
import numpy as np
import optax
from jax.sharding import Mesh, NamedSharding
from jax.sharding import PartitionSpec as P

import dropnorm

HIDDEN, CLASSES, RATE, MOMENTUM = 128, 10, 0.1, 0.9


def load_digits_split(seed: int = 0):
    """scikit-learn's digits: 1347 training and 450 test images of 64 pixels in [0, 1]."""
    from sklearn.datasets import load_digits

    x, y = load_digits(return_X_y=True)
    x = (x / 16.0).astype(np.float32)  # pixel values are 0..16
    perm = np.random.default_rng(seed).permutation(len(x))
    train, test = perm[:1347], perm[1347:]
    return x[train], y[train].astype(np.int32), x[test], y[test].astype(np.int32)


def init(key, n_in: int = 64):
    """Parameters (a dict) and the two BatchNorm states."""
    k1, k2, k3 = jax.random.split(key, 3)
    bn1, s1 = dropnorm.batch_norm_init(HIDDEN)
    bn2, s2 = dropnorm.batch_norm_init(HIDDEN)
    params = {
        "w1": jax.random.normal(k1, (n_in, HIDDEN)) * np.sqrt(2.0 / n_in),
        "bn1": bn1,
        "w2": jax.random.normal(k2, (HIDDEN, HIDDEN)) * np.sqrt(2.0 / HIDDEN),
        "bn2": bn2,
        "w3": jax.random.normal(k3, (HIDDEN, CLASSES)) * np.sqrt(1.0 / HIDDEN),
        "b3": jnp.zeros((CLASSES,)),
    }
    return params, (s1, s2)


def forward(params, states, x, key, train: bool):
    """Logits and the new BatchNorm states. The Dense layers before BatchNorm have no bias."""
    k1, k2 = jax.random.split(key) if train else (None, None)
    h, s1 = dropnorm.batch_norm(params["bn1"], states[0], x @ params["w1"], train,
                                momentum=MOMENTUM)
    h = dropnorm.dropout(k1, jax.nn.relu(h), RATE, train)
    h, s2 = dropnorm.batch_norm(params["bn2"], states[1], h @ params["w2"], train,
                                momentum=MOMENTUM)
    h = dropnorm.dropout(k2, jax.nn.relu(h), RATE, train)
    return h @ params["w3"] + params["b3"], (s1, s2)


def make_train_step(optimizer):
    """A pure train step: ``(params, states, opt_state, x, y, key) -> (..., loss)``.

    Nothing in it mentions devices: jit it, feed it a sharded batch, and XLA computes
    the global batch statistics, the loss over the global batch and its gradient.
    """

    def train_step(params, states, opt_state, x, y, key):
        def loss_fn(p):
            logits, new_states = forward(p, states, x, key, True)
            loss = optax.softmax_cross_entropy_with_integer_labels(logits, y).mean()
            return loss, new_states

        (loss, new_states), grads = jax.value_and_grad(loss_fn, has_aux=True)(params)
        updates, opt_state = optimizer.update(grads, opt_state, params)
        return optax.apply_updates(params, updates), new_states, opt_state, loss

    return train_step


def global_batch(sharding, x_local):
    """The global batch from this process's slice (on one host: the whole batch)."""
    shape = (x_local.shape[0] * jax.process_count(),) + x_local.shape[1:]
    return jax.make_array_from_process_local_data(sharding, x_local, shape)


def main(steps: int = 300, batch_size: int = 256, seed: int = 0, lr: float = 3e-3,
         log_every: int = 100, distributed: bool = False, verbose: bool = True,
         coordinator_address: str | None = None, num_processes: int | None = None,
         process_id: int | None = None, save: str | None = None) -> dict:
    """Train, evaluate and report. Returns the final numbers (used by the tests).

    With ``distributed``, ``jax.distributed.initialize(coordinator_address, num_processes,
    process_id)`` runs first (None: JAX's own discovery or its environment variables).
    ``save``: a ``.npz`` path; process 0 writes the loss of every step and the final
    BatchNorm running statistics there.
    """
    if distributed:
        jax.distributed.initialize(coordinator_address=coordinator_address,
                                   num_processes=num_processes, process_id=process_id)
    say = print if verbose else (lambda *a, **k: None)
    mesh = Mesh(np.array(jax.devices()), ("batch",))  # every device of every host
    data = NamedSharding(mesh, P("batch"))  # axis 0 split over the devices
    replicated = NamedSharding(mesh, P())
    n_dev, n_proc = mesh.size, jax.process_count()
    batch_size = -(-batch_size // n_dev) * n_dev  # a multiple of the device count
    per_process = batch_size // n_proc
    say(f"{n_dev} devices ({jax.devices()[0].platform}), {n_proc} process(es); global batch "
        f"{batch_size}, {batch_size // n_dev} examples per device")

    x, y, x_test, y_test = load_digits_split(seed)
    optimizer = optax.adam(lr)
    # Built by jitted functions with replicated outputs, which every process runs alike:
    # with several processes, ``jax.device_put`` cannot place a local array on the devices
    # of the other processes.
    params, states = jax.jit(lambda k: init(k, x.shape[1]), out_shardings=replicated)(
        jax.random.key(seed))
    opt_state = jax.jit(optimizer.init, out_shardings=replicated)(params)
    base_key = jax.jit(lambda: jax.random.key(seed + 1), out_shardings=replicated)()

    # Keep the state replicated: the batch statistics are already global, so this costs
    # nothing; it just fixes the layout of what the step returns.
    step = jax.jit(make_train_step(optimizer), out_shardings=replicated)
    evaluate = jax.jit(lambda p, s, x: forward(p, s, x, None, False)[0].argmax(-1))

    rng = np.random.default_rng(seed)
    losses = []  # replicated scalars, read once at the end (no sync per step)
    t0 = time.perf_counter()
    for i in range(steps):
        idx = rng.choice(len(x), batch_size, replace=False)  # same on every process
        mine = idx[jax.process_index() * per_process:(jax.process_index() + 1) * per_process]
        xb, yb = global_batch(data, x[mine]), global_batch(data, y[mine])
        key = jax.random.fold_in(base_key, i)
        params, states, opt_state, loss = step(params, states, opt_state, xb, yb, key)
        losses.append(loss)
        if log_every and (i + 1) % log_every == 0:
            say(f"step {i + 1:4d}  loss {float(loss):.4f}")
    losses = [float(v) for v in losses]
    first = losses[0]
    seconds = time.perf_counter() - t0

    x_test = jax.make_array_from_process_local_data(replicated, x_test)  # whole, everywhere
    pred = np.asarray(evaluate(params, states, x_test))
    accuracy = float(np.mean(pred == y_test))
    s1 = states[0]
    say(f"{steps} steps in {seconds:.1f} s; loss {first:.3f} -> {float(loss):.3f}; "
        f"test accuracy {accuracy:.1%} on {len(y_test)} held-out digits")
    say(f"layer 1 BatchNorm after {int(s1.count)} updates: running mean in "
        f"[{float(s1.mean.min()):.2f}, {float(s1.mean.max()):.2f}], running var in "
        f"[{float(s1.var.min()):.3f}, {float(s1.var.max()):.3f}]; state replicated on all "
        f"{n_dev} devices: {s1.mean.sharding.is_fully_replicated}")
    if save and jax.process_index() == 0:
        np.savez(save, losses=np.asarray(losses), processes=n_proc, devices=n_dev,
                 accuracy=accuracy, **{f"bn{i + 1}_{k}": np.asarray(getattr(s, k))
                                      for i, s in enumerate(states) for k in s._fields})
        say(f"wrote {save}")
    return {"accuracy": accuracy, "first_loss": first, "last_loss": float(loss),
            "losses": losses, "devices": n_dev, "processes": n_proc, "batch_size": batch_size,
            "states": states, "params": params}


if __name__ == "__main__":
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--steps", type=int, default=300)
    ap.add_argument("--batch-size", type=int, default=256)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--lr", type=float, default=3e-3)
    ap.add_argument("--distributed", action="store_true",
                    help="call jax.distributed.initialize first (multi-host runs)")
    ap.add_argument("--coordinator-address", help="host:port of process 0 (with --distributed)")
    ap.add_argument("--num-processes", type=int, help="how many processes (with --distributed)")
    ap.add_argument("--process-id", type=int, help="this process's index (with --distributed)")
    ap.add_argument("--save", metavar="NPZ",
                    help="write the per-step losses and final BatchNorm statistics (process 0)")
    a = ap.parse_args()
    given = [f for f in ("coordinator_address", "num_processes", "process_id")
             if getattr(a, f) is not None]
    if given and not a.distributed:
        ap.error(f"--{given[0].replace('_', '-')} needs --distributed")
    main(a.steps, a.batch_size, a.seed, a.lr, distributed=a.distributed,
         coordinator_address=a.coordinator_address, num_processes=a.num_processes,
         process_id=a.process_id, save=a.save)
