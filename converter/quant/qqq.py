"""qqq: W4A8 (schemes w4a8 per-channel, w4a8g group-wise with two-level scales) with per-token dynamic int8
activations, after QQQ's adaptive smoothing and GPTQ.

Adaptive smoothing, at the four input points of a block (blockwise.py folds the scales: q/k/v and gate/up
inputs into the RMSNorm weights, the o_proj input into the v rows, tied per KV group, the down input into
the up rows). Given a threshold t, channel j of the input X is divided by
    s_j = max(1, max_t X_tj / t, min_t X_tj / (-t)) = max(1, max_t |X_tj| / t)
(only the channels reaching beyond ±t shrink, to exactly ±t) and weight column j is multiplied by s_j. t is
searched on a grid from max|X| (no smoothing) down to 0.1, `smooth_steps` points spaced evenly, and the t
minimizing the squared error of the point's output under W4A8 fake quantization (the input smoothed and
quantized per token to int8, the smoothed weight rounded to nearest on the scheme's grid) against the
float output is kept. The output is the consuming linear's (q/k/v together, o_proj, down) and for the
gate/up point the SwiGLU output silu(g)·u that down_proj reads. The channel maxima come from all
calibration tokens; the loss from `smooth_rows` sampled tokens (every window's first token included).
For grouped-query attention the published method skips the o_proj point; here it is tied across each KV
group (the per-channel maxima of the query heads sharing a kv head are tied by their max, so s is tied
too), `o_smooth="skip"` restores the published choice.

GPTQ then quantizes each smoothed weight on the scheme's grid (act-order, static groups, damping 0.01,
blocks of 128), the Hessian from the linear's smoothed fp32 inputs through the already-quantized linears.
w4a8g's grid follows `grid`: "mse" (default; int4.qqq_grid_search, each row's channel and group scales
searched for the least squared rounding error) or "ceil" (int4.qqq_grid). The smoothing search rounds its
fake weights on the ceil grid by default (`smooth_grid="ceil"`; "same" rounds them on `grid`): measured on
SmolLM2 (bench/RESULTS.md), searching on the mse grid itself chose worse thresholds and cost 3-5x the time."""
from __future__ import annotations

from collections.abc import Iterator
from dataclasses import asdict, dataclass
from typing import Any

import numpy as np

from ..loaders import Checkpoint
from ..schemes import w4a16g_group
from .blockwise import GPTQOptions, Tie, blockwise_blocks, weight_params
from .calibrate import calibration_spec
from .int4 import QQQ_GRIDS, quant_qqq, quant_rows, w4a8g_grid
from .mergequant import sample_rows
from .rtn import check_scheme
from .simulate import swiglu

A8 = np.float32(127)


@dataclass(frozen=True)
class Options:
    group_size: int = 0          # 0: per-channel int4 (w4a8); 128: group-wise (w4a8g; 64 where K % 128 != 0)
    smooth: bool = True          # adaptive smoothing
    o_smooth: str = "tie"        # o_proj input: "tie" (v rows, tied per KV group) | "skip"
    smooth_steps: int = 40       # thresholds on the grid from max|X| down to 0.1 (40: the measured setting)
    smooth_rows: int = 512       # sampled tokens the smoothing loss is computed on
    gptq: bool = True
    act_order: bool = True
    damp: float = 0.01
    block: int = 128
    grid: str | None = "mse"     # w4a8g grid: "mse" (searched, int4.qqq_grid_search) | "ceil" (int4.qqq_grid);
                                 # None for per-channel w4a8 (step max|W|/7)
    smooth_grid: str | None = "ceil"  # w4a8g grid of the smoothing search's fake weights: "ceil" | "same" (as `grid`)

    @property
    def scheme(self) -> str:
        return "w4a8g" if self.group_size else "w4a8"


def fake_int8_tokens(x: np.ndarray) -> np.ndarray:
    """Per-token dynamic symmetric int8 fake quantization (the w4a8 / w4a8g input path)."""
    amax = np.abs(x).max(axis=1, keepdims=True)
    safe = np.where(amax > 0, amax, 1).astype(np.float32)
    return np.clip(np.rint(x * (A8 / safe)), -127, 127) * (safe / A8)


def fake_weight(w: np.ndarray, scheme: str, grid: str | None = "ceil") -> np.ndarray:
    """W rounded to nearest on the scheme's grid (w4a8g: by the rule `grid`, as the written weights), dequantized."""
    if scheme == "w4a8":
        q, s = quant_rows(w)
        return q * s[:, None]
    g = w4a16g_group(w.shape[1])
    q, gs, s = quant_qqq(w, g, *w4a8g_grid(w, g, grid or "ceil"))
    return q * (np.repeat(gs.astype(np.float32), g, axis=1) * s[:, None])


def search_threshold(xs: np.ndarray, amax: np.ndarray, w: np.ndarray, scheme: str, steps: int,
                     gated: bool, grid: str | None = "ceil") -> tuple[float, np.ndarray]:
    """(t, s) minimizing the fake-quantized output error on the rows xs [M, K], s = max(1, amax / t), the
    weight rounded on the w4a8g grid rule `grid` (Options.smooth_grid picks it: by default the ceil rule, not
    necessarily the file's); `gated`: the output is silu(g)·u of the two halves of xs·Wᵀ."""
    def out(x: np.ndarray, w: np.ndarray) -> np.ndarray:
        y = x @ w.T
        return swiglu(y[:, :y.shape[1] // 2], y[:, y.shape[1] // 2:]) if gated else y

    ref = out(xs, w)
    top = float(amax.max())
    best = (np.inf, top, np.ones_like(amax))
    for t in np.linspace(top, 0.1, steps) if top > 0.1 else [top]:
        s = np.maximum(1, amax / np.float32(t)).astype(np.float32)
        e = ref - out(fake_int8_tokens(xs / s), fake_weight(w * s, scheme, grid))
        loss = float(np.sum(e.astype(np.float64) ** 2))
        if loss < best[0]:
            best = (loss, float(t), s)
    return best[1], best[2]


class _QQQ:
    def __init__(self, opts: Options, seed: int, seq_len: int) -> None:
        self.opts = opts
        self.gptq = GPTQOptions(opts.gptq, opts.act_order, opts.damp, opts.block)
        self.rng = np.random.default_rng(seed)
        self.seq_len = seq_len
        self.thresholds: dict[str, list[float]] = {}

    def smooth(self, layer: int, site: str, x: np.ndarray, w: np.ndarray, tie: Tie) -> np.ndarray | None:
        o = self.opts
        if not o.smooth or (site == "attn_output" and o.o_smooth == "skip"):
            return None
        amax = tie(np.abs(x).max(axis=0))
        rows = sample_rows(len(x), self.seq_len, o.smooth_rows, self.rng)
        t, s = search_threshold(x[rows], amax, w, o.scheme, o.smooth_steps, gated=site == "ffn_gate_up",
                                grid=o.grid if o.smooth_grid == "same" else o.smooth_grid)
        # recorded as t / max|X|: 1 = no smoothing
        self.thresholds.setdefault(site, []).append(round(t / max(float(amax.max()), 1e-30), 4))
        return tie(s)

    def weights(self, layer: int, site: str, x: np.ndarray, w: np.ndarray) -> tuple[str, dict[str, Any]]:
        return self.opts.scheme, weight_params(self.opts.scheme, w, x, self.gptq, grid=self.opts.grid or "ceil")


def qqq(ck: Checkpoint, scheme: str | None = None, quant: dict[str, Any] | None = None, *,
        group_size: int = Options.group_size, no_smooth: bool = False, o_smooth: str = Options.o_smooth,
        smooth_steps: int = Options.smooth_steps, smooth_rows: int = Options.smooth_rows,
        gptq: bool = Options.gptq, act_order: bool = Options.act_order, damp: float = Options.damp,
        block: int = Options.block, grid: str = "mse", smooth_grid: str = "ceil", calib: str | None = None,
        calib_n: int | None = None,
        calib_len: int | None = None, seed: int | None = None, tokenizer: str | None = None
        ) -> Iterator[dict[str, np.ndarray]]:
    """Switches: group_size (0 | 128), no_smooth, o_smooth ("tie" | "skip"), smooth_steps, smooth_rows,
    gptq=False (RTN codes on the same grid), act_order, damp, block, grid ("mse" | "ceil": the w4a8g grid,
    group_size 128 only; recorded as None per-channel), smooth_grid ("ceil": the smoothing search rounds its
    fake weights on int4.qqq_grid whatever `grid` is | "same": on `grid`)."""
    if group_size not in (0, 128):
        raise ValueError(f"qqq: group_size must be 0 (per-channel) or 128, got {group_size}")
    if o_smooth not in ("tie", "skip"):
        raise ValueError(f"qqq: o_smooth must be 'tie' or 'skip', got {o_smooth!r}")
    if smooth_steps < 1 or smooth_rows < 1:
        raise ValueError(f"qqq: smooth_steps and smooth_rows must be >= 1, got {smooth_steps}, {smooth_rows}")
    if grid not in QQQ_GRIDS:
        raise ValueError(f"qqq: grid must be one of {QQQ_GRIDS}, got {grid!r}")
    if smooth_grid not in ("same", "ceil"):
        raise ValueError(f"qqq: smooth_grid must be 'same' or 'ceil', got {smooth_grid!r}")
    opts = Options(group_size, not no_smooth, o_smooth, smooth_steps, smooth_rows, gptq, act_order, damp, block,
                   grid if group_size else None, smooth_grid if group_size else None)
    check_scheme("qqq", opts.scheme, scheme)
    quant = {} if quant is None else quant
    spec = calibration_spec(dict(calib=calib, calib_n=calib_n, calib_len=calib_len, seed=seed, tokenizer=tokenizer))
    method = _QQQ(opts, spec.seed, spec.length)
    grid = ("int4 per row (step max|W|/7)" if not group_size else
            "int4 per group of 128 along K (64 where K % 128 != 0): channel scale times an integer group scale "
            "in [1, 16], " + ("searched per row for the least squared rounding error (channel scale c·max|W|/112, "
                              "c in 0.6..1)" if grid == "mse" else "channel scale max|W|/112, group scale "
                              "ceil(group max / 7 steps)"))
    quant["params"] = {"weights": grid + (", GPTQ codes" if gptq else ", RTN"),
                       "activations": "int8 symmetric per token, dynamic",
                       "options": asdict(opts), "calibration": asdict(spec),
                       "smoothing_thresholds": method.thresholds}
    return blockwise_blocks(ck, quant, method, spec)
