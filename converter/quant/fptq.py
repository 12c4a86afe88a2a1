"""fptq: W4A8 (scheme w4a8g, int4 weights per group of 128, RTN; or per-channel w4a8) with FPTQ's
logarithmic activation equalization (LAE) and its layer-wise policy, on per-token dynamic int8 activations.

LAE at the two norm-fed input points of a block (q/k/v and gate/up; blockwise.py folds the scale into the
RMSNorm weight): s_j = max|X_j| / log2(2 + max|X_j|) (weights play no part), X ← X / s, W[:, j] ← W[:, j] · s_j.
The policy looks at the range r = max|X| of each point: r < v0 (15) → no equalization, v0 ≤ r ≤ v1 (150) →
LAE, r > v1 → no equalization. The published policy quantizes the first two cases with static per-tensor
int8 activations and the third per token; this project has no static int8 scheme, so every point runs the
schemes' per-token dynamic int8 input and the policy decides only where LAE is applied (`policy=False`
applies LAE at every norm-fed point). Weights: round-to-nearest (GPTQ hurt in the published tests; `gptq=True`
turns it on: act-order, static groups, damping 0.01, block 128)."""
from __future__ import annotations

from collections.abc import Iterator
from dataclasses import asdict, dataclass
from typing import Any

import numpy as np

from ..loaders import Checkpoint
from .blockwise import GPTQOptions, Tie, blockwise_blocks, weight_params
from .calibrate import calibration_spec
from .rtn import check_scheme


@dataclass(frozen=True)
class Options:
    group_size: int = 128     # 128: w4a8g (64 where K % 128 != 0); 0: per-channel w4a8
    lae: bool = True          # logarithmic activation equalization
    policy: bool = True       # LAE only where v0 <= max|X| <= v1
    v0: float = 15.0
    v1: float = 150.0
    gptq: bool = False

    @property
    def scheme(self) -> str:
        return "w4a8g" if self.group_size else "w4a8"


def lae_scale(amax: np.ndarray) -> np.ndarray:
    """s_j = max|X_j| / log2(2 + max|X_j|), 1 for a channel that is never nonzero."""
    a = np.asarray(amax, np.float64)
    s = np.where(a > 0, a / np.log2(2 + a), 1)
    return np.maximum(s, 1e-5).astype(np.float32)


class _FPTQ:
    def __init__(self, opts: Options) -> None:
        self.opts = opts
        self.gptq = GPTQOptions(gptq=opts.gptq)
        self.applied: dict[str, list[float]] = {}

    def smooth(self, layer: int, site: str, x: np.ndarray, w: np.ndarray, tie: Tie) -> np.ndarray | None:
        if site not in ("attn_qkv", "ffn_gate_up") or not self.opts.lae:
            return None
        amax = np.abs(x).max(axis=0)
        r = float(amax.max())
        self.applied.setdefault(site, []).append(round(r, 2))
        if self.opts.policy and not self.opts.v0 <= r <= self.opts.v1:
            return None
        return lae_scale(amax)

    def weights(self, layer: int, site: str, x: np.ndarray, w: np.ndarray) -> tuple[str, dict[str, Any]]:
        return self.opts.scheme, weight_params(self.opts.scheme, w, x, self.gptq)


def fptq(ck: Checkpoint, scheme: str | None = None, quant: dict[str, Any] | None = None, *,
         group_size: int = Options.group_size, no_lae: bool = False, no_policy: bool = False,
         v0: float = Options.v0, v1: float = Options.v1, gptq: bool = False,
         calib: str | None = None, calib_n: int | None = None, calib_len: int | None = None,
         seed: int | None = None, tokenizer: str | None = None) -> Iterator[dict[str, np.ndarray]]:
    """Switches: group_size (128 | 0), no_lae, no_policy (LAE everywhere), v0, v1, gptq."""
    if group_size not in (0, 128):
        raise ValueError(f"fptq: group_size must be 0 (per-channel) or 128, got {group_size}")
    if not 0 <= v0 <= v1:
        raise ValueError(f"fptq: need 0 <= v0 <= v1, got v0={v0}, v1={v1}")
    opts = Options(group_size, not no_lae, not no_policy, v0, v1, gptq)
    check_scheme("fptq", opts.scheme, scheme)
    quant = {} if quant is None else quant
    spec = calibration_spec(dict(calib=calib, calib_n=calib_n, calib_len=calib_len, seed=seed, tokenizer=tokenizer))
    method = _FPTQ(opts)
    quant["params"] = {"weights": ("int4 per group of 128 (64 where K % 128 != 0), two-level scales" if group_size
                                   else "int4 per row") + (", GPTQ codes" if gptq else ", RTN"),
                       "activations": "int8 symmetric per token, dynamic",
                       "options": asdict(opts), "calibration": asdict(spec),
                       "activation_ranges": method.applied}
    return blockwise_blocks(ck, quant, method, spec)
