"""GPTQ (Frantar et al. 2022) for int4 rows with a fixed per-row step: quantize columns in order and
spread each column's rounding error over the columns not yet quantized, using the inverse Hessian of
the layer-output error (H = aᵀa of the static int4 input codes)."""
from __future__ import annotations

import numpy as np

from .int4 import QMAX, QMIN


def gptq_codes(w: np.ndarray, hessian: np.ndarray, scale: np.ndarray, block: int = 128,
               damp: float = 0.01, act_order: bool = False) -> np.ndarray:
    """Codes int8 [N, K] for W [N, K] on the steps `scale` [N], minimizing ‖a·Wᵀ − a·(δ·q)ᵀ‖². With
    `act_order`, columns are quantized in decreasing order of H's diagonal (the input energy), so the
    columns that matter most are rounded while the most columns remain to absorb their error."""
    if act_order:
        perm = np.argsort(-np.diag(hessian), kind="stable")
        q = gptq_codes(w[:, perm], hessian[np.ix_(perm, perm)], scale, block, damp)
        out = np.empty_like(q)
        out[:, perm] = q
        return out
    w = w.astype(np.float64).copy()
    h = hessian.astype(np.float64).copy()
    dead = np.diag(h) == 0
    h[dead, dead] = 1
    w[:, dead] = 0
    h += damp * np.mean(np.diag(h)) * np.eye(len(h))
    # Upper Cholesky factor of H⁻¹: row i holds the error-propagation weights of column i.
    hinv = np.linalg.cholesky(np.linalg.inv(h)).T
    s = np.where(scale > 0, scale, 1).astype(np.float64)[:, None]
    q = np.zeros(w.shape, np.int8)
    n, k = w.shape
    for b0 in range(0, k, block):
        b1 = min(b0 + block, k)
        err = np.zeros((n, b1 - b0))
        for i in range(b0, b1):
            qi = np.clip(np.rint(w[:, i:i + 1] / s), QMIN, QMAX)
            q[:, i] = qi[:, 0]
            e = (w[:, i:i + 1] - qi * s) / hinv[i, i]
            w[:, i + 1:b1] -= e * hinv[i, i + 1:b1]
            err[:, i - b0] = e[:, 0]
        w[:, b1:] -= err @ hinv[b0:b1, b1:]
    q[scale == 0] = 0
    return q
