"""Low-rank compensation: a rank-r branch y += (a·Aᵀ)·Bᵀ on a linear's int4 input codes a, fitted in
closed form as a reduced-rank regression of the quantization residual R = X·Wᵀ − ŷ on a."""
from __future__ import annotations

import numpy as np

from .blas import blas_threads


def fit_lowrank(gram: np.ndarray, cross: np.ndarray, rank: int, damp: float = 0.01) -> tuple[np.ndarray, np.ndarray]:
    """gram = aᵀa [K, K], cross = aᵀR [K, N]. Ridge solution M = (G + λI)⁻¹·aᵀR (λ = damp·mean diag G);
    the best rank-r fit in the row space is a·M·V_r·V_rᵀ, V_r the top right singular vectors of the fitted
    values a·M, i.e. of Z = Lᵀ·M with G + λI = L·Lᵀ. Solved on the smaller side: eigenvectors of
    Zᵀ·Z [N, N] when N ≤ K, else V_r = Zᵀ·U_r / σ_r from Z·Zᵀ [K, K].
    Returns A = (M·V_r)ᵀ [r, K] and B = V_r [N, r]."""
    k, n = cross.shape
    reg = gram.astype(np.float64)
    reg[np.diag_indices(k)] += damp * max(float(np.mean(np.diag(gram))), 1e-8)  # + λI without a [K, K] identity
    with blas_threads(1):  # level-2-bound factorizations: faster on one thread (blas.py)
        m = np.linalg.solve(reg, cross.astype(np.float64))
        chol = np.linalg.cholesky(reg)
    z = chol.T @ m
    gram_z = z.T @ z if n <= k else z @ z.T
    with blas_threads(1):
        evals, evecs = np.linalg.eigh(gram_z)
    if n <= k:
        v = evecs[:, np.argsort(evals)[::-1][:rank]]
    else:
        top = np.argsort(evals)[::-1][:rank]
        v = z.T @ evecs[:, top] / np.sqrt(np.maximum(evals[top], 1e-30))
    return (m @ v).T.astype(np.float32), v.astype(np.float32)
