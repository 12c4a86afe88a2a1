"""Linear schemes: how one linear `y = x · Wᵀ` (W [N, K]) is stored in a .mq file. A linear with prefix P
stores tensors `P.<suffix>`; each scheme declares its suffixes with dtype and shape for a given (N, K)
(what the engine validates) and packs a float32 W into them. docs/format.md lists the layouts."""
from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import numpy as np

Layout = dict[str, tuple[np.dtype, tuple[int, ...]]]


@dataclass(frozen=True)
class Scheme:
    name: str
    layout: Callable[[int, int], Layout]  # (N, K) → {suffix: (dtype, shape)}
    pack: Callable[..., dict[str, np.ndarray]]  # (W [N, K] float32, **params) → {suffix: array}


def _f16_layout(n: int, k: int) -> Layout:
    return {"weight": (np.dtype(np.float16), (n, k))}


def _f16_pack(w: np.ndarray) -> dict[str, np.ndarray]:
    return {"weight": w.astype(np.float16)}


SCHEMES: dict[str, Scheme] = {"f16": Scheme("f16", _f16_layout, _f16_pack)}


def get_scheme(name: str) -> Scheme:
    if name not in SCHEMES:
        raise ValueError(f"unknown linear scheme {name!r}; known: {', '.join(SCHEMES)}")
    return SCHEMES[name]


def pack_linear(prefix: str, w: np.ndarray, scheme: str, quant: dict[str, Any],
                **params: Any) -> dict[str, np.ndarray]:
    """Pack W for `prefix`, check the result against the scheme's layout, record the scheme in
    quant["linears"]; returns {f"{prefix}.{suffix}": array}."""
    s = get_scheme(scheme)
    if w.ndim != 2:
        raise ValueError(f"linear {prefix!r}: weight must be 2-D [N, K], got shape {w.shape}")
    packed = s.pack(np.asarray(w, dtype=np.float32), **params)
    layout = s.layout(*w.shape)
    if packed.keys() != layout.keys():
        raise ValueError(f"scheme {scheme!r} packed {sorted(packed)} for {prefix!r}, layout says {sorted(layout)}")
    for suffix, (dtype, shape) in layout.items():
        a = packed[suffix]
        if a.dtype != dtype or a.shape != shape:
            raise ValueError(f"scheme {scheme!r} packed {prefix}.{suffix} as {a.dtype}{list(a.shape)}, "
                             f"layout says {dtype}{list(shape)}")
    quant.setdefault("linears", {})[prefix] = scheme
    return {f"{prefix}.{suffix}": a for suffix, a in packed.items()}


# 4-bit schemes (docs/numerics.md gives their arithmetic). Codes are packed two per byte along K, K padded
# to a multiple of 64. The packers live in quant.int4, imported when called: the quant package imports
# convert, which imports this module.
def pad_k(k: int) -> int:
    return -(-k // 64) * 64


def w4a16g_group(k: int) -> int:
    """Group size along K: 128 where K allows it, else 64."""
    for g in (128, 64):
        if k % g == 0:
            return g
    raise ValueError(f"w4a16g: K={k} is not a multiple of 64")


def _w4a16g_layout(n: int, k: int) -> Layout:
    return {"qweight": (np.dtype(np.uint8), (n, k // 2)),
            "scale": (np.dtype(np.float16), (n, k // w4a16g_group(k)))}


def _w4a16g_pack(w: np.ndarray) -> dict[str, np.ndarray]:
    from .quant.int4 import pack_int4, quant_groups

    q, s = quant_groups(w, w4a16g_group(w.shape[1]))
    return {"qweight": pack_int4(q), "scale": s}


def _w4a4_layout(n: int, k: int) -> Layout:
    return {"qweight": (np.dtype(np.uint8), (n, pad_k(k) // 2)), "scale": (np.dtype(np.float32), (n,))}


def _w4a4_pack(w: np.ndarray, scale: np.ndarray | None = None,
               codes: np.ndarray | None = None) -> dict[str, np.ndarray]:
    """Per-row codes of W (RTN on `scale`, absmax/7 by default), or given `codes`; K padded with zeros."""
    from .quant.int4 import pack_int4, pad_columns, quant_rows

    if codes is None:
        codes, scale = quant_rows(w, scale)
    return {"qweight": pack_int4(pad_columns(codes, pad_k(w.shape[1]))), "scale": np.asarray(scale, np.float32)}


# w4a4d: per-token dynamic activations; w4a4: static activations. Both store the core tensors below; a
# w4a4 linear adds in_scale / in_map / lora_a / lora_b, written by its method (docs/format.md).
SCHEMES["w4a16g"] = Scheme("w4a16g", _w4a16g_layout, _w4a16g_pack)
SCHEMES["w4a4d"] = Scheme("w4a4d", _w4a4_layout, _w4a4_pack)
SCHEMES["w4a4"] = Scheme("w4a4", _w4a4_layout, _w4a4_pack)
