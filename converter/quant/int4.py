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
    """clamp(rint(x), lo, hi) in float32 (rint is round-half-to-even, as on every backend)."""
    return np.clip(np.rint(x), lo, hi).astype(np.float32, copy=False)


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
