"""Layer-by-layer quantization onto the float-input schemes (w4a16g, w8a8, w4a8, w4a8g): the shared driver of
the gptq-w4a16, smoothquant and qqq methods (docs/methods.md).

Per block, the four linears are quantized in their order in the block (q/k/v, o_proj, gate/up, down), each on
its input as the engine will compute it from the block's input stream and the linears already quantized
before it (calibrate.run_sequential supplies the stream through the already-quantized layers). At each of the
four input points a method may smooth: a per-channel scale s [K] divides the linear's input and multiplies
its weight columns (`W·diag(s)`), exact before rounding. Where the division goes (no tensor and no op is
added to the block, so the engine runs it as the f16 block):
- q/k/v input, gate/up input (RMSNorm outputs): the norm weight, γ' = γ / s;
- o_proj input (attention output, [H·hd]): the v rows of attn_qkv (softmax rows sum to one, so a per-channel
  factor on v passes through attention); the query heads sharing a kv head read the same v rows, so s must
  be tied across each KV group (`tie_kv_groups`, the max over the group's heads);
- down input (silu(g)·u): the up rows of ffn_gate_up.
The o_proj and down divisions land on rows of a linear that is already quantized: a per-row weight scale
divided by s gives the same codes (each row's grid scales with the row), so they are folded into the stored
`scale` [N] (schemes w8a8, w4a8, w4a8g; an f16 linear has its rows divided)."""
from __future__ import annotations

from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any, Protocol

import numpy as np

from ..config import LlamaConfig
from ..loaders import Checkpoint
from ..reference import attention, rope, rope_cos_sin
from ..schemes import get_scheme, pack_linear, w4a16g_group
from .calibrate import CalibrationSpec, calibration_tokens, run_sequential
from .gptq import gptq_quantize
from .int4 import QMAX, QMIN, qmax_for_bits, quant_groups, quant_qqq, quant_rows, quant_rows_sym, w4a8g_grid
from .simulate import SimBlock, load_block, rms_factor, split_qkv, swiglu
from .simulate_linear import SimLinear

SITES = ("attn_qkv", "attn_output", "ffn_gate_up", "ffn_down")

Tie = Callable[[np.ndarray], np.ndarray]


class BlockMethod(Protocol):
    def smooth(self, layer: int, site: str, x: np.ndarray, w: np.ndarray, tie: Tie) -> np.ndarray | None:
        """The smoothing scale s [K] (> 0) of the input x [M, K] consumed by W [N, K], or None (no smoothing);
        `tie` maps a per-channel statistic to its KV-group max at the o_proj input (identity elsewhere), and
        s must be tied so (s == tie(s)) there."""

    def weights(self, layer: int, site: str, x: np.ndarray, w: np.ndarray) -> tuple[str, dict[str, Any]]:
        """The scheme and the packer's parameters (explicit codes and scales, or none for its RTN) of the
        linear W [N, K] whose (smoothed) input is x [M, K]."""


def tie_kv_groups(c: np.ndarray, config: LlamaConfig) -> np.ndarray:
    """Per attention-output channel (head h, dim d) → the max over the query heads sharing h's kv head."""
    h_kv, hd = config.num_key_value_heads, config.head_dim
    group = config.num_attention_heads // h_kv
    return np.repeat(c.reshape(h_kv, group, hd).max(axis=1), group, axis=0).reshape(-1)


def v_row_divisor(s_o: np.ndarray, config: LlamaConfig) -> np.ndarray:
    """The tied o_proj input scales [H·hd] as one divisor per v row (kv head g, dim d) [Hkv·hd]."""
    return s_o.reshape(config.num_key_value_heads, -1, config.head_dim)[:, 0].reshape(-1)


def calibration_attention(q: np.ndarray, k: np.ndarray, v: np.ndarray, config: LlamaConfig,
                          cos: np.ndarray, sin: np.ndarray) -> np.ndarray:
    """Attention output [B, T, H·hd] of q/k/v [B, T, ·] (pre-RoPE) in plain fp32 (reference.attention), for the
    o_proj input's statistics and Hessian; the stream to the next layer is computed by the engine's exact
    numerics (simulate.block_forward, in calibrate.run_sequential), so this one need not be bit-exact."""
    b, t, _ = q.shape
    h, hkv, hd = config.num_attention_heads, config.num_key_value_heads, config.head_dim
    out = np.empty((b, t, h * hd), np.float32)
    for i in range(b):
        out[i] = attention(rope(q[i].reshape(t, h, hd), cos, sin), rope(k[i].reshape(t, hkv, hd), cos, sin),
                           v[i].reshape(t, hkv, hd), 0)
    return out


def hessian(x: np.ndarray) -> np.ndarray:
    """xᵀx [K, K] in float64 of the inputs x [M, K] (fp32 products summed by BLAS, then widened)."""
    return (x.T @ x).astype(np.float64)


class _Linear:
    """One packed linear of the block under construction: its file tensors and its simulator path."""

    def __init__(self, prefix: str, scheme: str, tensors: dict[str, np.ndarray]) -> None:
        self.prefix, self.scheme, self.tensors = prefix, scheme, tensors

    def sim(self) -> SimLinear:
        return get_scheme(self.scheme).simulate(lambda s: self.tensors.get(f"{self.prefix}.{s}"))

    def fold_rows(self, rows: slice, divisor: np.ndarray) -> None:
        """Output rows divided by `divisor` through the per-row scale (and bias): the codes are unchanged."""
        weight = self.tensors.get(self.prefix + ".weight")
        if weight is not None:  # f16: the rows themselves (rounded again to fp16; exact for powers of two)
            weight = weight.astype(np.float32)
            weight[rows] /= divisor[:, None]
            self.tensors[self.prefix + ".weight"] = weight.astype(np.float16)
            return
        scale = self.tensors.get(self.prefix + ".scale")
        if scale is None or scale.ndim != 1:
            raise ValueError(f"{self.prefix}: scheme {self.scheme!r} has no per-row scale [N] to fold a smoothing "
                             f"scale into (smoothing of the o_proj / down inputs needs w8a8, w4a8 or w4a8g)")
        scale = scale.copy()
        scale[rows] = (scale[rows] / divisor).astype(np.float32)
        self.tensors[self.prefix + ".scale"] = scale
        bias = self.tensors.get(self.prefix + ".bias")
        if bias is not None:
            bias = bias.copy()
            bias[rows] = (bias[rows] / divisor).astype(np.float32)
            self.tensors[self.prefix + ".bias"] = bias


def quantize_block(i: int, h: np.ndarray, fused: dict[str, np.ndarray], config: LlamaConfig,
                   method: BlockMethod, quant: dict[str, Any]) -> tuple[dict[str, np.ndarray], SimBlock]:
    """Block i on its input stream h [B, T, D] → its file tensors and the SimBlock that executes them."""
    b, t, d = h.shape
    p = f"blk.{i}."
    eps, f = config.rms_norm_eps, config.intermediate_size
    nq, nkv = config.num_attention_heads * config.head_dim, config.num_key_value_heads * config.head_dim
    flat = lambda v: v.reshape(b * t, -1)  # noqa: E731
    same: Tie = lambda c: c  # noqa: E731

    def linear(site: str, x: np.ndarray, w: np.ndarray) -> _Linear:
        scheme, params = method.weights(i, site, x, w)
        return _Linear(p + site, scheme, pack_linear(p + site, w, scheme, quant, **params))

    def norm_site(site: str, norm: str, h: np.ndarray) -> tuple[np.ndarray, np.ndarray, _Linear]:
        """A linear fed by an RMSNorm: smoothing folded into the norm weight; returns (γ', input, linear)."""
        gamma = fused[p + norm].astype(np.float32)
        w = fused[p + site]
        x = flat(h * rms_factor(h, eps) * gamma)
        s = method.smooth(i, site, x, w, same)
        if s is not None:
            gamma = (gamma / s).astype(np.float32)
            w = (w * s).astype(np.float32)
            x = flat(h * rms_factor(h, eps) * gamma)  # as the engine computes it, from γ'
        return gamma, x, linear(site, x, w)

    # attention
    g1, x1, qkv = norm_site("attn_qkv", "attn_norm.weight", h)
    q, k, v = split_qkv(qkv.sim()(x1).reshape(b, t, -1), config)
    del x1
    o = flat(calibration_attention(q, k, v, config, *rope_cos_sin(config, np.arange(t))))
    del q, k, v
    w_o = fused[p + "attn_output"]
    s_o = method.smooth(i, "attn_output", o, w_o, lambda c: tie_kv_groups(c, config))
    if s_o is not None:
        if not np.array_equal(s_o, tie_kv_groups(s_o, config)):
            raise ValueError(f"layer {i}: the o_proj smoothing scale is not tied across the KV groups")
        qkv.fold_rows(slice(nq + nkv, None), v_row_divisor(s_o, config))
        o = (o / s_o).astype(np.float32)
        w_o = (w_o * s_o).astype(np.float32)
    out = linear("attn_output", o, w_o)
    h_mid = h + out.sim()(o).reshape(b, t, d)
    del o

    # MLP
    g2, x2, gate_up = norm_site("ffn_gate_up", "ffn_norm.weight", h_mid)
    y = gate_up.sim()(x2)
    del x2
    m = swiglu(y[:, :f], y[:, f:])
    del y
    w_down = fused[p + "ffn_down"]
    s_d = method.smooth(i, "ffn_down", m, w_down, same)
    if s_d is not None:
        gate_up.fold_rows(slice(f, None), s_d)
        m = (m / s_d).astype(np.float32)
        w_down = (w_down * s_d).astype(np.float32)
    down = linear("ffn_down", m, w_down)
    del m

    tensors = {p + "attn_norm.weight": g1, p + "ffn_norm.weight": g2}
    for lin in (qkv, out, gate_up, down):
        tensors |= lin.tensors
    return tensors, load_block(config, tensors.get, quant["linears"], i)


@dataclass(frozen=True)
class GPTQOptions:
    """GPTQ on the scheme's grid (static groups: the grid is fixed from the weight before GPTQ runs)."""
    gptq: bool = True        # False: round-to-nearest on the same grid
    act_order: bool = True   # columns in decreasing order of diag(H)
    damp: float = 0.01       # damping: this fraction of mean(diag H) added to H's diagonal
    block: int = 128         # columns per lazy-update block


def weight_params(scheme: str, w: np.ndarray, x: np.ndarray, opts: GPTQOptions, bits: int = 8,
                  grid: str = "ceil") -> dict[str, Any]:
    """The packer parameters of W [N, K] (input x [M, K]) on `scheme`'s RTN grid, codes by GPTQ (or RTN):
    w4a16g: fp16 scale per group (quant_groups); w4a8: per-row step max|W|/7; w4a8g: the two-level grid by
    the rule `grid` (int4.w4a8g_grid: "ceil" = int4.qqq_grid, "mse" = int4.qqq_grid_search), fixed before
    GPTQ runs; w8a8: per-row step max|W|/qmax, qmax = 2^(bits-1) - 1."""
    lo, hi = QMIN, QMAX
    extra: dict[str, Any] = {}
    if scheme == "w4a16g":
        codes, s16 = quant_groups(w, w4a16g_group(w.shape[1]))
        step = np.repeat(s16.astype(np.float32), w.shape[1] // s16.shape[1], axis=1)
        scale: np.ndarray = s16
    elif scheme == "w4a8":
        codes, scale = quant_rows(w)
        step = scale
    elif scheme == "w4a8g":
        group = w4a16g_group(w.shape[1])
        codes, gscale, scale = quant_qqq(w, group, *w4a8g_grid(w, group, grid))
        step = np.repeat(gscale.astype(np.float32), w.shape[1] // gscale.shape[1], axis=1) * scale[:, None]
        extra["gscale"] = gscale
    elif scheme == "w8a8":
        qmax = qmax_for_bits(bits)
        codes, scale = quant_rows_sym(w, qmax)
        step, lo, hi = scale, -qmax, qmax
        extra["bits"] = bits
    else:
        raise ValueError(f"weight_params: no weight grid for scheme {scheme!r}")
    if opts.gptq:
        codes = gptq_quantize(w, hessian(x), step, lo, hi, opts.block, opts.damp, opts.act_order)
    return {"codes": codes, "scale": scale} | extra


def blockwise_blocks(ck: Checkpoint, quant: dict[str, Any], method: BlockMethod,
                     calib: CalibrationSpec) -> Iterator[dict[str, np.ndarray]]:
    """The blocks of `method` on the calibration windows of `calib`, layer by layer (run_sequential)."""
    ids = calibration_tokens(calib, ck)
    return run_sequential(ck, ids, lambda i, h, fused: quantize_block(i, h, fused, ck.config, method, quant))
