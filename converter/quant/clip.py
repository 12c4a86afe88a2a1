"""Adaptive clipping: the static range c_j of each activation channel and the step δ_n of each weight
row, chosen by searching a grid of clip ratios of the absolute maximum."""
from __future__ import annotations

import numpy as np

from .blas import cpu_threads, parallel_for
from .int4 import QMAX, QMIN

ACT_RATIOS = np.linspace(1.0, 0.2, 33, dtype=np.float32)     # step 0.025
WEIGHT_RATIOS = np.linspace(1.0, 0.5, 11, dtype=np.float32)   # step 0.05
BLOCK_BYTES = 64 << 20  # search_weight_scale works on blocks of rows of a weight larger than this


def fake_quant(x: np.ndarray, c: np.ndarray, parts: np.ndarray | int = 1) -> np.ndarray:
    """x quantized on a static range c per channel with `parts` int4 slots:
    Δ = c / (7·m), x̂ = clamp(rint(x/Δ), -8m, 7m)·Δ."""
    step = np.where(c > 0, c, 1).astype(np.float32) / (QMAX * np.asarray(parts, np.float32))
    m = np.asarray(parts, np.float32)
    return np.clip(np.rint(x / step), QMIN * m, QMAX * m) * step


def search_act_clip(x: np.ndarray, amax: np.ndarray, parts: np.ndarray,
                    powers: tuple[float, ...]) -> np.ndarray:
    """Per objective `power` and channel j, the ratio p of amax_j minimizing Σ_t |x̂_tj − x_tj|^power over
    the rows of x [M, K]; returns [len(powers), K]. One quantization of x per ratio serves every power. Channels
    are independent: an x above BLOCK_BYTES (a 7B ffn_down's input) is searched in blocks of columns."""
    if x.nbytes > BLOCK_BYTES:
        cols = max(1, BLOCK_BYTES // 4 // max(len(x), 1))
        pv = np.asarray(parts) * np.ones(x.shape[1], np.int64)
        return np.concatenate([search_act_clip(np.ascontiguousarray(x[:, c0:c0 + cols]), amax[c0:c0 + cols],
                                               pv[c0:c0 + cols], powers)
                               for c0 in range(0, x.shape[1], cols)], axis=1)
    m = np.asarray(parts, np.float32) * np.ones(x.shape[1], np.float32)
    safe = np.where(amax > 0, amax, 1).astype(np.float32)
    errs = np.empty((len(ACT_RATIOS), len(powers), x.shape[1]))
    threads = cpu_threads()
    bufs = [np.empty_like(x, dtype=np.float32) for _ in range(min(threads, len(ACT_RATIOS)))]

    def ratio_errors(w: int) -> None:  # worker w: every threads-th ratio, into its own buffer
        e = bufs[w]
        for r in range(w, len(ACT_RATIOS), len(bufs)):
            step = (ACT_RATIOS[r] * safe) / (QMAX * m)
            np.divide(x, step, out=e)
            np.rint(e, out=e)
            np.clip(e, QMIN * m, QMAX * m, out=e)
            e *= step
            e -= x
            np.abs(e, out=e)
            for i, power in enumerate(powers):
                if power == 2:
                    err = e * e
                else:  # |e|^p as exp(p·log|e|): numpy's vectorized exp and log, 3-4x faster than its power
                    with np.errstate(divide="ignore"):
                        err = np.log(e)
                    err *= np.float32(power)
                    np.exp(err, out=err)
                errs[r, i] = err.sum(axis=0, dtype=np.float64)

    parallel_for(ratio_errors, len(bufs))
    best = np.full((len(powers), x.shape[1]), np.inf)
    ratio = np.ones((len(powers), x.shape[1]), np.float32)
    for r, p in enumerate(ACT_RATIOS):  # in ratio order: the first of equal errors wins
        for i in range(len(powers)):
            better = errs[r, i] < best[i]
            best[i, better], ratio[i, better] = errs[r, i, better], p
    return ratio


def search_weight_scale(w: np.ndarray, importance: np.ndarray | None) -> np.ndarray:
    """Per row n, δ_n = p·max|W[n]|/7 with p minimizing Σ_k h_k (W[n,k] − δ_n·clamp(rint(W[n,k]/δ_n)))²,
    h = `importance` (the diagonal of the input Gram matrix XᵀX), or uniform when None."""
    if w.nbytes > BLOCK_BYTES:  # rows are independent: a large W (a 7B linear) in blocks of rows, few temporaries
        rows = max(1, BLOCK_BYTES // 4 // max(w.shape[1], 1))
        return np.concatenate([search_weight_scale(w[r0:r0 + rows], importance) for r0 in range(0, len(w), rows)])
    absmax = np.abs(w).max(axis=1)
    h = np.ones(w.shape[1], np.float32) if importance is None else importance.astype(np.float32)
    best = np.full(w.shape[0], np.inf)
    scale = absmax / QMAX
    for p in WEIGHT_RATIOS:
        s = np.where(absmax > 0, p * absmax / QMAX, 1).astype(np.float32)
        e = w - np.clip(np.rint(w / s[:, None]), QMIN, QMAX) * s[:, None]
        err = (e * e) @ h
        better = err < best
        best[better], scale[better] = err[better], s[better]
    return np.where(absmax > 0, scale, 0).astype(np.float32)


REFINE_FACTORS = np.asarray([0.85, 0.9, 0.95, 1.05, 1.1, 1.15], np.float32)  # refine_act_clip's moves


def refine_act_clip(x: np.ndarray, w: np.ndarray, c: np.ndarray, amax: np.ndarray, parts: np.ndarray,
                    sweeps: int = 1, cols: int = 128) -> np.ndarray:
    """Ranges c [K] refined per channel against the linear's output error ‖(x̂ − x)·Wᵀ‖² (x [M, K], W [N, K]
    the float weight: the error the inputs' quantization alone leaves), where the per-channel searches see one
    channel's own error only. Coordinate descent in blocks of `cols` channels: with E = x̂ − x and G = E·WᵀW,
    moving channel j's error column by d changes the output error by 2·dᵀG[:, j] + (WᵀW)_jj·‖d‖², so each channel
    of a block takes the range among c_j·REFINE_FACTORS (at most amax_j) that lowers it most, or keeps c_j, then G
    follows; each sweep moves from the last one's ranges. The channels of one block move together (their cross
    terms are not seen): the result is kept only where its output error is below c's."""
    x = np.ascontiguousarray(x, np.float32)
    w = np.asarray(w, np.float32)
    h = w.T @ w
    hd = np.diag(h).astype(np.float64)
    m = np.asarray(parts, np.float32) * np.ones(x.shape[1], np.float32)
    c = np.asarray(c, np.float32).copy()
    e = fake_quant(x, c, m) - x
    g = e @ h
    start = float(np.sum(np.square(e @ w.T), dtype=np.float64))
    c0 = c.copy()
    for _ in range(sweeps):
        for j0 in range(0, x.shape[1], cols):
            sl = slice(j0, min(j0 + cols, x.shape[1]))
            xb, eb, gb = x[:, sl], e[:, sl], g[:, sl]
            trial = np.minimum(REFINE_FACTORS[:, None] * c[sl], amax[sl].astype(np.float32))  # [R, cols]
            # every trial's error change at once: [R, M, cols]
            step = np.where(trial > 0, trial, 1) / (QMAX * m[sl])
            d = np.clip(np.rint(xb / step[:, None]), QMIN * m[sl], QMAX * m[sl]) * step[:, None]
            d -= xb
            d -= eb
            delta = 2 * np.einsum("rtj,tj->rj", d, gb) + hd[sl] * np.einsum("rtj,rtj->rj", d, d)
            r = np.argmin(np.concatenate([np.zeros((1, d.shape[2])), delta]), axis=0)  # 0: stay (the first wins)
            pick = np.where(r > 0, trial[np.maximum(r - 1, 0), np.arange(d.shape[2])], c[sl])
            if np.array_equal(pick, c[sl]):
                continue
            d = fake_quant(xb, pick, m[sl]) - xb - eb
            e[:, sl] += d
            g += d @ h[sl]
            c[sl] = pick
    end = float(np.sum(np.square(e @ w.T), dtype=np.float64))
    return c if end < start else c0
