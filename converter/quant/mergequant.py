"""MergeQuant: W4A4 with static per-channel activation steps migrated into the producers
(quantization step migration, QSM), so every linear is an int4×int4 GEMM with a per-row epilogue:
- q/k/v and gate/up inputs: 1/Δ folded into the RMSNorm weight (`in_scale` = γ/Δ);
- o_proj input: v_proj rows divided by Δᵒ (tied across the query heads of a KV group), attention emits
  codes directly; down_proj input: up_proj rows divided by Δᵈ, SwiGLU emits codes directly;
- W̃ = W·diag(Δ) quantized per output row.
On top: adaptive clipping (clip.py), channel splitting (split.py), GPTQ weights (gptq.py) and a low-rank
compensation branch fitted to what remains (lowrank.py). With every switch off this is the plain static
RTN baseline (`rtn-w4a4-static`). Layers are calibrated in sequence on the stream of the already-quantized
layers (calibrate.py)."""
from __future__ import annotations

from collections.abc import Callable, Iterator
import json
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Any

import numpy as np

from ..config import LlamaConfig
from ..layers import fused_layer
from ..loaders import Checkpoint
from ..reference import rope_cos_sin
from ..schemes import pack_linear
from .blas import parallel_for
from .calibrate import CalibrationSpec, calibration_tokens, run_sequential, stage
from .clip import fake_quant, refine_act_clip, search_act_clip, search_weight_scale
from .gptq import gptq_codes, working_columns
from .int4 import K_ALIGN, QMAX, QMIN, pad_columns, pad_k, quant_rows, round_codes
from .lowrank import ridge_solve, top_directions
from .rtn import check_scheme
from .simulate import SimBlock, attend, load_block, rms_factor, split_qkv, swiglu
from .simulate_linear import expand_slots, lora_branch
from .split import allocate_layers, allocate_parts, build_in_map, expand_columns, extra_slots, greedy_slots


# The numerics of the file this method writes for given options: raise it with every change that alters the file
# (the default model's cache key includes it: python/mergequant/default_model.py). 2 (2026-12-04): the linears
# fitted on the engine's own input codes, the low-rank cross term from (aᵀx)·Wᵀ. 3 (2026-12-05): GPTQ's inverse
# factor and the low-rank solve in place (Cholesky-based: other rounding), float32 above Options.f64_limit.
# 4 (2026-12-05): the defaults act_order, rank 32 at ffn_down and attn_output, ffn_down split budget 0.35
# (bench/RESULTS.md, "W4A4 levers ... 32 × 512 calibration"). 5 (2026-12-08): the default alloc_down, ffn_down's
# split slots shared by the layers under the same total, probed on 8 sequences (bench/RESULTS.md, "W4A4 levers
# (2026-12-08, issue 12)").
RECIPE_VERSION = 5


@dataclass(frozen=True)
class Options:
    clip: bool = True          # adaptive clipping of activation ranges and weight-row steps
    split: bool = True         # channel splitting into the K padding plus `budget`·K slots
    budget: float = 0.03
    budget_down: float | None = 0.35  # ffn_down's own split budget (its SwiGLU input carries the most error; the
                                      # engine-measured curve is in bench/RESULTS.md); None: `budget`
    down_a8: bool = False      # mixed precision: ffn_down in w4a8 (per-token int8 inputs), not static W4A4
    down_alpha: float = 0.5    # its smoothing exponent (SmoothQuant's α), the scales folded into the up rows
    rank: int = 16             # low-rank compensation rank (0: off)
    rank_down: int | None = 32    # ffn_down's own rank (None: `rank`)
    rank_o: int | None = 32       # attn_output's own rank (None: `rank`)
    gptq: bool = True          # GPTQ codes instead of RTN (the low-rank branch then fits what GPTQ leaves)
    gptq_target: str = "w"     # "w": the folded weight W̃; "ls": least-squares fit of X·Wᵀ on the int4 inputs;
                               # "ridge": that fit shrunk toward W̃ (weight `ridge` · mean diag of aᵀa)
    act_order: bool = True     # GPTQ columns in decreasing input energy
    ridge: float = 1.0
    clip_power: float = 2.4    # per-channel clip objective Σ|x̂ − x|^p (then p = 2; the layer error decides)
    clip_sample: int = 2048    # tokens the clip searches look at (plus every sequence's first token)
    damp: float = 0.01
    block: int = 128           # GPTQ lazy-update block (columns)
    f64_limit: int = 1 << 28   # bytes: a linear whose [Kp, Kp] or [N, Kp] float64 work arrays would exceed this
                               # has its Gram matrix, GPTQ and low-rank fit in float32 (a 7B q/k/v, gate/up,
                               # down; the reference GPTQ's precision), else float64 (every SmolLM2 linear)
    clip_scales: tuple[float, ...] = ()  # global factors tried on the chosen activation ranges (the layer error
                                         # decides; () : none)
    alloc_down: bool = True    # ffn_down's split slots shared by the layers: the total of `budget_down` in every
                               # layer, each layer's share by the noise model on a float probe (probe_down_slots)
    alloc_norm: str = "stream"  # how a layer's ffn_down noise is weighed: "stream" (relative to the median token
                                # energy of the residual stream it adds to) or "abs" (as it is)
    alloc_probe: int = 8       # calibration sequences the float probe runs
    alloc_cap: float | None = None  # the most one layer's ffn_down takes, a multiple of the even share (None: any
                                    # share that keeps it on the float64 path, f64_limit)
    clip_refine: int = 0       # sweeps of the per-channel range refinement against the linear's output error
                               # (clip.refine_act_clip) on the split inputs' chosen ranges (0: off)

    def rank_for(self, name: str) -> int:
        """The low-rank rank of linear `name` (attn_qkv, attn_output, ffn_gate_up, ffn_down): rank 0 turns the
        branch off everywhere (rtn-w4a4-static, `--rank 0`); else ffn_down's and attn_output's own ranks, where set,
        replace it for those two."""
        if self.rank == 0:
            return 0
        own = {"ffn_down": self.rank_down, "attn_output": self.rank_o}.get(name)
        return self.rank if own is None else own


@dataclass
class InputQuant:
    """How one linear's input is quantized: per source channel the step Δ and parts m; the slot map."""
    step: np.ndarray      # [K] fp32
    in_map: np.ndarray    # [Kp, 3] int32

    @property
    def kp(self) -> int:
        return self.in_map.shape[0]

    def codes(self, x: np.ndarray) -> np.ndarray:
        return expand_slots(x / self.step, self.in_map)

    def exact_slots(self, x: np.ndarray) -> np.ndarray:
        """The slots before rounding: each of channel j's m_j slots holds (x_j/Δ_j)/m_j, padding 0."""
        src, parts = self.in_map[:, 0], self.in_map[:, 2]
        live = src >= 0
        out = np.zeros((x.shape[0], self.kp), np.float32)
        out[:, live] = (x / self.step)[:, src[live]] / parts[live]
        return out


@dataclass
class LinearQuant:
    codes: np.ndarray             # int8 [N, Kp]
    scale: np.ndarray             # fp32 [N]
    lora: tuple[np.ndarray, np.ndarray] | None  # fp16-exact A [r, Kp], B [N, r]
    y: np.ndarray | None          # the quantized linear's output on the calibration inputs [M, N] (None: released)
    errors: dict[str, float] | None = None  # on the held-out rows (error_report)
    acc: np.ndarray | None = None  # the integer accumulators a·qᵀ of the output columns `keep_acc` (exact in fp32)

    def fold_rows(self, rows: slice, divisor: np.ndarray) -> None:
        """Divide output rows by a step folded downstream (v rows by Δᵒ, up rows by Δᵈ); exact. The calibration
        output `y`, once released (None: its consumers have run), is left alone."""
        self.scale[rows] /= divisor
        if self.y is not None:
            self.y[:, rows] /= divisor
        if self.lora is not None:
            b = self.lora[1].copy()
            b[rows] /= divisor[:, None]
            self.lora = (self.lora[0], b.astype(np.float16).astype(np.float32))

    def tensors(self, prefix: str, quant: dict[str, Any]) -> dict[str, np.ndarray]:
        out = pack_linear(prefix, self.codes.astype(np.float32), "w4a4", quant, scale=self.scale, codes=self.codes)
        if self.lora is not None:
            out[prefix + ".lora_a"] = self.lora[0].astype(np.float16)
            out[prefix + ".lora_b"] = self.lora[1].astype(np.float16)
        return out


# a linear's work arrays above this many bytes are formed in blocks (layer_error) or in float32 (quantize_linear's
# Gram matrix, GPTQ and the low-rank fit: Options.f64_limit); SmolLM2-135M's linears stay below it
LARGE_BYTES = 64 << 20


def sample_rows(m: int, seq_len: int, count: int, rng: np.random.Generator) -> np.ndarray:
    """Every sequence's first token (attention sinks carry the outlier values) plus random rows."""
    first = np.arange(0, m, seq_len)
    rest = rng.choice(m, size=min(count, m), replace=False)
    return np.unique(np.concatenate([first, rest]))


def layer_error(x: np.ndarray, y: np.ndarray, w: np.ndarray, c: np.ndarray, parts: np.ndarray) -> float:
    """‖y − x̂·Ŵᵀ‖² (y = x·Wᵀ) with x̂ the static int4 activations on ranges c and Ŵ the per-row RTN of the
    folded weight W·diag(Δ), mapped back (Ŵ = Q(W·Δ)/Δ)."""
    step = np.where(c > 0, c, 1) / (QMAX * parts)  # (float64: parts is int64)
    # x̂ in the product's precision once (the products below are float64: Ŵ is), not cast again in every block
    x_hat = fake_quant(x, c, parts).astype(np.result_type(np.float32, step))
    # in blocks of output rows past LARGE_BYTES of W (a 7B gate/up: 360 MB, and the candidates run in threads);
    # one block below it (per-row RTN: the blocks' rows are the whole matrix's)
    rows = w.shape[0] if w.nbytes <= LARGE_BYTES else max(1, LARGE_BYTES // 4 // max(w.shape[1], 1))
    total = 0.0
    for r0 in range(0, w.shape[0], rows):
        w_hat = rtn_fold_rows(w[r0:r0 + rows], step)
        e = y[:, r0:r0 + rows] - x_hat @ w_hat.T
        del w_hat
        total += float(np.sum(e * e, dtype=np.float64))
    return total


def rtn_fold_rows(w: np.ndarray, step: np.ndarray) -> np.ndarray:
    """Ŵ = Q(W·Δ)/Δ for the rows of W [N, K] (Q: int4.quant_rows, the per-row RTN), the values of
    `q * s[:, None] / step` from `q, s = quant_rows(w * step)` exactly, in one array of the product's size and one
    float32 temporary: the scaled rows are rounded, clamped, multiplied back and divided in place."""
    t = w * step  # W·Δ (float64 for a float64 Δ)
    # the row steps: max|t| / 7 as quant_rows forms them (the max of |t| is that of max(t) and −min(t), exactly)
    s = (np.abs(np.maximum(t.max(axis=1), -t.min(axis=1))) / QMAX).astype(np.float32)  # (abs: +0 for a zero row)
    t /= np.where(s > 0, s, 1).astype(np.float32)[:, None]
    np.rint(t, out=t)
    np.clip(t, QMIN, QMAX, out=t)
    t += 0.0  # (−0 → +0: the int8 codes have no sign of zero)
    t[s == 0] = 0
    t *= s[:, None]  # q·s, exact in t's float64 (small integers times a float32) ...
    if t.dtype != np.float32:
        t[...] = t.astype(np.float32)  # ... rounded to float32 as quant_rows' int8 codes times its fp32 steps are
    t /= step
    return t


def choose_ranges(xs: np.ndarray, w: np.ndarray, parts: np.ndarray, opts: Options,
                  tie: Callable[[np.ndarray], np.ndarray], y: np.ndarray | None = None) -> np.ndarray:
    """Static ranges c [K] on the sample xs: absmax, or (clip) the per-channel searches with the
    |·|^2.4 and the squared objective; the layer-output error picks among them (y: xs·Wᵀ when known)."""
    amax = tie(np.abs(xs).max(axis=0))
    if not opts.clip:
        return amax
    candidates = [amax] + [tie(r * amax) for r in search_act_clip(xs, amax, parts, (opts.clip_power, 2.0))]
    y = xs @ w.T if y is None else y
    errors = [0.0] * len(candidates)

    def error(i: int) -> None:
        errors[i] = layer_error(xs, y, w, candidates[i], parts)

    parallel_for(error, len(candidates))  # in threads
    best = candidates[int(np.argmin(errors))]
    if not opts.clip_scales:
        return best
    # the winner scaled by global factors (a range the per-channel objectives cannot reach: they see one channel)
    scaled = [best] + [np.float32(f) * best for f in opts.clip_scales]
    errors = [errors[int(np.argmin(errors))]] + [0.0] * len(opts.clip_scales)
    candidates = scaled

    def error_scaled(i: int) -> None:
        errors[i + 1] = layer_error(xs, y, w, candidates[i + 1], parts)

    parallel_for(error_scaled, len(opts.clip_scales))
    return candidates[int(np.argmin(errors))]


def quantize_input(x: np.ndarray, w: np.ndarray, rows: np.ndarray, opts: Options, splittable: bool,
                   tie: Callable[[np.ndarray], np.ndarray] = lambda c: c, budget: float | None = None,
                   extra: int | None = None) -> InputQuant:
    """Static quantization of an input x [M, K] (fp, from the quantized stream) consumed by W [N, K]; `budget`:
    the split budget (opts.budget when None); `extra`: the split slots themselves (K + extra a multiple of
    K_ALIGN), instead of the budget's."""
    k = x.shape[1]
    budget = opts.budget if budget is None else budget
    extra = extra_slots(k, budget) if extra is None else extra
    xs = x[rows]
    parts = np.ones(k, np.int64)
    y = xs @ w.T if opts.clip else None  # the sample's fp output, for both range choices
    c = choose_ranges(xs, w, parts, opts, tie, y)
    if splittable and opts.split:
        parts = allocate_parts(c, np.sum(w * w, axis=0), extra)
        c = choose_ranges(xs, w, parts, opts, tie, y)
        kp = pad_k(k + extra)
    else:
        kp = pad_k(k)
    if splittable and opts.clip and opts.clip_refine:  # (splittable: one range per channel, no tie)
        c = refine_act_clip(xs, w, c, np.abs(xs).max(axis=0), parts, opts.clip_refine)
    c = np.maximum(c, 1e-6 * max(float(c.max()), 1e-30)).astype(np.float32)
    return InputQuant((c / (QMAX * parts)).astype(np.float32), build_in_map(parts, kp))


def tie_kv_groups(c: np.ndarray, config: LlamaConfig) -> np.ndarray:
    """Per attention-output channel (head h, dim d) → the max over the query heads sharing h's kv head."""
    h_kv, hd = config.num_key_value_heads, config.head_dim
    group = config.num_attention_heads // h_kv
    return np.repeat(c.reshape(h_kv, group, hd).max(axis=1), group, axis=0).reshape(-1)


def v_row_steps(step_o: np.ndarray, config: LlamaConfig) -> np.ndarray:
    """The tied o_proj input steps [H·hd] as one divisor per v row (kv head g, dim d) [Hkv·hd]."""
    h_kv, hd = config.num_key_value_heads, config.head_dim
    return step_o.reshape(h_kv, -1, hd)[:, 0].reshape(-1)


def linear_errors(x: np.ndarray, a: np.ndarray, y: np.ndarray, w_fold: np.ndarray, lq: LinearQuant,
                  inp: InputQuant | np.ndarray, fit: int) -> dict[str, float]:
    """Relative output errors ‖y − ŷ‖² / ‖y‖² on the held-out rows (those past `fit`), y = x·Wᵀ on the fp
    input from the quantized stream: `weights` (unrounded input slots, the linear's int4 weights and its
    low-rank branch), `inputs` (the int4 input codes, the folded fp weight W̃), `both` (the linear as stored)."""
    x, a, y = x[fit:], a[fit:], y[fit:]
    exact = inp.exact_slots(x) if isinstance(inp, InputQuant) else pad_columns(x / inp, a.shape[1])
    w_hat = lq.codes.astype(np.float32) * lq.scale[:, None]
    y_w = exact @ w_hat.T
    if lq.lora is not None:
        y_w += lora_branch(exact, *lq.lora)
    norm = float(np.sum(y.astype(np.float64) ** 2)) or 1.0
    rel = lambda y_hat: float(np.sum((y - y_hat).astype(np.float64) ** 2)) / norm  # noqa: E731
    return {"weights": rel(y_w), "inputs": rel(a @ w_fold.T), "both": rel(lq.y[fit:])}


def fitted_apart(f: Callable[[np.ndarray], np.ndarray], x: np.ndarray, fit: int) -> np.ndarray:
    """f of the rows of x, the first `fit` rows in a call of their own: a matrix product's rows can round
    differently in a taller product (the BLAS blocks by shape), and the held-out rows of the error report must not
    change a single bit of what is fitted."""
    if fit >= len(x):
        return f(x)
    return np.concatenate([f(x[:fit]), f(x[fit:])])


# the largest Gram matrix (fp32 bytes) quantize_linear keeps beside GPTQ's buffer for the low-rank fit; above
# it, the matrix is formed again after GPTQ (the same exact integers, one more GEMM)
KEEP_GRAM_BYTES = 64 << 20


def gram_matrix(a: np.ndarray, dtype: type = np.float64, cols: int = 1024) -> np.ndarray:
    """aᵀa [K, K] for integer codes a [M, K] (fp32): in float32 the one product, in float64 from fp32 products of
    `cols` columns at a time, without an fp32 [K, K] copy beside it; exact (the same values) either way while the
    entries stay below 2^24."""
    if dtype == np.float32:
        return a.T @ a
    k = a.shape[1]
    out = np.empty((k, k), np.float64)
    for j in range(0, k, cols):
        out[:, j:j + cols] = a.T @ a[:, j:j + cols]
    return out


def column_energy(a: np.ndarray, cols: int = 1024) -> np.ndarray:
    """diag(aᵀa) [K] in float64 for integer codes a [M, K] (fp32), `cols` columns at a time: the values of the
    Gram matrix's diagonal exactly (integer sums below 2^24), without forming the matrix."""
    return np.concatenate([np.add.reduce(np.square(a[:, j:j + cols]), axis=0, dtype=np.float64)
                           for j in range(0, a.shape[1], cols)]) if a.shape[1] else np.zeros(0)


def quantize_linear(a: np.ndarray, x: np.ndarray, w: np.ndarray, inp: InputQuant | np.ndarray,
                    opts: Options, fit: int | None = None, keep_acc: slice | None = None,
                    rank: int | None = None) -> LinearQuant:
    """Weights of one linear given its int4 input codes a [M, Kp] and fp input x [M, K]: W̃ = W·diag(Δ)
    in slot layout, per-row steps, RTN or GPTQ codes, then the low-rank branch on the residual. Only the
    first `fit` rows (all by default) are fitted; the rest are held out for the error report. `rank`: the
    low-rank branch's rank (None: opts.rank)."""
    rank = opts.rank if rank is None else rank
    if isinstance(inp, InputQuant):
        w_t = expand_columns(w * inp.step, inp.in_map)
    else:  # a step vector for an unsplit input (o_proj): columns scaled, K padded
        w_t = pad_columns(w * inp, a.shape[1])
    w_fold = w_t
    fit = len(a) if fit is None else fit
    report = fit < len(a)
    ls_target = opts.gptq and opts.gptq_target in ("ls", "ridge")
    k, kp, n = x.shape[1], a.shape[1], w.shape[0]
    # the low-rank fit needs aᵀ·y (y = x·Wᵀ on the fitted rows): as (aᵀ·x)·Wᵀ where that product over the
    # calibration rows is the smaller one (kp·k < (k + kp)·n: q/k/v, o, gate/up), else from y itself (down)
    via_x = rank > 0 and kp * k < (k + kp) * n  # (the error report's held-out rows do not change the choice)
    need_y = report or ls_target or (rank > 0 and not via_x)
    y_all = fitted_apart(lambda v: v @ w.T, x, fit) if need_y else None
    a_all = a
    a = a_all[:fit]
    y = y_all[:fit] if need_y else None
    if not via_x:
        del w  # (a caller that hands W over as a temporary holds no other reference: split_input_linear)
    # the Gram matrix aᵀa (exact: integer entries below 2^24 in the fp32 products), in float64 up to
    # opts.f64_limit bytes, in float32 above (a 7B ffn_down: docs/architecture.md, "Memory of a conversion");
    # GPTQ turns this buffer into its inverse factor in place
    dt = np.float64 if max(kp, n) * kp * 8 <= opts.f64_limit else np.float32
    if ls_target:
        gram = gram_matrix(a, dt)
        diag = np.diag(gram).astype(np.float64)
        lam = opts.damp * max(float(np.mean(diag)), 1e-8)
        # argmin ‖a·Vᵀ − y‖² + μ‖V − V₀‖² = (aᵀa + μI)⁻¹ (aᵀy + μV₀ᵀ); V₀ = 0 ("ls") or W̃ ("ridge")
        mu = lam if opts.gptq_target == "ls" else opts.ridge * lam / opts.damp
        prior = 0 if opts.gptq_target == "ls" else mu * w_t.T.astype(np.float64)
        w_t = np.linalg.solve(gram.astype(np.float64) + mu * np.eye(len(gram)),
                              (a.T @ y).astype(np.float64) + prior).T.astype(np.float32)
    else:  # the Gram matrix is formed after the weight's steps and GPTQ's working copy (below)
        gram, diag = None, column_energy(a)  # diag(aᵀa), the same values
    scale = search_weight_scale(w_t, diag) if opts.clip else np.abs(w_t).max(axis=1) / QMAX
    if opts.gptq:
        # GPTQ's working copy of W̃ (its columns as rows, in act-order) made now, before the [Kp, Kp] buffer exists,
        # and W̃ dropped (unless the error report reads it again): one [N, Kp] weight alive during the sweep
        cols = working_columns(w_t, diag, opts.act_order, dt)
        if not report:
            w_t = w_fold = None
        if gram is None:
            gram = gram_matrix(a, dt)
        # a small Gram matrix is kept (fp32, exact) for the low-rank fit; a large one is formed again after GPTQ
        # rather than held beside GPTQ's buffer
        keep = None if rank == 0 or kp * kp * 4 > KEEP_GRAM_BYTES else gram.astype(np.float32)
        codes = gptq_codes(cols, gram, scale, block=opts.block, damp=opts.damp, act_order=opts.act_order,
                           overwrite_hessian=True)
        gram = cols = None  # (the buffer held GPTQ's factor; the sweep overwrote the working copy)
    else:
        keep = None
        codes = quant_rows(w_t, scale)[0]
    if not report:
        w_t = w_fold = None  # only the held-out error report reads the folded weight again
    codes_t = codes.T.astype(np.float32)
    y_q = fitted_apart(lambda v: v @ codes_t, a_all, fit)
    del codes_t
    # integers: any product order gives these; a large linear's are formed again when needed (rows_again)
    acc = None if keep_acc is None or dt == np.float32 else y_q[:, keep_acc].copy()
    y_q *= scale
    lora = None
    if rank > 0:
        if gram is None:
            gram = gram_matrix(a, dt) if keep is None else keep.astype(dt)
        keep = None
        # the cross term aᵀ·(y − y_q) [Kp, N], formed as its transpose (a Fortran-ordered [Kp, N]: the solve's
        # layout); both go once solved, before the eigen-decomposition
        if via_x and dt == np.float64:  # (y − y_q)ᵀ·a = W·(xᵀ·a) − diag(scale)·codes·(aᵀa), small products in float64
            cross = (w.astype(np.float64) @ (x[:fit].T @ a).astype(np.float64)
                     - scale.astype(np.float64)[:, None] * (codes.astype(np.float64) @ gram)).T
        elif via_x:  # the same in blocks of output rows into a float32 [N, Kp] (a 7B q/k/v or gate/up)
            xa, g64 = (x[:fit].T @ a).astype(np.float64), gram.astype(np.float64)
            cross_t = np.empty((n, kp), np.float32)
            rows = max(1, LARGE_BYTES // 8 // max(k, kp))
            for r0 in range(0, n, rows):
                r1 = min(r0 + rows, n)
                cross_t[r0:r1] = (w[r0:r1].astype(np.float64) @ xa
                                  - scale[r0:r1, None].astype(np.float64) * (codes[r0:r1].astype(np.float64) @ g64))
            del xa, g64
            cross = cross_t.T
            del cross_t
        else:
            cross = ((y - y_q[:fit]).T @ a).astype(dt, copy=False).T
        if via_x:
            del w
        solved = ridge_solve(gram, cross, opts.damp, overwrite=True)
        del gram, cross
        la, lb = top_directions(*solved, rank)
        del solved
        lora = (la.astype(np.float16).astype(np.float32), lb.astype(np.float16).astype(np.float32))
        y_q += fitted_apart(lambda v: lora_branch(v, *lora), a_all, fit)
    lq = LinearQuant(codes, scale.astype(np.float32), lora, y_q, acc=acc)
    if fit < len(a_all):
        lq.errors = linear_errors(x, a_all, y_all, w_fold, lq, inp, fit)
    return lq


def quantize_down_a8(m: np.ndarray, w: np.ndarray, opts: Options, fit: int) -> tuple[np.ndarray, np.ndarray,
                                                                                      np.ndarray, np.ndarray]:
    """ffn_down under the mixed-precision policy: its fp32 input m [M, K] (the SwiGLU output) smoothed per channel,
    s_j = max|m_j|^α / max|W[:, j]|^(1−α) (the smoothed input m / s carries fewer outliers into the per-token int8
    step; s is folded into the up rows upstream), then int4 weight codes for W·diag(s) on the Hessian of the
    per-token int8 inputs (GPTQ, or RTN). Returns (s, W·diag(s), codes, scale)."""
    a_max = np.abs(m[:fit]).max(axis=0).astype(np.float64)
    w_max = np.abs(w).max(axis=0).astype(np.float64)
    smooth = np.where((a_max > 0) & (w_max > 0),
                      a_max ** opts.down_alpha / np.maximum(w_max, 1e-12) ** (1 - opts.down_alpha), 1.0)
    smooth = np.maximum(smooth, 1e-6 * smooth.max()).astype(np.float32)
    x = m[:fit] / smooth
    w_s = (w * smooth).astype(np.float32)
    amax = np.abs(x).max(axis=1, keepdims=True)
    safe = np.where(amax > 0, amax, 1).astype(np.float32)
    x_hat = round_codes(x * (np.float32(127) / safe), -127, 127) * (amax / np.float32(127))
    gram = x_hat.T.astype(np.float64) @ x_hat.astype(np.float64)
    scale = search_weight_scale(w_s, np.diag(gram)) if opts.clip else np.abs(w_s).max(axis=1) / QMAX
    codes = gptq_codes(w_s, gram, scale, block=opts.block, damp=opts.damp, act_order=opts.act_order) if opts.gptq else quant_rows(w_s, scale)[0]
    return smooth, w_s, codes, scale.astype(np.float32)


def quantize_layer(i: int, h: np.ndarray, fused: dict[str, np.ndarray], config: LlamaConfig, opts: Options,
                   quant: dict[str, Any], rng: np.random.Generator, held_out: int = 0,
                   report: list[dict[str, Any]] | None = None, down_extra: int | None = None
                   ) -> tuple[dict[str, np.ndarray], SimBlock, np.ndarray | None]:
    """One block on its input stream h [B, T, D] → its file tensors, the SimBlock executing them and the block's
    output stream (each linear is fitted on the codes the engine feeds it, so its fitted output is the engine's
    and the block's output needs no second pass; None with the mixed-precision ffn_down). The last `held_out`
    sequences of h are not fitted; each linear's errors on them go to `report`. Each linear's float32 weights
    leave `fused` once quantized, and each calibration output once consumed, so the block holds what its
    remaining linears need (docs/architecture.md, "Memory of a conversion"). `down_extra`: ffn_down's split slots
    (probe_down_slots), instead of its budget's."""
    b, t, d = h.shape
    p = f"blk.{i}."
    hd, h_q, h_kv, f = config.head_dim, config.num_attention_heads, config.num_key_value_heads, config.intermediate_size
    eps = config.rms_norm_eps
    fit = (b - held_out) * t
    rows = sample_rows(fit, t, opts.clip_sample, rng)
    flat = lambda v: v.reshape(b * t, -1)  # noqa: E731

    def record(name: str, lq: LinearQuant) -> LinearQuant:
        if report is not None and lq.errors is not None:
            report.append({"layer": i, "linear": name, **lq.errors})
        return lq

    def split_input_linear(x: np.ndarray, name: str, engine_input: Callable[[InputQuant], np.ndarray],
                           keep_acc: slice | None = None) -> tuple[InputQuant, LinearQuant, np.ndarray]:
        """A linear on a splittable input x (fp): its input steps and slots, then its weights fitted on the int4
        codes the engine will feed it (`engine_input(steps)`, returned too), so that its output is the engine's."""
        stage(f"layer {i}: {name}")
        budget = opts.budget_down if name == "ffn_down" and opts.budget_down is not None else opts.budget
        w = fused.pop(p + name)  # (each linear's float32 weights leave `fused` once quantized)
        extra = down_extra if name == "ffn_down" else None
        inp = quantize_input(x, w, rows, opts, splittable=True, budget=budget, extra=extra)
        a = engine_input(inp)
        fused[p + name] = w
        del w  # handed over as a temporary: quantize_linear then holds the only reference and drops it once used
        lq = quantize_linear(a, x, fused.pop(p + name), inp, opts, fit, keep_acc, opts.rank_for(name))
        return inp, record(name, lq), a

    def norm_codes(h: np.ndarray, r: np.ndarray, g: np.ndarray) -> Callable[[InputQuant], np.ndarray]:
        """The engine's codes of a norm's output: its weight γ/Δ (`in_scale`) applied, then the slots."""
        return lambda inp: expand_slots(flat(h * r * (g / inp.step).astype(np.float32)), inp.in_map)

    def rows_again(lq: LinearQuant, a: np.ndarray, cols: slice) -> np.ndarray:
        """The output columns `cols` of a linear as the engine computes them after a fold (static_path), from the
        integer accumulators kept for them."""
        y = (lq.acc if lq.acc is not None else a @ lq.codes[cols].astype(np.float32).T) * lq.scale[cols]
        if lq.lora is not None:
            y += lora_branch(a, lq.lora[0], lq.lora[1][cols])
        return y

    # attention: q/k/v input (norm output), Δ folded into the norm weight
    g1 = fused[p + "attn_norm.weight"]
    r1 = rms_factor(h, eps)
    x1 = flat(h * r1 * g1)
    v_rows = slice((h_q + h_kv) * hd, None)
    in_qkv, qkv, a1 = split_input_linear(x1, "attn_qkv", norm_codes(h, r1, g1), keep_acc=v_rows)
    del x1
    q, k, v = split_qkv(qkv.y.reshape(b, t, -1), config)
    cos_sin = rope_cos_sin(config, np.arange(t))
    stage(f"layer {i}: attention")
    o = flat(attend(q, k, v, config, *cos_sin))

    # o_proj input: one step per (kv head, dim) since v rows carry it (query heads of a group share v)
    tie = lambda c: tie_kv_groups(c, config)  # noqa: E731
    stage(f"layer {i}: attn_output")
    w_o = fused.pop(p + "attn_output")
    step_o = quantize_input(o, w_o, rows, opts, splittable=False, tie=tie).step
    qkv.fold_rows(v_rows, v_row_steps(step_o, config))
    # the engine's attention on the folded v rows emits the o_proj codes
    v_eng = rows_again(qkv, a1, v_rows).reshape(b, t, -1)
    del a1
    qkv.acc = None
    stage(f"layer {i}: attention")
    a_o = pad_columns(round_codes(flat(attend(q, k, v_eng, config, *cos_sin))), pad_k(o.shape[1]))
    del q, k, v, v_eng
    qkv.y = None  # (consumed: q, k, v were its views)
    stage(f"layer {i}: attn_output")
    out = record("attn_output", quantize_linear(a_o, o, w_o, step_o, opts, fit, rank=opts.rank_for("attn_output")))
    h_mid = h + out.y.reshape(b, t, d)
    out.y = None
    del a_o, o, w_o

    # MLP: gate/up input (norm output), then the SwiGLU output feeding down_proj
    g2 = fused[p + "ffn_norm.weight"]
    r2 = rms_factor(h_mid, eps)
    x2 = flat(h_mid * r2 * g2)
    in_gu, gate_up, a2 = split_input_linear(x2, "ffn_gate_up", norm_codes(h_mid, r2, g2),
                                            keep_acc=None if opts.down_a8 else slice(f, None))
    del x2
    m = swiglu(gate_up.y[:, :f], gate_up.y[:, f:])
    a_gu = [a2]  # gate/up's input codes: read once more by down_codes (the up rows after the fold), then gone
    del a2
    h_next = None
    if opts.down_a8:
        a_gu.clear()
        smooth, w_down, codes, scale = quantize_down_a8(m, fused.pop(p + "ffn_down"), opts, fit)
        gate_up.fold_rows(slice(f, None), smooth)
        down_tensors = pack_linear(p + "ffn_down", w_down, "w4a8", quant, codes=codes, scale=scale)
    else:
        # the gate half alone is read again (the up half is formed again from the accumulators after the fold):
        # gate/up's [M, 2F] output goes now, before ffn_down's range search
        gate = [np.ascontiguousarray(gate_up.y[:, :f])]
        gate_up.y = None

        def down_codes(inp: InputQuant) -> np.ndarray:  # the engine's SwiGLU on the folded up rows
            gate_up.fold_rows(slice(f, None), inp.step)
            m_eng = swiglu(gate.pop(), rows_again(gate_up, a_gu.pop(), slice(f, None)))
            gate_up.acc = None
            return expand_slots(m_eng, inp.in_map)

        in_down, down, _ = split_input_linear(m, "ffn_down", down_codes)
        down_tensors = down.tensors(p + "ffn_down", quant) | {p + "ffn_down.in_map": in_down.in_map}
        h_next = h_mid + down.y.reshape(b, t, d)
    del m

    tensors = {p + "attn_norm.weight": g1.astype(np.float32), p + "ffn_norm.weight": g2.astype(np.float32)}
    tensors |= qkv.tensors(p + "attn_qkv", quant) | out.tensors(p + "attn_output", quant)
    tensors |= gate_up.tensors(p + "ffn_gate_up", quant) | down_tensors
    tensors |= {p + "attn_qkv.in_scale": (g1 / in_qkv.step).astype(np.float32),
                p + "attn_qkv.in_map": in_qkv.in_map,
                p + "ffn_gate_up.in_scale": (g2 / in_gu.step).astype(np.float32),
                p + "ffn_gate_up.in_map": in_gu.in_map}
    return tensors, load_block(config, tensors.get, quant["linears"], i), h_next


def probe_down_slots(ck: Checkpoint, ids: np.ndarray, opts: Options) -> list[int]:
    """Each layer's ffn_down split slots under one budget: the total of opts.budget_down in every layer, shared in
    units of K_ALIGN slots (split.allocate_layers) by the uniform-noise model of allocate_parts, on the float
    model's SwiGLU outputs for the token windows `ids` [B, T] (absmax ranges): a layer's slot gains weighed
    by 1 / the median token energy of the residual stream after its block (alloc_norm "stream") or as they are
    ("abs"). The probe runs the float checkpoint, not the quantized stream: the shares are decided before the
    first layer is quantized. A layer's share stays within what keeps its ffn_down on the float64 path
    (opts.f64_limit, the memory of a conversion: docs/architecture.md); where the even share is already past it (a
    7B), every layer keeps the even share and no probe runs."""
    cfg = ck.config
    b, t = ids.shape
    d, f, eps = cfg.hidden_size, cfg.intermediate_size, cfg.rms_norm_eps
    layers = cfg.num_hidden_layers
    free = pad_k(f) - f
    per_layer = extra_slots(f, opts.budget if opts.budget_down is None else opts.budget_down)
    units = layers * (per_layer - free) // K_ALIGN
    even = (per_layer - free) // K_ALIGN
    cap = units if opts.alloc_cap is None else int(opts.alloc_cap * even)
    kp = pad_k(f) + K_ALIGN * cap  # the largest Kp the cap allows, lowered to the float64 path's
    while kp > pad_k(f) and max(kp, d) * kp * 8 > opts.f64_limit:
        kp -= K_ALIGN
    cap = max(even, min(cap, (kp - pad_k(f)) // K_ALIGN))
    if cap == even:  # no layer may take more than the even share: the budget's slots everywhere
        return [per_layer] * layers
    cos_sin = rope_cos_sin(cfg, np.arange(t))
    flat = lambda v: v.reshape(b * t, -1)  # noqa: E731
    h = ck.get("model.embed_tokens.weight")[ids].astype(np.float16).astype(np.float32)
    gains = []
    for i in range(layers):
        stage(f"slot probe: layer {i}")
        fw, p = fused_layer(ck, i), f"blk.{i}."
        q, k, v = split_qkv((flat(h * rms_factor(h, eps) * fw[p + "attn_norm.weight"]) @ fw[p + "attn_qkv"].T)
                            .reshape(b, t, -1), cfg)
        h = h + (flat(attend(q, k, v, cfg, *cos_sin)) @ fw[p + "attn_output"].T).reshape(b, t, d)
        y = flat(h * rms_factor(h, eps) * fw[p + "ffn_norm.weight"]) @ fw[p + "ffn_gate_up"].T
        m = swiglu(y[:, :f], y[:, f:])
        w = fw[p + "ffn_down"]
        h = h + (m @ w.T).reshape(b, t, d)
        weight = 1.0
        if opts.alloc_norm == "stream":
            weight = 1.0 / max(float(np.median(np.sum(flat(h).astype(np.float64) ** 2, axis=1))), 1e-30)
        gains.append(greedy_slots(np.abs(m).max(axis=0), np.sum(w * w, axis=0), free + units * K_ALIGN)[1] * weight)
        del fw, q, k, v, y, m, w
    return allocate_layers(gains, free, units, K_ALIGN, cap)


def w4a4_static(ck: Checkpoint, quant: dict[str, Any], opts: Options, calib: CalibrationSpec,
                report: str | Path | None = None, report_n: int = 4) -> Iterator[dict[str, np.ndarray]]:
    """The static W4A4 blocks. With `report` (a path), `report_n` further windows (drawn with seed + 1, so
    apart from chance overlaps they are not calibration text) run through the same quantized stream
    unfitted, and every linear's held-out errors (`linear_errors`) are written there as JSON."""
    quant["params"] = {"options": asdict(opts), "calibration": asdict(calib)}
    rng = np.random.default_rng(calib.seed)
    rows: list[dict[str, Any]] = []
    held_out = report_n if report is not None else 0

    def blocks() -> Iterator[dict[str, np.ndarray]]:
        stage("calibration text")
        ids = calibration_tokens(calib, ck)
        down_slots = None
        if opts.alloc_down and opts.split and not opts.down_a8:
            down_slots = probe_down_slots(ck, ids[:opts.alloc_probe], opts)
            quant["params"]["down_slots"] = down_slots
        if report is not None:
            ids = np.concatenate([ids, calibration_tokens(replace(calib, n=report_n, seed=calib.seed + 1), ck)])
        yield from run_sequential(ck, ids, lambda i, h, fused: quantize_layer(
            i, h, fused, ck.config, opts, quant, rng, held_out, rows if report is not None else None,
            None if down_slots is None else down_slots[i]))
        if report is not None:
            Path(report).write_text(json.dumps({"options": asdict(opts), "calibration": asdict(calib),
                                                "held_out": report_n, "linears": rows}, indent=1) + "\n")
    return blocks()


def mergequant(ck: Checkpoint, scheme: str | None = None, quant: dict[str, Any] | None = None, *,
               no_clip: bool = False, no_split: bool = False, rank: int = Options.rank, gptq: bool = Options.gptq,
               gptq_target: str = Options.gptq_target, act_order: bool = Options.act_order,
               ridge: float = Options.ridge, budget: float = Options.budget, budget_down: float | None = Options.budget_down,
               down_a8: bool = Options.down_a8, down_alpha: float = Options.down_alpha,
               rank_down: int | None = Options.rank_down, rank_o: int | None = Options.rank_o,
               damp: float = Options.damp, block: int = Options.block,
               clip_scales: tuple[float, ...] | str = Options.clip_scales,
               clip_sample: int = Options.clip_sample, clip_power: float = Options.clip_power,
               alloc_down: bool = Options.alloc_down, alloc_norm: str = Options.alloc_norm,
               alloc_probe: int = Options.alloc_probe, alloc_cap: float | None = Options.alloc_cap,
               clip_refine: int = Options.clip_refine, calib: str = "wikitext2+c4", calib_n: int = CalibrationSpec.n, calib_len: int = CalibrationSpec.length,
               seed: int = 0, tokenizer: str | None = None, report: str | None = None,
               report_n: int = 4) -> Iterator[dict[str, np.ndarray]]:
    """The `mergequant` method (`report`: write the per-linear error report there, see w4a4_static); switches: no_clip, no_split, rank=0 (no low-rank branch), gptq=False (RTN
    weights), gptq_target ("w" | "ls" | "ridge" with weight `ridge`), act_order (GPTQ column order); rank_down /
    rank_o (ffn_down's / attn_output's own low-rank rank), damp and block (GPTQ), clip_scales (global factors tried
    on the chosen activation ranges; a tuple or a comma-separated string, as `--opt clip_scales=0.9,1.1` gives),
    clip_sample (tokens the range searches see) and clip_power (the first per-channel objective's exponent);
    alloc_down (ffn_down's split slots shared by the layers under the same total, probe_down_slots) with alloc_norm
    ("stream" | "abs"), alloc_probe (the probe's calibration sequences) and alloc_cap (one layer's most, a multiple
    of the even share); clip_refine (sweeps of the split
    inputs' per-channel range refinement against the linear's output error)."""
    check_scheme("mergequant", "w4a4", scheme)
    if gptq_target not in ("w", "ls", "ridge"):
        raise ValueError(f"mergequant: gptq_target must be 'w', 'ls' or 'ridge', got {gptq_target!r}")
    if alloc_norm not in ("stream", "abs"):
        raise ValueError(f"mergequant: alloc_norm must be 'stream' or 'abs', got {alloc_norm!r}")
    if isinstance(clip_scales, str):
        clip_scales = tuple(float(v) for v in clip_scales.split(",") if v)
    elif isinstance(clip_scales, (int, float)):
        clip_scales = (float(clip_scales),)
    opts = Options(clip=not no_clip, split=not no_split, budget=budget, budget_down=budget_down, down_a8=down_a8,
                   down_alpha=down_alpha, rank=rank, rank_down=rank_down, rank_o=rank_o, gptq=gptq,
                   gptq_target=gptq_target, act_order=act_order, ridge=ridge, damp=damp, block=block,
                   clip_scales=tuple(clip_scales), clip_sample=clip_sample, clip_power=clip_power,
                   alloc_down=alloc_down, alloc_norm=alloc_norm, alloc_probe=alloc_probe, alloc_cap=alloc_cap,
                   clip_refine=clip_refine)
    return w4a4_static(ck, {} if quant is None else quant, opts,
                       CalibrationSpec(calib, calib_n, calib_len, seed, tokenizer), report, report_n)


def rtn_w4a4_static(ck: Checkpoint, scheme: str | None = None, quant: dict[str, Any] | None = None, *,
                    calib: str = "wikitext2+c4", calib_n: int = CalibrationSpec.n,
                    calib_len: int = CalibrationSpec.length, seed: int = 0, tokenizer: str | None = None
                    ) -> Iterator[dict[str, np.ndarray]]:
    """Plain static W4A4: calibrated absmax steps migrated (QSM), RTN weights; the floor MergeQuant lifts."""
    check_scheme("rtn-w4a4-static", "w4a4", scheme)
    opts = Options(clip=False, split=False, rank=0, gptq=False)
    return w4a4_static(ck, {} if quant is None else quant, opts,
                       CalibrationSpec(calib, calib_n, calib_len, seed, tokenizer))
