"""smoothquant: W8A8 (scheme w8a8) with per-token dynamic int8 activations and per-channel int8 weights,
after SmoothQuant's migration of activation outliers into the weights: at each smoothed input point,
    s_j = max|X_j|^α / max|W_j|^(1-α)          (α = 0.5; max|W_j| over every linear reading channel j)
divides input channel j and multiplies weight column j (blockwise.py folds it: q/k/v and gate/up inputs
into the RMSNorm weights; the o_proj input into the v rows of attn_qkv, the statistics of the query heads
sharing a kv head tied by their max (`o_smooth="tie"`, or `"skip"`); the down input into the up rows of
ffn_gate_up (`down_smooth="up"`, or `"skip"`). Published SmoothQuant smooths only the norm-fed inputs
(`o_smooth="skip", down_smooth="skip"`). max|X_j| is taken over all calibration tokens, on the stream of
the already-quantized layers. Weights: per-row RTN (or GPTQ with `gptq=True`); `bits=6` gives W6A6."""
from __future__ import annotations

from collections.abc import Iterator
from dataclasses import asdict, dataclass
from typing import Any

import numpy as np

from ..loaders import Checkpoint
from .blockwise import GPTQOptions, Tie, blockwise_blocks, weight_params
from .calibrate import calibration_spec
from .int4 import qmax_for_bits
from .rtn import check_scheme

SMOOTH_CHOICES = {"o_smooth": ("tie", "skip"), "down_smooth": ("up", "skip")}


@dataclass(frozen=True)
class Options:
    alpha: float = 0.5          # migration strength
    bits: int = 8               # weight and activation bits (w8a8's P.bits): 8, or 6 for W6A6
    smooth: bool = True         # False: plain RTN W8A8 (the baseline SmoothQuant lifts)
    o_smooth: str = "tie"       # o_proj input: "tie" (v rows, tied per KV group) | "skip"
    down_smooth: str = "up"     # down input: "up" (up rows) | "skip"


def smoothing_scale(amax: np.ndarray, wmax: np.ndarray, alpha: float) -> np.ndarray:
    """s = amax^α / wmax^(1-α) per channel, 1 where a channel has no activation or no weight, in [1e-5, 1e5]."""
    a = np.asarray(amax, np.float64)
    wm = np.asarray(wmax, np.float64)
    live = (a > 0) & (wm > 0)
    s = np.ones_like(a)
    s[live] = a[live] ** alpha / wm[live] ** (1 - alpha)
    return np.clip(s, 1e-5, 1e5).astype(np.float32)


class _SmoothQuant:
    def __init__(self, opts: Options) -> None:
        self.opts = opts
        self.gptq = GPTQOptions(gptq=False)

    def smooth(self, layer: int, site: str, x: np.ndarray, w: np.ndarray, tie: Tie) -> np.ndarray | None:
        o = self.opts
        if not o.smooth or (site == "attn_output" and o.o_smooth == "skip") or \
                (site == "ffn_down" and o.down_smooth == "skip"):
            return None
        return smoothing_scale(tie(np.abs(x).max(axis=0)), tie(np.abs(w).max(axis=0)), o.alpha)

    def weights(self, layer: int, site: str, x: np.ndarray, w: np.ndarray) -> tuple[str, dict[str, Any]]:
        return "w8a8", weight_params("w8a8", w, x, self.gptq, self.opts.bits)


def check_choices(method: str, **given: str) -> None:
    for key, value in given.items():
        if value not in SMOOTH_CHOICES[key]:
            raise ValueError(f"{method}: {key} must be one of {', '.join(SMOOTH_CHOICES[key])}, got {value!r}")


def smoothquant(ck: Checkpoint, scheme: str | None = None, quant: dict[str, Any] | None = None, *,
                alpha: float = Options.alpha, bits: int = Options.bits, no_smooth: bool = False,
                o_smooth: str = Options.o_smooth, down_smooth: str = Options.down_smooth, gptq: bool = False,
                calib: str | None = None, calib_n: int | None = None, calib_len: int | None = None,
                seed: int | None = None, tokenizer: str | None = None) -> Iterator[dict[str, np.ndarray]]:
    """Switches: alpha, bits (8 | 6), no_smooth, o_smooth ("tie" | "skip"), down_smooth ("up" | "skip"),
    gptq (GPTQ codes, act-order, on the same per-row grid)."""
    check_scheme("smoothquant", "w8a8", scheme)
    check_choices("smoothquant", o_smooth=o_smooth, down_smooth=down_smooth)
    qmax_for_bits(bits)
    if not 0 <= alpha <= 1:
        raise ValueError(f"smoothquant: alpha must lie in [0, 1], got {alpha}")
    quant = {} if quant is None else quant
    opts = Options(alpha, bits, not no_smooth, o_smooth, down_smooth)
    method = _SmoothQuant(opts)
    method.gptq = GPTQOptions(gptq=gptq)
    spec = calibration_spec(dict(calib=calib, calib_n=calib_n, calib_len=calib_len, seed=seed, tokenizer=tokenizer))
    quant["params"] = {"weights": f"int{bits} symmetric per row" + (", GPTQ codes" if gptq else ", RTN"),
                       "activations": f"int{bits} symmetric per token, dynamic",
                       "options": asdict(opts) | {"gptq": gptq}, "calibration": asdict(spec)}
    return blockwise_blocks(ck, quant, method, spec)
