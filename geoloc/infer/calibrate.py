"""Temperature scaling: one scalar T per model, fitted on labelled val predictions by negative log-likelihood.

``softmax(logits / T)`` keeps each model's ranking (so a single model's top 5 do not change) but makes its
probabilities honest, which matters when several models are averaged. The fit needs only the softmax
probabilities: ``log p = logits - logsumexp(logits)`` differs from the logits by a per-row constant,
which softmax ignores, so ``softmax(log p / T) == softmax(logits / T)``.
"""

from __future__ import annotations

import numpy as np

T_RANGE = (0.05, 20.0)
GOLDEN = (np.sqrt(5) - 1) / 2


def nll(log_probs: np.ndarray, labels: np.ndarray, temperature: float) -> float:
    """Mean negative log-likelihood of ``labels`` (N,) under ``softmax(log_probs (N, C) / T)``."""
    z = log_probs / temperature
    z = z - z.max(axis=1, keepdims=True)  # stable log-softmax
    log_norm = np.log(np.exp(z).sum(axis=1))
    return float((log_norm - z[np.arange(len(labels)), labels]).mean())


def fit_temperature(probs: np.ndarray, labels: np.ndarray, iters: int = 80) -> float:
    """T minimising val NLL; ``probs (N, C)`` softmax outputs, ``labels (N,)`` contiguous classes >= 0.

    Golden-section search on ``beta = 1 / T``: the NLL of ``softmax(beta * z)`` is convex in beta, so
    the search finds the global minimum inside ``T_RANGE``.
    """
    probs, labels = np.asarray(probs, dtype=np.float64), np.asarray(labels, dtype=np.int64)
    if len(labels) == 0 or probs.shape != (len(labels), probs.shape[1]) or labels.min() < 0:
        raise ValueError(f"need (N, C) probabilities and N labels >= 0, got {probs.shape} and {labels.shape}")
    log_p = np.log(np.clip(probs, 1e-30, None))  # a class with probability 0 must not give -inf * 0

    def loss(beta: float) -> float:
        return nll(log_p, labels, 1.0 / beta)

    lo, hi = 1.0 / T_RANGE[1], 1.0 / T_RANGE[0]
    for _ in range(iters):
        a, b = hi - GOLDEN * (hi - lo), lo + GOLDEN * (hi - lo)
        if loss(a) <= loss(b):
            hi = b
        else:
            lo = a
    return float(1.0 / ((lo + hi) / 2))


def apply_temperature(probs: np.ndarray, temperature: float) -> np.ndarray:
    """``softmax(log probs / T)``: the calibrated probabilities, float32 ``(N, C)``."""
    z = np.log(np.clip(np.asarray(probs, dtype=np.float64), 1e-30, None)) / temperature
    z = np.exp(z - z.max(axis=1, keepdims=True))
    return (z / z.sum(axis=1, keepdims=True)).astype(np.float32)
