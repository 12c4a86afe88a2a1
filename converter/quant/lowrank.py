"""Low-rank compensation: a rank-r branch y += (a·Aᵀ)·Bᵀ on a linear's int4 input codes a, fitted in
closed form as a reduced-rank regression of the quantization residual R = X·Wᵀ − ŷ on a."""
from __future__ import annotations

import numpy as np


def fit_lowrank(gram: np.ndarray, cross: np.ndarray, rank: int, damp: float = 0.01,
                iters: int = 4, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """gram = aᵀa [K, K], cross = aᵀR [K, N]. Ridge solution M = (G + λI)⁻¹·aᵀR (λ = damp·mean diag G);
    the best rank-r fit in the row space is a·M·V_r·V_rᵀ with V_r the top eigenvectors of the fitted
    values' Gram (a·M)ᵀ(a·M) = Mᵀ·G·M, found by subspace iteration (N can be thousands).
    Returns A = (M·V_r)ᵀ [r, K] and B = V_r [N, r]."""
    k, n = cross.shape
    g = gram.astype(np.float64)
    m = np.linalg.solve(g + damp * max(float(np.mean(np.diag(g))), 1e-8) * np.eye(k), cross.astype(np.float64))
    basis = np.random.default_rng(seed).standard_normal((n, min(n, rank + 8)))
    for _ in range(iters):
        basis, _ = np.linalg.qr(m.T @ (g @ (m @ basis)))
    # Rayleigh-Ritz in the found subspace: order its directions by explained variance.
    evals, evecs = np.linalg.eigh(basis.T @ (m.T @ (g @ (m @ basis))))
    v = basis @ evecs[:, np.argsort(evals)[::-1][:rank]]
    return (m @ v).T.astype(np.float32), v.astype(np.float32)
