"""Low-rank compensation: a rank-r branch y += (a·Aᵀ)·Bᵀ on a linear's int4 input codes a, fitted in
closed form as a reduced-rank regression of the quantization residual R = X·Wᵀ − ŷ on a."""
from __future__ import annotations

import numpy as np
from scipy.linalg import blas, eigh, lapack, solve_triangular

from .blas import blas_threads


# columns of a float32 Z cast to float64 at a time in top_directions (a power of two: blocks the BLAS splits as it
# splits the whole product)
GATHER_COLS = 2048


def fit_lowrank(gram: np.ndarray, cross: np.ndarray, rank: int, damp: float = 0.01,
                overwrite: bool = False) -> tuple[np.ndarray, np.ndarray]:
    """gram = aᵀa [K, K], cross = aᵀR [K, N]. Ridge solution M = (G + λI)⁻¹·aᵀR (λ = damp·mean diag G);
    the best rank-r fit in the row space is a·M·V_r·V_rᵀ, V_r the top right singular vectors of the fitted
    values a·M, i.e. of Z = Lᵀ·M with G + λI = L·Lᵀ. Solved on the smaller side: eigenvectors of
    Zᵀ·Z = Mᵀ·aᵀR [N, N] when N ≤ K, else V_r = Zᵀ·U_r / σ_r from Z·Zᵀ [K, K]. `overwrite`: see ridge_solve.
    Returns A = (M·V_r)ᵀ [r, K] and B = V_r [N, r]."""
    return top_directions(*ridge_solve(gram, cross, damp, overwrite), rank)


def ridge_solve(gram: np.ndarray, cross: np.ndarray, damp: float = 0.01, overwrite: bool = False
                ) -> tuple[np.ndarray | None, np.ndarray, np.ndarray | None, np.ndarray | None]:
    """fit_lowrank's first half: (M [K, N] or None, the Gram matrix of the fitted values (Zᵀ·Z [N, N] or
    Z·Zᵀ [K, K]), Z when N > K, L when M is None). The Cholesky factorization and the solve run in LAPACK in place
    on one [K, K] buffer: with `overwrite`, a C-contiguous float64 or float32 `gram` itself (its values are lost;
    float32 is then the precision of the fit), else a float64 copy. N ≤ K: nothing of that size is returned, so a
    caller that drops `gram` and `cross` afterwards holds no [K, K] matrix during the eigen-decomposition
    (top_directions). N > K with `overwrite` and a Fortran-ordered `cross` of the buffer's dtype: M and then
    Z = Lᵀ·M take `cross`'s own memory (M is not returned: top_directions gets M·V_r from L instead)."""
    k, n = cross.shape
    lam = damp * max(float(np.mean(np.diag(gram))), 1e-8)
    own = overwrite and gram.dtype in (np.float64, np.float32) and gram.flags.c_contiguous
    reg = gram if own else np.array(gram, dtype=np.float64, order="C")
    reg[np.diag_indices(k)] += lam  # + λI without a [K, K] identity
    potrf, potrs = lapack.get_lapack_funcs(("potrf", "potrs"), (reg,))
    # in place: N > K, or any N in float32 (a large linear; float64 keeps the copying solve's rounding)
    in_place = (overwrite and cross.dtype == reg.dtype and cross.flags.f_contiguous
                and (n > k or reg.dtype == np.float32))
    with blas_threads(1):  # level-2-bound factorizations: faster on one thread (blas.py)
        # the C array read as Fortran is reg itself (symmetric): its lower factor L there is Lᵀ as the C array
        c, info = potrf(reg.T, lower=1, clean=1, overwrite_a=1)
        if info != 0:
            raise np.linalg.LinAlgError(f"fit_lowrank: Gram matrix not positive definite (LAPACK info {info})")
        rhs = cross if in_place else np.array(cross, dtype=reg.dtype, order="F")
        m, info = potrs(c, rhs, lower=1, overwrite_b=1)  # M = (L·Lᵀ)⁻¹ aᵀR
    if in_place:
        trmm = blas.get_blas_funcs("trmm", (c,))
        z = trmm(1.0, c, m, lower=1, trans_a=1, overwrite_b=1)  # Z = Lᵀ·M, in M's memory
        if not np.shares_memory(z, cross):
            raise RuntimeError("ridge_solve: BLAS copied the right-hand side")
        return None, (z @ z.T if n > k else z.T @ z), z, c, n > k
    if n <= k:
        gram_z = m.T @ cross.astype(m.dtype, copy=False)  # Zᵀ·Z = Mᵀ·(G + λI)·M = Mᵀ·aᵀR
        return m, (gram_z + gram_z.T) / 2, None, None, False  # (symmetric up to rounding)
    z = c.T @ m  # c.T is the C array reg = Lᵀ
    return m, z @ z.T, z, None, True


def top_directions(m: np.ndarray | None, gram_z: np.ndarray, z: np.ndarray | None, chol: np.ndarray | None,
                   left: bool, rank: int) -> tuple[np.ndarray, np.ndarray]:
    """fit_lowrank's second half: the top `rank` right singular vectors V_r of Z from its Gram matrix (Z·Zᵀ when
    `left`, else Zᵀ·Z), and A = (M·V_r)ᵀ [r, K], B = V_r [N, r]; without M (ridge_solve in place),
    M·V_r = L⁻ᵀ·Z·V_r (= L⁻ᵀ·U_r·Σ_r when left)."""
    with blas_threads(1):
        if gram_z.dtype == np.float32:  # (the float32 fit of a large linear: the top eigenpairs alone)
            size = len(gram_z)
            evals, evecs = eigh(gram_z, subset_by_index=[max(size - rank, 0), size - 1], check_finite=False)
            evals, evecs = evals.astype(np.float64), evecs.astype(np.float64)
        else:
            evals, evecs = np.linalg.eigh(gram_z.astype(np.float64, copy=False))
    top = np.argsort(evals)[::-1][:rank]
    if left:
        sigma = np.sqrt(np.maximum(evals[top], 1e-30))
        ev = evecs[:, top]
        if z.dtype == ev.dtype:
            v = z.T @ ev / sigma
        else:  # a float32 Z (a large linear) against float64 eigenvectors: numpy casts Z to float64 for the product,
            # so in blocks of Z's columns (GATHER_COLS, a multiple of the BLAS blocking: the single product's values
            # here), not a float64 copy of all of Z (a 7B gate/up's: 0.74 GB)
            v = np.concatenate([np.ascontiguousarray(z[:, c0:c0 + GATHER_COLS], dtype=ev.dtype).T @ ev
                                for c0 in range(0, z.shape[1], GATHER_COLS)]) / sigma
        zv = None if m is not None else evecs[:, top] * sigma
    else:
        v = evecs[:, top]
        zv = None if m is not None else z @ v.astype(z.dtype)
    if m is None:
        mv = solve_triangular(chol, zv, lower=True, trans="T", check_finite=False)
    else:
        mv = m @ v
    return mv.T.astype(np.float32), v.astype(np.float32)
