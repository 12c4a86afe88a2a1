"""GPTQ (Frantar et al. 2022): quantize the columns of W [N, K] in order and spread each column's rounding
error over the columns not yet quantized, using the inverse Hessian of the layer-output error
‖X·Wᵀ − X·Ŵᵀ‖² (H = XᵀX of the linear's calibration inputs: the static int4 input codes for w4a4, the fp32
inputs for the float-input schemes).

The grid is given up front (static groups): a step per row [N] (per-channel schemes) or per element [N, K]
(a group's step repeated over its columns: w4a16g, w4a8g), and the code range [qmin, qmax] of the scheme.
With act-order, the columns are visited in decreasing order of H's diagonal and every column keeps the step
of the group it sits in, so the stored layout stays contiguous groups (no column permutation in the file)."""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from scipy.linalg import lapack

from .blas import blas_threads
from .int4 import QMAX, QMIN


def inverse_upper_cholesky(h: np.ndarray) -> np.ndarray:
    """In place: a symmetric positive definite H [K, K] (C-contiguous float64 or float32) → the upper Cholesky
    factor U of H⁻¹ (H⁻¹ = UᵀU), in H's own buffer, with zeros below the diagonal. Three LAPACK calls on the one
    buffer (Cholesky of H, the inverse from it, Cholesky of the inverse), so the only [K, K] matrix alive is H
    itself; LAPACK reads the C array as its transpose, which is H again. Raises LinAlgError when H (as damped by
    the caller) is not positive definite."""
    if h.dtype not in (np.float64, np.float32) or not h.flags.c_contiguous or h.shape[0] != h.shape[1]:
        raise ValueError("inverse_upper_cholesky: needs a square C-contiguous float64 or float32 matrix")
    f = h.T  # Fortran-contiguous view of the same memory: no copy in the wrappers
    potrf, potri = lapack.get_lapack_funcs(("potrf", "potri"), (f,))
    with blas_threads(1):  # level-2-bound factorizations: faster on one thread (blas.py)
        c, info = potrf(f, lower=1, clean=0, overwrite_a=1)
        if info == 0:
            c, info = potri(c, lower=1, overwrite_c=1)
        if info == 0:
            c, info = potrf(c, lower=1, clean=1, overwrite_a=1)
    if info != 0:
        raise np.linalg.LinAlgError(f"gptq: Hessian not positive definite (LAPACK info {info})")
    if not np.shares_memory(c, h):  # the wrappers promise in place on Fortran-contiguous input
        raise RuntimeError("inverse_upper_cholesky: LAPACK copied the matrix")
    return h  # f's lower triangle is L₂ with H⁻¹ = L₂L₂ᵀ: as the C array, h is L₂ᵀ = U


@dataclass
class Columns:
    """GPTQ's working copy of a weight W [N, K]: its columns as rows, in the order the sweep visits them
    (t[i] = W[:, perm[i]], or W[:, i] when perm is None), in the sweep's precision. A caller that makes it before
    the Hessian exists and drops W (`gptq_quantize` given a Columns) holds one [N, K] weight during the sweep
    instead of two; the sweep overwrites `t`."""
    t: np.ndarray               # [K, N] C-contiguous, float64 or float32
    perm: np.ndarray | None     # act-order's column order, or None (natural order)


def act_order_perm(h_diag: np.ndarray) -> np.ndarray:
    """Act-order's column order: decreasing diag(H), ties in column order."""
    return np.argsort(-np.asarray(h_diag), kind="stable")


def working_columns(w: np.ndarray, h_diag: np.ndarray, act_order: bool, dtype: type) -> Columns:
    """The Columns of W [N, K] for a Hessian whose diagonal is `h_diag` [K] (the values of diag(H) exactly: the
    act-order permutation is computed from them) and whose dtype is `dtype` (the sweep's precision)."""
    perm = act_order_perm(h_diag) if act_order else None
    return Columns(np.ascontiguousarray(w.T if perm is None else w.T[perm], dtype=dtype), perm)


def gptq_quantize(w: np.ndarray | Columns, hessian: np.ndarray, step: np.ndarray, qmin: int = QMIN,
                  qmax: int = QMAX, block: int = 128, damp: float = 0.01, act_order: bool = False,
                  overwrite_hessian: bool = False) -> np.ndarray:
    """Codes int8 [N, K] in [qmin, qmax] for W [N, K] on the steps `step` ([N]: one per row, or [N, K]: one
    per weight), minimizing ‖x·Wᵀ − x·(step ⊙ q)ᵀ‖² for inputs x with xᵀx = `hessian` [K, K]. `damp`: the
    fraction of mean(diag H) added to the diagonal; `block`: columns whose error is applied lazily as one
    GEMM (the result does not depend on it up to float rounding). A zero step gives code 0; a column that
    no input reaches (H[j, j] = 0) is quantized from a zero weight. `overwrite_hessian`: a C-contiguous float64
    or float32 `hessian` is worked on in place (its values are lost) instead of copied: the caller's [K, K] buffer
    is then the only one. The sweep runs in float64, or in float32 for a float32 Hessian given with
    overwrite_hessian (the precision of the reference GPTQ implementation; half the memory of a large layer).
    `w` may be given as its Columns (working_columns, made with this Hessian's diagonal and dtype, the same
    act_order): the sweep then works in that array (its values are lost), the same codes as from W itself."""
    cols = w if isinstance(w, Columns) else None
    k, n = cols.t.shape if cols is not None else w.shape[::-1]
    if hessian.shape != (k, k):
        raise ValueError(f"gptq: Hessian of shape {hessian.shape} for a weight of shape {(n, k)}")
    step = np.asarray(step, np.float64)
    step = np.broadcast_to(step[:, None] if step.ndim == 1 else step, (n, k))
    # act-order: the columns in decreasing order of diag(H), H permuted symmetrically (in place with
    # overwrite_hessian: no second [K, K] matrix) and W's columns taken in that order by the working copy below
    if cols is not None:
        if (cols.perm is not None) != act_order:
            raise ValueError("gptq: Columns made with another act_order")
        perm = cols.perm
    else:
        perm = act_order_perm(np.diag(hessian)) if act_order else None
    # one [K, K] matrix is the largest this holds: H (a copy, or the caller's with overwrite_hessian) turns into
    # the upper Cholesky factor of its inverse in place, before the working copy of W exists; the damping
    # goes on the diagonal in place (the same sums as adding damp·mean·I: the off-diagonal terms add 0)
    own = overwrite_hessian and hessian.dtype in (np.float64, np.float32) and hessian.flags.c_contiguous
    if own:
        h = hessian
        if perm is not None:
            permute_symmetric(h, perm)
    else:  # astype copies: h is this function's own
        h = (hessian if perm is None else hessian[np.ix_(perm, perm)]).astype(np.float64)
    dt = h.dtype
    dead = np.diag(h) == 0
    h[dead, dead] = 1
    h[np.diag_indices(k)] += damp * np.mean(np.diag(h))
    # Upper Cholesky factor of H⁻¹: row i holds the error-propagation weights of column i. In place with
    # overwrite_hessian (mergequant); the copying call keeps numpy's inverse and Cholesky, whose rounding the
    # files of the other GPTQ-based methods were measured with (they hold four [K, K] matrices at the inverse)
    if own:
        hinv = inverse_upper_cholesky(h)
    else:
        with blas_threads(1):  # level-2-bound factorizations: faster on one thread (blas.py)
            h = np.linalg.inv(h)
            hinv = np.linalg.cholesky(h).T
    del h
    # the columns as rows (wt[i] = W[:, i]): the sweep reads and updates contiguous memory; every element
    # sees the same operations as in the [N, K] layout, so the codes are those of the textbook loop
    if cols is not None:
        if cols.t.dtype != dt or not cols.t.flags.c_contiguous:
            raise ValueError(f"gptq: Columns of {cols.t.dtype} for a {dt} sweep")
        wt = cols.t
    else:
        wt = np.ascontiguousarray(w.T if perm is None else w.T[perm], dtype=dt)
    wt[dead] = 0
    per_row = step.strides[1] == 0  # one step per row: the same vector for every column
    st = step[:, 0] if per_row else np.ascontiguousarray(step.T if perm is None else step.T[perm])
    s = np.where(st > 0, st, 1)
    zero = st == 0
    qt = np.zeros((k, n), np.int8)
    for b0 in range(0, k, block):
        b1 = min(b0 + block, k)
        err = np.zeros((n, b1 - b0), dt)
        for i in range(b0, b1):
            si, sti, zi = (s, st, zero) if per_row else (s[i], st[i], zero[i])
            qi = np.clip(np.rint(wt[i] / si), qmin, qmax)
            qi[zi] = 0
            qt[i] = qi
            e = (wt[i] - qi * sti) / hinv[i, i]
            wt[i + 1:b1] -= hinv[i, i + 1:b1, None] * e
            err[:, i - b0] = e
        wt[b1:] -= (err @ hinv[b0:b1, b1:]).T
    if perm is None:
        return np.ascontiguousarray(qt.T)
    out = np.empty((n, k), np.int8)
    out[:, perm] = qt.T
    return out


def permute_symmetric(h: np.ndarray, perm: np.ndarray) -> None:
    """h ← h[perm][:, perm] in place, one row of scratch: the rows along the permutation's cycles, then each
    row's columns."""
    k = len(perm)
    done = np.zeros(k, bool)
    row = np.empty(h.shape[1], h.dtype)
    for start in range(k):
        if done[start]:
            continue
        row[:] = h[start]
        i = start
        while True:  # new row i = old row perm[i]
            done[i] = True
            j = int(perm[i])
            if j == start:
                h[i] = row
                break
            h[i] = h[j]
            i = j
    for r in range(k):
        h[r] = h[r, perm]


def gptq_codes(w: np.ndarray | Columns, hessian: np.ndarray, scale: np.ndarray, block: int = 128,
               damp: float = 0.01, act_order: bool = False, overwrite_hessian: bool = False) -> np.ndarray:
    """Int4 codes [-8, 7] on one step per row `scale` [N] (the w4a4 weights of quant/mergequant.py)."""
    return gptq_quantize(w, hessian, scale, QMIN, QMAX, block, damp, act_order, overwrite_hessian)
