"""outliertune: W8A8 / W6A6 with static per-channel activations (scheme w8a8s) after OutlierTune's two steps.

- Symmetrization: per input channel j of a norm-fed linear (q/k/v, gate/up) the shift
      z_j = mean over the calibration windows of (max_t x_tj + min_t x_tj) / 2
  is subtracted from the norm output before quantization and given back as the bias b = Ŵ·z of the consumer
  (Ŵ the dequantized weight: the compensation is exact for the stored weight).
- Pre-execution of dequantization: the static step Δ_j = max_t |x_tj − z_j| / qmax (over every calibration
  token, on the stream of the already-quantized layers) is folded into the weight, W̃ = W·diag(Δ); the input
  codes are clamp(rint((x − z)·(1/Δ))), and only the per-row weight step δ_n of W̃ remains after the integer
  GEMM: y = float(acc)·δ_n + b_n (docs/numerics.md, "Static int8 activations").

o_proj and down inputs are per-token dynamic (scheme w8a8 with the same bit width), as published; with
`static_od=True` they are static per-channel too (w8a8s: the same shift and step rules, on the attention output
and the SwiGLU output). Weights: per-row symmetric RTN on [-qmax, qmax] (`gptq=True`: GPTQ on the same grid,
the Hessian from the static input as the linear quantizes it, in step units). Embeddings and the output matrix
stay f16. `bits=6` is W6A6 (codes in [-31, 31], stored as int8). `shift=False` turns symmetrization off
(z = 0, no bias compensation beyond zero)."""
from __future__ import annotations

from collections.abc import Iterator
from dataclasses import asdict, dataclass
from typing import Any

import numpy as np

from ..loaders import Checkpoint
from ..schemes import w8a8s_shift_bias
from .blockwise import GPTQOptions, Tie, blockwise_blocks, hessian, weight_params
from .calibrate import calibration_spec
from .gptq import gptq_quantize
from .int4 import qmax_for_bits, quant_rows_sym
from .rtn import check_scheme

NORM_SITES = ("attn_qkv", "ffn_gate_up")


@dataclass(frozen=True)
class Options:
    bits: int = 8             # weight and activation bits: 8 (W8A8) or 6 (W6A6)
    shift: bool = True        # symmetrization (the per-channel shift z and its bias compensation)
    static_od: bool = False   # o_proj / down inputs static per-channel (w8a8s) instead of per-token dynamic (w8a8)
    gptq: bool = False        # GPTQ codes instead of RTN, on the same per-row grid


def channel_shift(x: np.ndarray, windows: int) -> np.ndarray:
    """z_j = mean over the windows of (max_t x_tj + min_t x_tj) / 2, for x [windows·T, K] (float64 → fp32)."""
    xw = x.reshape(windows, -1, x.shape[1]).astype(np.float64)
    return ((xw.max(axis=1) + xw.min(axis=1)) / 2).mean(axis=0).astype(np.float32)


def static_steps(x: np.ndarray, shift: np.ndarray, qmax: int) -> np.ndarray:
    """in_scale_j = fp32(1 / Δ_j), Δ_j = max_t |x_tj − z_j| / qmax computed as the engine subtracts (fp32);
    a channel with no range gets in_scale 1 (its codes are 0 either way)."""
    amax = np.abs(x - shift).max(axis=0).astype(np.float64)
    inv = np.ones_like(amax)
    live = amax > 0
    inv[live] = qmax / amax[live]
    inv = inv.astype(np.float32)
    inv[~np.isfinite(inv)] = 1  # a subnormal range
    return inv


class _OutlierTune:
    def __init__(self, opts: Options, windows: int) -> None:
        self.opts, self.windows = opts, windows
        self.gptq = GPTQOptions(gptq=opts.gptq)

    def smooth(self, layer: int, site: str, x: np.ndarray, w: np.ndarray, tie: Tie) -> np.ndarray | None:
        return None  # the step is folded per channel by the scheme itself (w8a8s), not by smoothing

    def weights(self, layer: int, site: str, x: np.ndarray, w: np.ndarray) -> tuple[str, dict[str, Any]]:
        o = self.opts
        if site not in NORM_SITES and not o.static_od:
            return "w8a8", weight_params("w8a8", w, x, self.gptq, o.bits)
        qmax = qmax_for_bits(o.bits)
        shift = channel_shift(x, self.windows) if o.shift else np.zeros(x.shape[1], np.float32)
        in_scale = static_steps(x, shift, qmax)
        folded = (w.astype(np.float64) / in_scale.astype(np.float64)).astype(np.float32)
        codes, scale = quant_rows_sym(folded, qmax)
        if o.gptq:  # on the input the GEMM sees: (x − z)·in_scale, unrounded
            xs = (x - shift) * in_scale
            codes = gptq_quantize(folded, hessian(xs), scale, -qmax, qmax, self.gptq.block, self.gptq.damp,
                                  self.gptq.act_order)
        return "w8a8s", {"in_scale": in_scale, "shift": shift, "bits": o.bits, "codes": codes, "scale": scale,
                         "bias": w8a8s_shift_bias(codes, scale, in_scale, shift)}


def outliertune(ck: Checkpoint, scheme: str | None = None, quant: dict[str, Any] | None = None, *,
                bits: int = Options.bits, shift: bool = Options.shift, static_od: bool = Options.static_od,
                gptq: bool = Options.gptq, calib: str | None = None, calib_n: int | None = None,
                calib_len: int | None = None, seed: int | None = None,
                tokenizer: str | None = None) -> Iterator[dict[str, np.ndarray]]:
    """Switches: bits (8 | 6), shift (symmetrization), static_od (static o_proj / down inputs), gptq."""
    check_scheme("outliertune", "w8a8s", scheme)
    if bits not in (8, 6):
        raise ValueError(f"outliertune: bits must be 8 (W8A8) or 6 (W6A6), got {bits}")
    quant = {} if quant is None else quant
    opts = Options(bits, bool(shift), bool(static_od), bool(gptq))
    spec = calibration_spec(dict(calib=calib, calib_n=calib_n, calib_len=calib_len, seed=seed, tokenizer=tokenizer))
    od = "static per channel (w8a8s)" if opts.static_od else "per token, dynamic (w8a8)"
    quant["params"] = {"weights": f"int{bits} symmetric per row of W·diag(Δ)" + (", GPTQ codes" if gptq else ", RTN"),
                       "activations": f"int{bits}: q/k/v and gate/up inputs static per channel"
                                      + (" with a per-channel shift" if opts.shift else "") + f"; o_proj, down {od}",
                       "options": asdict(opts), "calibration": asdict(spec)}
    return blockwise_blocks(ck, quant, _OutlierTune(opts, spec.n), spec)
