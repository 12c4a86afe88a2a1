"""The converter's scheme table: everything the converter knows about a linear scheme, in one entry per
scheme. A linear `y = x · Wᵀ` (W [N, K]) with prefix P is stored as tensors `P.<suffix>`; its entry gives

- `layout(N, K)`: the tensors its packer writes, {suffix: (dtype, shape)} (what the engine validates;
  docs/format.md, "Linear schemes", lists the same), and `method_tensors`: the further tensors a method
  writes beside them (read by the simulator and the engine when present);
- `pack(W, **params)`: W float32 → those tensors (and, where a method passes them, the `method_layout`
  tensors such as `bias`); every packer's parameters are documented at its definition below;
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

from .quant.int4 import (K_ALIGN, QMAX, QMIN, QQQ_GMAX, pack_int4, pad_columns, pad_k, qmax_for_bits, quant_groups,
                         quant_qqq, quant_rows, quant_rows_sym)
from .quant.simulate_linear import (SimLinear, TensorGetter, f16_linear, w4a4_linear, w4a4d_linear, w4a8_linear,
                                    w4a8g_linear, w4a16g_linear, w8a8_linear, w8a8s_linear)

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
    method_layout: Callable[[int, int], Layout] | None = None  # (N, K) → layout of method tensors a packer may take
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


def _w4a16g_pack(w: np.ndarray, codes: np.ndarray | None = None, scale: np.ndarray | None = None
                 ) -> dict[str, np.ndarray]:
    """w4a16g: pack(W, codes=None, scale=None). Without `codes`: group-wise RTN (quant_groups). A method
    choosing its own codes (GPTQ) passes `codes` (int [N, K] in [-8, 7]) with their fp16 `scale` [N, K/g]."""
    if codes is None:
        codes, scale = quant_groups(w, w4a16g_group(w.shape[1]))
    elif scale is None:
        raise ValueError("w4a16g pack: explicit codes need their scale")
    codes = _check_codes("w4a16g pack", codes, QMIN, QMAX, w.shape)
    return {"qweight": pack_int4(codes), "scale": np.asarray(scale, np.float16)}


def _w4a4_layout(n: int, k: int) -> Layout:
    return {"qweight": (np.dtype(np.uint8), (n, pad_k(k) // 2)), "scale": (np.dtype(np.float32), (n,))}


def _w4a4_pack(w: np.ndarray, scale: np.ndarray | None = None,
               codes: np.ndarray | None = None) -> dict[str, np.ndarray]:
    """Per-row codes of W (RTN on `scale`, absmax/7 by default), or given `codes`; K padded with zeros."""
    if codes is None:
        codes, scale = quant_rows(w, scale)
    return {"qweight": pack_int4(pad_columns(codes, pad_k(w.shape[1]))), "scale": np.asarray(scale, np.float32)}


def _bias_layout(n: int, k: int) -> Layout:
    return {"bias": (np.dtype(np.float32), (n,))}


def _with_bias(out: dict[str, np.ndarray], bias: np.ndarray | None) -> dict[str, np.ndarray]:
    if bias is not None:
        out["bias"] = np.asarray(bias, np.float32)
    return out


def _check_codes(name: str, codes: np.ndarray, lo: int, hi: int, shape: tuple[int, ...]) -> np.ndarray:
    codes = np.asarray(codes)
    if codes.shape != shape:
        raise ValueError(f"{name}: codes of shape {codes.shape}, expected {shape}")
    if codes.size and (codes.min() < lo or codes.max() > hi):
        raise ValueError(f"{name}: codes outside [{lo}, {hi}] (got [{codes.min()}, {codes.max()}])")
    return codes.astype(np.int8)


def _w8a8_layout(n: int, k: int) -> Layout:
    return {"qweight": (np.dtype(np.int8), (n, k)), "scale": (np.dtype(np.float32), (n,)),
            "bits": (np.dtype(np.int32), (1,))}


def _w8a8_pack(w: np.ndarray, bits: int = 8, codes: np.ndarray | None = None, scale: np.ndarray | None = None,
               bias: np.ndarray | None = None) -> dict[str, np.ndarray]:
    """w8a8 (W6A6 with bits=6, any width in [2, 8]): pack(W, bits=8, codes=None, scale=None, bias=None).
    qmax = 2^(bits-1) - 1. Without `codes`: per-row RTN on [-qmax, qmax] with δ_n = `scale` (default
    max_k |W[n, k]| / qmax). With `codes` (int [N, K] in [-qmax, qmax], chosen by a method) `scale` [N] is
    required. `bias` [N] (fp32) is stored as P.bias when given."""
    qmax = qmax_for_bits(bits)
    if codes is None:
        codes, scale = quant_rows_sym(w, qmax, scale)
    elif scale is None:
        raise ValueError("w8a8 pack: explicit codes need their scale")
    codes = _check_codes("w8a8 pack", codes, -qmax, qmax, w.shape)
    return _with_bias({"qweight": codes, "scale": np.asarray(scale, np.float32),
                       "bits": np.array([bits], np.int32)}, bias)


def _w8a8s_layout(n: int, k: int) -> Layout:
    return _w8a8_layout(n, k) | {"in_scale": (np.dtype(np.float32), (k,)), "shift": (np.dtype(np.float32), (k,)),
                                 "bias": (np.dtype(np.float32), (n,))}


def _w8a8s_pack(w: np.ndarray, in_scale: np.ndarray | None = None, shift: np.ndarray | None = None, bits: int = 8,
                codes: np.ndarray | None = None, scale: np.ndarray | None = None,
                bias: np.ndarray | None = None) -> dict[str, np.ndarray]:
    """w8a8s (static per-channel input codes, OutlierTune): pack(W, in_scale, shift=None, bits=8, codes=None,
    scale=None, bias=None). The input of channel k is quantized as clamp(rint((x[k] - shift[k]) · in_scale[k]))
    with in_scale[k] = 1/Δ_k, the calibrated static step (required: there is no default without calibration),
    shift zeros by default. W is the weight in input units; the file holds the step-folded weight
    W̃ = W · diag(1/in_scale) (pre-execution of dequantization), per-row RTN on [-qmax, qmax] (δ_n = `scale`,
    default max_k |W̃[n, k]| / qmax) or the method's `codes` (of W̃) with their `scale`. `bias` (default: the
    shift compensation Ŵ · shift of the dequantized weight Ŵ[n, k] = q[n, k] · δ_n · in_scale[k], in float64)."""
    if in_scale is None:
        raise ValueError("w8a8s pack: the static input steps (in_scale) come from calibration; use a method that "
                         "calibrates them (convert --method outliertune)")
    k = w.shape[1]
    in_scale = np.asarray(in_scale, np.float32)
    shift = np.zeros(k, np.float32) if shift is None else np.asarray(shift, np.float32)
    if in_scale.shape != (k,) or shift.shape != (k,):
        raise ValueError(f"w8a8s pack: in_scale and shift must be [{k}], got {in_scale.shape} and {shift.shape}")
    if not (np.isfinite(in_scale).all() and (in_scale > 0).all() and np.isfinite(shift).all()):
        raise ValueError("w8a8s pack: in_scale must be finite and > 0, shift finite")
    qmax = qmax_for_bits(bits)
    folded = (w.astype(np.float64) / in_scale.astype(np.float64)).astype(np.float32)
    if codes is None:
        codes, scale = quant_rows_sym(folded, qmax, scale)
    elif scale is None:
        raise ValueError("w8a8s pack: explicit codes need their scale")
    codes = _check_codes("w8a8s pack", codes, -qmax, qmax, w.shape)
    scale = np.asarray(scale, np.float32)
    if bias is None:
        bias = w8a8s_shift_bias(codes, scale, in_scale, shift)
    return {"qweight": codes, "scale": scale, "bits": np.array([bits], np.int32), "in_scale": in_scale,
            "shift": shift, "bias": np.asarray(bias, np.float32)}


def w8a8s_shift_bias(codes: np.ndarray, scale: np.ndarray, in_scale: np.ndarray, shift: np.ndarray) -> np.ndarray:
    """The bias that gives back what subtracting `shift` took away: Ŵ · shift for the dequantized weight
    Ŵ[n, k] = q[n, k] · δ_n · in_scale[k] (W = W̃ · diag(1/Δ)), in float64, rounded once to fp32."""
    z = np.asarray(shift, np.float64) * np.asarray(in_scale, np.float64)  # the shift in step units
    return ((codes.astype(np.float64) @ z) * np.asarray(scale, np.float64)).astype(np.float32)


def _w4a8_pack(w: np.ndarray, codes: np.ndarray | None = None, scale: np.ndarray | None = None,
               bias: np.ndarray | None = None) -> dict[str, np.ndarray]:
    """w4a8 (per-channel int4): pack(W, codes=None, scale=None, bias=None). Without `codes`: per-row RTN
    on [-8, 7] with δ_n = `scale` (default max_k |W[n, k]| / 7). With `codes` (int [N, K] in [-8, 7])
    `scale` [N] is required. K is padded with zero codes to a multiple of 64; `bias` [N] as P.bias."""
    if codes is None:
        codes, scale = quant_rows(w, scale)
    elif scale is None:
        raise ValueError("w4a8 pack: explicit codes need their scale")
    codes = _check_codes("w4a8 pack", codes, QMIN, QMAX, w.shape)
    return _with_bias({"qweight": pack_int4(pad_columns(codes, pad_k(w.shape[1]))),
                       "scale": np.asarray(scale, np.float32)}, bias)


def _w4a8_layout(n: int, k: int) -> Layout:
    return {"qweight": (np.dtype(np.uint8), (n, pad_k(k) // 2)), "scale": (np.dtype(np.float32), (n,))}


def _w4a8g_layout(n: int, k: int) -> Layout:
    return {"qweight": (np.dtype(np.uint8), (n, k // 2)),
            "gscale": (np.dtype(np.uint8), (n, k // w4a16g_group(k))),
            "scale": (np.dtype(np.float32), (n,))}


def _w4a8g_pack(w: np.ndarray, codes: np.ndarray | None = None, gscale: np.ndarray | None = None,
                scale: np.ndarray | None = None, bias: np.ndarray | None = None) -> dict[str, np.ndarray]:
    """w4a8g (group-128 int4, two-level scales): pack(W, codes=None, gscale=None, scale=None, bias=None).
    The weight is W ≈ scale[n] · gscale[n, k/g] · q[n, k], g = 128 (64 where K % 128 != 0), gscale an
    integer in [1, 16]. Without `codes`: RTN on the grid (gscale, scale), by default quant/int4.qqq_grid's
    (scale = max|W[n]| / 112, gscale = ceil(group max / (7 · scale)) clamped to [1, 16]); a method choosing
    its own codes (GPTQ on that grid) passes `codes` (int [N, K] in [-8, 7]) with `gscale` and `scale`."""
    g = w4a16g_group(w.shape[1])
    if codes is None:
        codes, gscale, scale = quant_qqq(w, g, gscale, scale)
    elif gscale is None or scale is None:
        raise ValueError("w4a8g pack: explicit codes need gscale and scale")
    codes = _check_codes("w4a8g pack", codes, QMIN, QMAX, w.shape)
    gscale = np.asarray(gscale)
    if gscale.size and (gscale.min() < 1 or gscale.max() > QQQ_GMAX):
        raise ValueError(f"w4a8g pack: group scales outside [1, {QQQ_GMAX}]")
    return _with_bias({"qweight": pack_int4(codes), "gscale": gscale.astype(np.uint8),
                       "scale": np.asarray(scale, np.float32)}, bias)


_ENGINE_VS_SIM = "tests/test_w4a4_cpu.py::test_tiny_every_scheme"
_NAIVE_VS_SIM = "tests/test_quant_simulate.py::test_simulator_matches_naive_engine"
_SMOLLM2_INT8 = "tests/test_w4a4_cpu.py::test_smollm2_int8_schemes_greedy_identical"

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
    # per-token dynamic int8 activations (docs/numerics.md, "Dynamic int8 activations"); bias is optional
    Scheme("w8a8", _w8a8_layout, _w8a8_pack, w8a8_linear, "float", method_tensors=("bias",),
           method_layout=_bias_layout,
           parity_tests=(f"{_ENGINE_VS_SIM}[w8a8]", f"{_ENGINE_VS_SIM}[w6a6]", "tests/test_ops.py::test_linear_w8a8",
                         f"{_SMOLLM2_INT8}[w8a8]")),
    Scheme("w4a8", _w4a8_layout, _w4a8_pack, w4a8_linear, "float", k_pad=K_ALIGN, method_tensors=("bias",),
           method_layout=_bias_layout,
           parity_tests=(f"{_ENGINE_VS_SIM}[w4a8]", "tests/test_ops.py::test_linear_w4a8", f"{_SMOLLM2_INT8}[w4a8]")),
    Scheme("w4a8g", _w4a8g_layout, _w4a8g_pack, w4a8g_linear, "float", k_multiple=64, group=w4a16g_group,
           method_tensors=("bias",), method_layout=_bias_layout,
           parity_tests=(f"{_ENGINE_VS_SIM}[w4a8g]", "tests/test_ops.py::test_linear_w4a8g",
                         f"{_SMOLLM2_INT8}[w4a8g]")),
    # static per-channel int8 activations with a per-channel shift (OutlierTune; docs/numerics.md, "Static int8
    # activations"); in_scale and shift come from calibration, so there is no plain-RTN packing
    Scheme("w8a8s", _w8a8s_layout, _w8a8s_pack, w8a8s_linear, "float",
           parity_tests=(f"{_ENGINE_VS_SIM}[outliertune]", f"{_ENGINE_VS_SIM}[outliertune-w6a6-static]",
                         "tests/test_ops.py::test_linear_w8a8s")),
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
    extra = s.method_layout(*w.shape) if s.method_layout else {}
    if not layout.keys() <= packed.keys() <= layout.keys() | extra.keys():
        raise ValueError(f"scheme {scheme!r} packed {sorted(packed)} for {prefix!r}, layout says {sorted(layout)}")
    layout = layout | {key: extra[key] for key in packed.keys() - layout.keys()}
    for suffix, (dtype, shape) in layout.items():
        a = packed[suffix]
        if a.dtype != dtype or a.shape != shape:
            raise ValueError(f"scheme {scheme!r} packed {prefix}.{suffix} as {a.dtype}{list(a.shape)}, "
                             f"layout says {dtype}{list(shape)}")
    quant.setdefault("linears", {})[prefix] = scheme
    return {f"{prefix}.{suffix}": a for suffix, a in packed.items()}
