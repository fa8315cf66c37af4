"""Calibration of ``examples/study.py``'s networks: deterministic vs Monte-Carlo dropout.

For a trained configuration (every seed), the test set is predicted two ways: the
deterministic network (dropout off, BatchNorm on its running statistics) and MC dropout
(Gal & Ghahramani 2016) with K passes, ``dropnorm.mc_dropout`` over
``dropnorm.linen.mc_dropout_fn(model, variables, train=False)`` (dropout on, BatchNorm
still frozen). Each prediction is scored by

* the expected calibration error (Guo et al. 2017) with ``bins`` equal-width confidence
  bins: ``ECE = sum_b (n_b / N) |accuracy_b - confidence_b|``, confidence being the
  largest predicted probability and bin ``b`` (0-based) holding confidences in
  ``(b / bins, (b + 1) / bins]`` (the first bin also holds 0);
* the negative log-likelihood of the true labels, ``-mean log p(y | x)``: for the
  deterministic network from its log-softmax, for MC dropout the log of the mean
  probability (a true class whose mean probability is 0 in float32 gives inf, not a
  clipped value), averaged in float64.

References:
  Gal & Ghahramani, "Dropout as a Bayesian Approximation: Representing Model Uncertainty
  in Deep Learning", ICML 2016.
  Guo, Pleiss, Sun & Weinberger, "On Calibration of Modern Neural Networks", ICML 2017.
"""

from __future__ import annotations

from collections.abc import Sequence

import jax
import numpy as np

import dropnorm
from dropnorm import linen as dnn

DETERMINISTIC = "deterministic"


def method_name(k: int) -> str:
    return f"mc{k}"


def bin_index(confidence: np.ndarray, bins: int) -> np.ndarray:
    """Bin ``b`` holds confidences in ``(b / bins, (b + 1) / bins]``; 0 goes to bin 0."""
    return np.clip(np.ceil(np.asarray(confidence, np.float64) * bins).astype(int) - 1, 0,
                   bins - 1)


def reliability(probs: np.ndarray, labels: np.ndarray, bins: int) -> dict[str, np.ndarray]:
    """Per confidence bin: the number of examples and the sums of confidence and of
    correctness (so that bins pool over seeds by adding)."""
    probs = np.asarray(probs, np.float64)
    confidence = probs.max(-1)
    correct = (probs.argmax(-1) == np.asarray(labels)).astype(np.float64)
    b = bin_index(confidence, bins)
    return {"count": np.bincount(b, minlength=bins).astype(np.float64),
            "confidence": np.bincount(b, confidence, minlength=bins),
            "correct": np.bincount(b, correct, minlength=bins)}


def ece(probs: np.ndarray, labels: np.ndarray, bins: int = 15) -> float:
    """Expected calibration error with ``bins`` equal-width confidence bins (float64)."""
    r = reliability(probs, labels, bins)
    return float(np.sum(np.abs(r["correct"] - r["confidence"])) / r["count"].sum())


def nll(log_probs: np.ndarray, labels: np.ndarray) -> float:
    """``-mean log p(y | x)`` from log-probabilities (float64)."""
    log_probs = np.asarray(log_probs, np.float64)
    return float(-np.mean(np.take_along_axis(log_probs, np.asarray(labels)[:, None], -1)))


def predictor(model, x, ks: Sequence[int]):
    """A compiled ``(params, batch_stats, key) -> {method: log-probabilities}`` for one seed:
    the deterministic network's log-softmax, and for each K the log of MC dropout's mean
    probability (``dropnorm.mc_dropout``, K passes with keys ``split(fold_in(key, K), K)``).
    """
    x = jax.numpy.asarray(x)

    @jax.jit
    def predict(params, batch_stats, key):
        variables = {"params": params, "batch_stats": batch_stats}
        out = {DETERMINISTIC: jax.nn.log_softmax(model.apply(variables, x, train=False))}
        fn = dnn.mc_dropout_fn(model, variables, train=False)
        for k in ks:
            mean = dropnorm.mc_dropout(fn, jax.random.fold_in(key, k), k, x).mean
            out[method_name(k)] = jax.numpy.log(mean)  # log 0 = -inf: an infinite NLL
        return out

    return predict


def evaluate(model, state, x, y, ks: Sequence[int], bins: int = 15,
             seed_offset: int = 10_000) -> dict[str, dict]:
    """Scores of every seed of a trained state (leading seed axis) on ``(x, y)``.

    Returns ``{method: {"ece": (seeds,), "nll": (seeds,), "accuracy": (seeds,),
    "reliability": pooled bins}}``; seed ``i``'s MC keys come from
    ``jax.random.key(seed_offset + i)``.
    """
    predict = predictor(model, x, ks)
    n_seeds = int(np.asarray(state.step).shape[0])
    out: dict[str, dict] = {}
    for i in range(n_seeds):
        params = jax.tree.map(lambda a: a[i], state.params)  # noqa: B023
        stats = jax.tree.map(lambda a: a[i], state.batch_stats)  # noqa: B023
        logp = predict(params, stats, jax.random.key(seed_offset + i))
        for method, lp in logp.items():
            lp = np.asarray(lp, np.float64)
            probs = np.exp(lp)
            rec = out.setdefault(method, {"ece": [], "nll": [], "accuracy": [],
                                          "reliability": None})
            rec["ece"].append(ece(probs, y, bins))
            rec["nll"].append(nll(lp, y))
            rec["accuracy"].append(float(np.mean(probs.argmax(-1) == np.asarray(y))))
            r = reliability(probs, y, bins)
            rec["reliability"] = r if rec["reliability"] is None else {
                k: rec["reliability"][k] + v for k, v in r.items()}
    for rec in out.values():
        for k in ("ece", "nll", "accuracy"):
            rec[k] = np.asarray(rec[k])
    return out
