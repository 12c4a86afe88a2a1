"""The converter's scheme table: everything the converter knows about a linear scheme, in one entry per
scheme. A linear `y = x · Wᵀ` (W [N, K]) with prefix P is stored as tensors `P.<suffix>`; its entry gives

- `layout(N, K)`: the tensors its packer writes, {suffix: (dtype, shape)} (what the engine validates;
  docs/format.md, "Linear schemes", lists the same), and `method_tensors`: the further tensors a method
  writes beside them (read by the simulator and the engine when present);
- `pack(W, **params)`: W float32 → those tensors;
- `simulate(get)`: the simulator's linear path (quant/simulate_linear.py) built from the tensors, and
  `inputs`: "float" (the linear takes the fp32 input) or "codes" (the producer upstream emits int4 codes);
- its limits: `k_multiple` (K must be a multiple of it), `k_pad` (K is stored padded to a multiple of it),
  `group(K)` (the group size along K, for grouped scales);
- `parity_tests`: the pytest node ids that check the engine against the simulator on this scheme.

The engine holds a table with the same scheme names (docs/architecture.md). Adding a scheme on the converter
side is adding its entry here, its packer (int4.py primitives) and its path in simulate_linear.py."""
from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import numpy as np

from .quant.int4 import K_ALIGN, pack_int4, pad_columns, pad_k, quant_groups, quant_rows
from .quant.simulate_linear import (SimLinear, TensorGetter, f16_linear, w4a4_linear, w4a4d_linear,
                                    w4a16g_linear)

Layout = dict[str, tuple[np.dtype, tuple[int, ...]]]


@dataclass(frozen=True)
class Scheme:
    name: str
    layout: Callable[[int, int], Layout]                 # (N, K) → {suffix: (dtype, shape)}
    pack: Callable[..., dict[str, np.ndarray]]           # (W [N, K] float32, **params) → {suffix: array}
    simulate: Callable[[TensorGetter], SimLinear]        # the linear's tensors → its simulator path
    inputs: str                                          # "float" | "codes"
    k_multiple: int = 1
    k_pad: int = 1
    group: Callable[[int], int] | None = None            # K → group size along K
    method_tensors: tuple[str, ...] = ()
    parity_tests: tuple[str, ...] = ()

    def check_k(self, k: int, prefix: str) -> None:
        if k % self.k_multiple:
            raise ValueError(f"linear {prefix!r}: scheme {self.name!r} needs K to be a multiple of "
                             f"{self.k_multiple}, got K={k}")


def _f16_layout(n: int, k: int) -> Layout:
    return {"weight": (np.dtype(np.float16), (n, k))}


def _f16_pack(w: np.ndarray) -> dict[str, np.ndarray]:
    return {"weight": w.astype(np.float16)}


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
    q, s = quant_groups(w, w4a16g_group(w.shape[1]))
    return {"qweight": pack_int4(q), "scale": s}


def _w4a4_layout(n: int, k: int) -> Layout:
    return {"qweight": (np.dtype(np.uint8), (n, pad_k(k) // 2)), "scale": (np.dtype(np.float32), (n,))}


def _w4a4_pack(w: np.ndarray, scale: np.ndarray | None = None,
               codes: np.ndarray | None = None) -> dict[str, np.ndarray]:
    """Per-row codes of W (RTN on `scale`, absmax/7 by default), or given `codes`; K padded with zeros."""
    if codes is None:
        codes, scale = quant_rows(w, scale)
    return {"qweight": pack_int4(pad_columns(codes, pad_k(w.shape[1]))), "scale": np.asarray(scale, np.float32)}


_ENGINE_VS_SIM = "tests/test_w4a4_cpu.py::test_tiny_every_scheme"
_NAIVE_VS_SIM = "tests/test_quant_simulate.py::test_simulator_matches_naive_engine"

# w4a4d: per-token dynamic activations; w4a4: static activations. Both pack the core tensors of
# _w4a4_layout; a w4a4 linear's method adds in_scale / in_map / lora_a / lora_b (docs/format.md).
SCHEMES: dict[str, Scheme] = {s.name: s for s in (
    Scheme("f16", _f16_layout, _f16_pack, f16_linear, "float",
           parity_tests=("tests/test_engine_cpu.py", "tests/test_quant_simulate.py::test_f16_simulation_matches_reference")),
    Scheme("w4a16g", _w4a16g_layout, _w4a16g_pack, w4a16g_linear, "float", k_multiple=64, group=w4a16g_group,
           parity_tests=(f"{_ENGINE_VS_SIM}[rtn-w4a16]",)),
    Scheme("w4a4d", _w4a4_layout, _w4a4_pack, w4a4d_linear, "float", k_pad=K_ALIGN,
           parity_tests=(f"{_ENGINE_VS_SIM}[rtn-w4a4-dynamic]", f"{_NAIVE_VS_SIM}[rtn-w4a4-dynamic]")),
    Scheme("w4a4", _w4a4_layout, _w4a4_pack, w4a4_linear, "codes", k_pad=K_ALIGN,
           method_tensors=("in_scale", "in_map", "lora_a", "lora_b"),
           parity_tests=(f"{_ENGINE_VS_SIM}[rtn-w4a4-static]", f"{_ENGINE_VS_SIM}[mergequant]",
                         f"{_NAIVE_VS_SIM}[mergequant]", "tests/test_w4a4_cpu.py")),
)}


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
    s.check_k(w.shape[1], prefix)
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
