"""Fold a trained batch norm into the Dense layer before it, for inference.

A small classifier ``Dense(64 -> 64) -> batch_norm -> relu -> Dense(64 -> 10)``
is trained for a few seconds on scikit-learn's 8x8 digits (shipped with
scikit-learn: nothing is downloaded) with dropnorm's pure functions and optax.
Then ``dropnorm.fold_batch_norm`` turns the first Dense layer and the batch
norm's running statistics into one Dense layer, and the script checks that the
folded network predicts the same classes with logits equal up to float32
rounding.

Run: ``python examples/fold_batch_norm.py`` (about five seconds on a CPU).
"""

from __future__ import annotations

import argparse

import jax
import jax.numpy as jnp
import numpy as np
import optax
from sklearn.datasets import load_digits

import dropnorm

HIDDEN, CLASSES = 64, 10


def _data(seed: int = 0):
    x, y = load_digits(return_X_y=True)
    x = (x / 16.0).astype(np.float32)  # pixel values are 0..16
    perm = np.random.default_rng(seed).permutation(len(x))
    train, test = perm[:1347], perm[1347:]
    return x[train], y[train].astype(np.int32), x[test], y[test].astype(np.int32)


def init(key, n_in: int):
    k1, k2 = jax.random.split(key)
    params = {
        "w1": jax.random.normal(k1, (n_in, HIDDEN)) / np.sqrt(n_in),
        "b1": jnp.zeros(HIDDEN),
        "w2": jax.random.normal(k2, (HIDDEN, CLASSES)) / np.sqrt(HIDDEN),
        "b2": jnp.zeros(CLASSES),
    }
    bn_params, bn_state = dropnorm.batch_norm_init(HIDDEN)
    params["bn"] = bn_params
    return params, bn_state


def forward(params, bn_state, x, train: bool):
    h = x @ params["w1"] + params["b1"]
    h, bn_state = dropnorm.batch_norm(params["bn"], bn_state, h, train, momentum=0.9)
    return jax.nn.relu(h) @ params["w2"] + params["b2"], bn_state


def forward_folded(folded, x):
    """The same network with the batch norm folded away: no statistics, one fewer layer."""
    return jax.nn.relu(x @ folded["w1"] + folded["b1"]) @ folded["w2"] + folded["b2"]


def main(steps: int = 300, batch: int = 128, seed: int = 0, verbose: bool = True) -> dict:
    x, y, x_test, y_test = _data(seed)
    params, bn_state = init(jax.random.key(seed), x.shape[1])
    opt = optax.adam(3e-3)
    opt_state = opt.init(params)

    @jax.jit
    def step(params, bn_state, opt_state, xb, yb):
        def loss(params):
            logits, new_state = forward(params, bn_state, xb, True)
            return optax.softmax_cross_entropy_with_integer_labels(logits, yb).mean(), new_state

        (value, bn_state), grads = jax.value_and_grad(loss, has_aux=True)(params)
        updates, opt_state = opt.update(grads, opt_state, params)
        return optax.apply_updates(params, updates), bn_state, opt_state, value

    rng = np.random.default_rng(seed)
    for _ in range(steps):
        idx = rng.choice(len(x), batch, replace=False)
        params, bn_state, opt_state, value = step(params, bn_state, opt_state, x[idx], y[idx])

    logits, _ = jax.jit(forward, static_argnums=3)(params, bn_state, x_test, False)
    w1, b1 = dropnorm.fold_batch_norm(params["w1"], params["b1"], params["bn"], bn_state)
    folded = {"w1": w1, "b1": b1, "w2": params["w2"], "b2": params["b2"]}
    folded_logits = jax.jit(forward_folded)(folded, x_test)

    pred, folded_pred = np.asarray(logits.argmax(-1)), np.asarray(folded_logits.argmax(-1))
    result = {
        "final_train_loss": float(value),
        "test_accuracy": float((pred == y_test).mean()),
        "same_predictions": float((pred == folded_pred).mean()),
        "max_abs_diff": float(jnp.max(jnp.abs(logits - folded_logits))),
        "max_abs_logit": float(jnp.max(jnp.abs(logits))),
        "bn_updates": int(bn_state.count),
    }
    if verbose:
        print(f"trained {result['bn_updates']} steps: train loss {result['final_train_loss']:.3f}"
              f", test accuracy {result['test_accuracy']:.3f}")
        print(f"folded network: {result['same_predictions']:.1%} of predictions equal the "
              f"unfolded network's")
        print(f"max |logits - folded logits| = {result['max_abs_diff']:.2e} "
              f"(logits up to {result['max_abs_logit']:.1f}; float32 rounding)")
    return result


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=300)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    main(steps=args.steps, seed=args.seed)
