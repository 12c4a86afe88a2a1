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
