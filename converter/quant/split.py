"""Dimensional reconstruction: channel splitting. A channel j given m_j int4 slots is quantized on a range
m_j times wider, so its step Δ_j = c_j/(7·m_j) is m_j times finer for the same clip range c_j, and its
weight column W[:, j]·Δ_j is m_j times smaller. The slots carry floor((t + k)/m) for k < m, whose sum is
the channel's code t (docs/numerics.md, "Input slots"): exact before rounding."""
from __future__ import annotations

import heapq

import numpy as np

from .int4 import pad_k


def extra_slots(k: int, budget: float) -> int:
    """Slots available for splitting: the kernel padding of K plus the budget (a fraction of K),
    rounded up to the kernels' multiple (the rounding is padding the GEMM reads anyway)."""
    return pad_k(k + int(np.ceil(budget * k))) - k


def greedy_slots(ranges: np.ndarray, col_norm2: np.ndarray, extra: int,
                 max_parts: int = 16) -> tuple[np.ndarray, np.ndarray]:
    """Greedy: give each extra slot to the channel whose rounding noise on the output,
    ‖W[:, j]‖²·(c_j/m_j)² (uniform-noise model), drops most by going from m_j to m_j + 1 parts. Returns the
    parts [K] and each given slot's noise drop in the order given (non-increasing; fewer than `extra` once every
    channel with noise is at `max_parts`)."""
    noise = col_norm2.astype(np.float64) * ranges.astype(np.float64) ** 2
    parts = np.ones(len(ranges), np.int64)
    gain = lambda j: noise[j] * (1 / parts[j] ** 2 - 1 / (parts[j] + 1) ** 2)  # noqa: E731
    heap = [(-gain(j), j) for j in range(len(ranges)) if noise[j] > 0]
    heapq.heapify(heap)
    gains = []
    for _ in range(extra):
        if not heap:
            break
        g, j = heapq.heappop(heap)
        gains.append(-g)
        parts[j] += 1
        if parts[j] < max_parts:
            heapq.heappush(heap, (-gain(j), j))
    return parts, np.asarray(gains, np.float64)


def allocate_parts(ranges: np.ndarray, col_norm2: np.ndarray, extra: int, max_parts: int = 16) -> np.ndarray:
    """The parts of `greedy_slots`: `extra` slots given one at a time where the output's noise drops most."""
    return greedy_slots(ranges, col_norm2, extra, max_parts)[0]


def allocate_layers(gains: list[np.ndarray], free: int, units: int, unit: int,
                    cap: int | None = None) -> list[int]:
    """One split budget shared by the layers of one linear: layer i has `free` slots of its own (the K padding)
    and takes whole units of `unit` slots (the kernels' multiple of K) from a pool of `units`, each unit going
    where it lowers the weighted noise most. gains[i]: layer i's successive slot gains (greedy_slots' second
    result, weighted; non-increasing, so the best units of all layers are a prefix of every layer's); `cap`: the
    most units one layer takes (None: any). Returns each layer's extra slots, free + unit · (its units); their sum
    is len(gains) · free + unit · units exactly."""
    per = units if cap is None else min(units, cap)
    if per * len(gains) < units:
        raise ValueError(f"allocate_layers: {units} units do not fit {len(gains)} layers of at most {per}")
    cands = []  # (−gain of the unit, layer, unit index): the units past `free`, in each layer's order
    for i, g in enumerate(gains):
        g = np.concatenate([g[free:], np.zeros(max(0, free + per * unit - len(g)))])[:per * unit]
        per_unit = g[:len(g) // unit * unit].reshape(-1, unit).sum(axis=1)
        cands += [(-float(v), i, u) for u, v in enumerate(per_unit)]
    cands.sort()
    taken = [0] * len(gains)
    for _, i, _ in cands[:units]:
        taken[i] += 1
    return [free + unit * u for u in taken]


def build_in_map(parts: np.ndarray, kp: int) -> np.ndarray:
    """in_map [kp, 3] of (src j, part k, parts m): slot j is part 0 of channel j, the further parts follow
    in channel order after the K originals, then padding rows (-1, 0, 1)."""
    k = len(parts)
    rows = [(j, 0, int(m)) for j, m in enumerate(parts)]
    rows += [(j, p, int(parts[j])) for j in np.flatnonzero(parts > 1) for p in range(1, parts[j])]
    if len(rows) > kp:
        raise ValueError(f"build_in_map: {len(rows)} slots for {k} channels exceed Kp={kp}")
    rows += [(-1, 0, 1)] * (kp - len(rows))
    return np.asarray(rows, np.int32)


def expand_columns(w: np.ndarray, in_map: np.ndarray) -> np.ndarray:
    """W [N, K] → [N, Kp]: slot s holds column src(s) (every part of a channel the same), padding 0."""
    src = in_map[:, 0]
    out = np.zeros((w.shape[0], len(src)), np.float32)
    out[:, src >= 0] = w[:, src[src >= 0]]
    return out
