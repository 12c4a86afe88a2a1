"""Signed int4 codes: packing into the file layout and the round-to-nearest quantizers every method
shares (docs/numerics.md, "Packed int4"). The bottom layer of the converter: it imports nothing of the project. Codes are kept as int8 arrays in [-8, 7] until packed."""
from __future__ import annotations

import numpy as np

QMIN, QMAX = -8, 7
K_ALIGN = 64  # packed int4 rows are stored with K padded to this multiple (the kernels' unit of K)


def pad_k(k: int) -> int:
    """K rounded up to a multiple of K_ALIGN."""
    return -(-k // K_ALIGN) * K_ALIGN


def pack_int4(q: np.ndarray) -> np.ndarray:
    """int codes [N, K] (K even) → uint8 [N, K/2]; byte i = (q[2i] & 0xF) | (q[2i+1] & 0xF) << 4."""
    if q.shape[-1] % 2:
        raise ValueError(f"pack_int4: K={q.shape[-1]} must be even")
    if q.size and (q.min() < QMIN or q.max() > QMAX):
        raise ValueError(f"pack_int4: codes outside [{QMIN}, {QMAX}]")
    u = q.astype(np.uint8) & 0xF
    return (u[..., 0::2] | (u[..., 1::2] << 4)).astype(np.uint8)


def unpack_int4(packed: np.ndarray) -> np.ndarray:
    """uint8 [N, K/2] → int8 codes [N, K]; a nibble u reads as u - 16·(u ≥ 8)."""
    out = np.empty((*packed.shape[:-1], packed.shape[-1] * 2), np.int8)
    lo = (packed & 0xF).astype(np.int8)
    hi = (packed >> 4).astype(np.int8)
    out[..., 0::2] = lo - 16 * (lo >= 8)
    out[..., 1::2] = hi - 16 * (hi >= 8)
    return out


def round_codes(x: np.ndarray, lo: float | np.ndarray = QMIN, hi: float | np.ndarray = QMAX) -> np.ndarray:
    """clamp(rint(x), lo, hi) in float32 (rint is round-half-to-even, as on every backend); one temporary of
    x's size (the clamp is done in place on the rounded copy)."""
    r = np.rint(x)
    np.clip(r, lo, hi, out=r)
    return r.astype(np.float32, copy=False)


def quant_rows(w: np.ndarray, scale: np.ndarray | None = None) -> tuple[np.ndarray, np.ndarray]:
    """Per-output-row symmetric RTN: δ_n = max_k |W[n, k]| / 7 unless given; returns (codes int8, δ fp32)."""
    if scale is None:
        scale = np.abs(w).max(axis=1) / QMAX
    scale = np.asarray(scale, np.float32)
    safe = np.where(scale > 0, scale, 1).astype(np.float32)
    q = round_codes(w / safe[:, None])
    q[scale == 0] = 0
    return q.astype(np.int8), scale


def quant_groups(w: np.ndarray, group: int) -> tuple[np.ndarray, np.ndarray]:
    """Group-wise RTN along K with fp16 scales s = fp16(max|W_group| / 7); returns (codes int8 [N, K],
    scales float16 [N, K/group]). Codes are rounded against the fp16 scale the engine will read."""
    n, k = w.shape
    if k % group:
        raise ValueError(f"quant_groups: K={k} is not a multiple of group {group}")
    g = w.reshape(n, k // group, group)
    s16 = (np.abs(g).max(axis=2) / QMAX).astype(np.float16)
    s = s16.astype(np.float32)
    safe = np.where(s > 0, s, 1)[..., None]
    q = round_codes(g / safe)
    q[s == 0] = 0
    return q.reshape(n, k).astype(np.int8), s16


def pad_columns(w: np.ndarray, kp: int) -> np.ndarray:
    """Zero columns appended up to kp."""
    if w.shape[1] == kp:
        return w
    out = np.zeros((w.shape[0], kp), w.dtype)
    out[:, :w.shape[1]] = w
    return out


# --- 8-bit codes and the two-level int4 grid of w4a8g (docs/numerics.md, "Dynamic int8 activations") ------

def qmax_for_bits(bits: int) -> int:
    """Symmetric code range [-qmax, qmax] of a `bits`-wide integer: qmax = 2^(bits-1) - 1 (bits in [2, 8])."""
    if not 2 <= bits <= 8:
        raise ValueError(f"bit width {bits} outside [2, 8]")
    return (1 << (bits - 1)) - 1


def quant_rows_sym(w: np.ndarray, qmax: int, scale: np.ndarray | None = None) -> tuple[np.ndarray, np.ndarray]:
    """Per-output-row symmetric RTN on [-qmax, qmax]: δ_n = max_k |W[n, k]| / qmax unless given;
    q = clamp(rint(W / δ_n), -qmax, qmax) (0 where δ_n = 0); returns (codes int8, δ fp32)."""
    if scale is None:
        scale = np.abs(w).max(axis=1) / np.float32(qmax)
    scale = np.asarray(scale, np.float32)
    safe = np.where(scale > 0, scale, 1).astype(np.float32)
    q = round_codes(w / safe[:, None], -qmax, qmax)
    q[scale == 0] = 0
    return q.astype(np.int8), scale


QQQ_GMAX = 16               # largest integer group scale of w4a8g: |q · g| <= 8 · 16 = 128 fits int8
QQQ_VMAX = QMAX * QQQ_GMAX  # 112: the row's largest |W| in units of the channel scale


def qqq_grid(w: np.ndarray, group: int) -> tuple[np.ndarray, np.ndarray]:
    """The two-level grid of w4a8g for W [N, K]: a channel scale s_n = max_k |W[n, k]| / 112 (fp32) and an
    integer group scale g[n, j] = clamp(ceil(max_{k in group j} |W[n, k]| / (7 · s_n)), 1, 16) (1 where
    s_n = 0), so the step of group j is s_n · g[n, j] and no weight of the group lies beyond 7 steps.
    Returns (g uint8 [N, K/group], s fp32 [N])."""
    n, k = w.shape
    if k % group:
        raise ValueError(f"qqq_grid: K={k} is not a multiple of group {group}")
    s = (np.abs(w).max(axis=1) / np.float32(QQQ_VMAX)).astype(np.float32)
    safe = np.where(s > 0, s, 1).astype(np.float32)
    gmax = np.abs(w).reshape(n, k // group, group).max(axis=2) / safe[:, None]
    g = np.clip(np.ceil(gmax / np.float32(QMAX)), 1, QQQ_GMAX)
    g[s == 0] = 1
    return g.astype(np.uint8), s


QQQ_SHRINKS = (1.0, 0.95, 0.9, 0.85, 0.8, 0.75, 0.7, 0.65, 0.6)  # qqq_grid_search's channel-scale candidates
QQQ_GRIDS = ("ceil", "mse")


def qqq_grid_search(w: np.ndarray, group: int, shrinks: tuple[float, ...] = QQQ_SHRINKS
                    ) -> tuple[np.ndarray, np.ndarray]:
    """The two-level grid of w4a8g for W [N, K] searched for the least squared round-to-nearest error of each
    row: for each candidate channel scale s_n = c · max_k |W[n, k]| / 112 (c in `shrinks`, in order; c < 1
    clips the row's largest weights), each group j takes the integer g in [1, 16] minimizing its squared
    error sum_k (W[n, k] - s_n g q[n, k])², q = clamp(rint(W / (s_n g)), -8, 7) (the codes quant_qqq
    rounds); the candidate with the smallest row error is kept (the first on ties). With c = 1 among the
    candidates no row's error exceeds qqq_grid's (whose g is one of those tried at c = 1). Rows of zeros get
    s = 0, g = 1. Cost: len(shrinks) · 16 roundings of W. Returns (g uint8 [N, K/group], s fp32 [N])."""
    n, k = w.shape
    if k % group:
        raise ValueError(f"qqq_grid_search: K={k} is not a multiple of group {group}")
    if not shrinks or min(shrinks) <= 0:
        raise ValueError(f"qqq_grid_search: shrink factors must be > 0, got {shrinks}")
    w = np.asarray(w, np.float32)
    j = k // group
    s0 = (np.abs(w).max(axis=1) / np.float32(QQQ_VMAX)).astype(np.float32)
    best = np.full(n, np.inf)
    best_s = s0.copy()
    best_g = np.ones((n, j), np.uint8)
    chunk = max(1, (1 << 17) // k)  # rows per pass: the chunk's temporaries stay in cache
    for r0 in range(0, n, chunk):
        wc = w[r0:r0 + chunk].reshape(-1, j, group)
        m = len(wc)
        t = np.empty_like(wc)
        err = np.empty((QQQ_GMAX, m, j), np.float32)
        for c in shrinks:
            s = (s0[r0:r0 + m] * np.float32(c)).astype(np.float32)
            safe = np.where(s > 0, s, 1).astype(np.float32)
            for g in range(1, QQQ_GMAX + 1):
                step = (safe * np.float32(g))[:, None, None]
                np.divide(wc, step, out=t)
                np.rint(t, out=t)
                np.clip(t, QMIN, QMAX, out=t)
                np.multiply(t, step, out=t)
                np.subtract(wc, t, out=t)
                err[g - 1] = np.einsum("rjk,rjk->rj", t, t)
            gi = err.argmin(axis=0)
            row = np.take_along_axis(err, gi[None], axis=0)[0].sum(axis=1, dtype=np.float64)
            better = row < best[r0:r0 + m]
            best[r0:r0 + m][better] = row[better]
            best_s[r0:r0 + m][better] = s[better]
            best_g[r0:r0 + m][better] = gi[better] + 1
    best_g[s0 == 0] = 1
    return best_g, best_s


def w4a8g_grid(w: np.ndarray, group: int, grid: str = "ceil") -> tuple[np.ndarray, np.ndarray]:
    """The w4a8g grid (g, s) of W by the named rule: "ceil" (qqq_grid) or "mse" (qqq_grid_search)."""
    if grid == "ceil":
        return qqq_grid(w, group)
    if grid == "mse":
        return qqq_grid_search(w, group)
    raise ValueError(f"w4a8g grid must be one of {QQQ_GRIDS}, got {grid!r}")


def quant_qqq(w: np.ndarray, group: int, gscale: np.ndarray | None = None, scale: np.ndarray | None = None
              ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """RTN on the w4a8g grid (qqq_grid's unless both `gscale` and `scale` are given):
    q = clamp(rint(W / (s_n · g[n, k / group])), -8, 7); returns (codes int8 [N, K], g uint8, s fp32)."""
    if gscale is None or scale is None:
        gscale, scale = qqq_grid(w, group)
    step = np.repeat(gscale.astype(np.float32), group, axis=1) * np.asarray(scale, np.float32)[:, None]
    safe = np.where(step > 0, step, 1).astype(np.float32)
    q = round_codes(w / safe)
    q[step == 0] = 0
    return q.astype(np.int8), np.asarray(gscale, np.uint8), np.asarray(scale, np.float32)
