"""The simulator's linear paths, one per scheme (docs/numerics.md): how a linear of each scheme is read from
its packed tensors and how it computes y from its input. converter/schemes.py registers each path beside the
scheme's layout and packer; quant/simulate.py runs blocks of them.

Two kinds of input: `float` (f16, w4a16g, w4a4d, w8a8, w4a8, w4a8g, w8a8s: the linear quantizes its input itself, if
at all) and `codes` (w4a4: the producer upstream emits the int4 input slots, so the linear runs the integer GEMM
on them). Int4 x int4 GEMMs run as fp32 BLAS on the codes: every partial sum is an integer below 2^24, hence
exact; the 8-bit activation schemes' sums can pass 2^24, so they run in float64 (exact below 2^53)."""
from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import numpy as np

from .blas import parallel_for
from .int4 import QMAX, QMIN, pad_columns, round_codes, unpack_int4

TensorGetter = Callable[[str], "np.ndarray | None"]  # suffix → the linear's tensor P.<suffix>, None if absent
Record = "dict[str, np.ndarray] | None"               # int32 accumulators and int4 inputs, by linear name


def fp16_round(x: np.ndarray) -> np.ndarray:
    return x.astype(np.float16).astype(np.float32)


def expand_slots(z: np.ndarray, in_map: np.ndarray) -> np.ndarray:
    """Values z [M, K] in step units → int4 input slots [M, Kp] (fp32 holding integers):
    t = clamp(rint(z_j), -8m, 7m), slot = floor((t + k) / m) for in_map rows (j, k, m); j = -1 gives 0.
    floor of the fp32 quotient is exact: a non-integer (t+k)/m lies ≥ 1/m away from any integer."""
    out = np.zeros((z.shape[0], in_map.shape[0]), np.float32)
    rows = 2048  # elementwise: row blocks in threads give the same values

    def block(i: int) -> None:
        r = slice(i * rows, (i + 1) * rows)
        _expand_slots(z[r], in_map, out[r])

    parallel_for(block, -(-z.shape[0] // rows))
    return out


def _expand_slots(z: np.ndarray, in_map: np.ndarray, out: np.ndarray) -> None:
    src, part, parts = (in_map[:, c] for c in range(3))
    k = z.shape[1]
    if len(src) >= k and np.array_equal(src[:k], np.arange(k)) and not part[:k].any():
        # the converter's layout (split.build_in_map): slot j is part 0 of channel j, computed in place
        m = parts[:k].astype(np.float32)
        t = out[:, :k]
        np.rint(z, out=t)
        np.clip(t, QMIN * m, QMAX * m, out=t)
        t += np.float32(0)  # -0 → +0, as t + k does below
        split = np.flatnonzero(parts[:k] > 1)
        if split.size:
            out[:, split] = np.floor(t[:, split] / m[split])
        rest = np.flatnonzero(src[k:] >= 0) + k
    else:
        rest = np.flatnonzero(src >= 0)
    if rest.size:
        m = parts[rest].astype(np.float32)
        t = round_codes(z[:, src[rest]], QMIN * m, QMAX * m)
        out[:, rest] = np.floor((t + part[rest].astype(np.float32)) / m)


def lora_branch(a: np.ndarray, lora_a: np.ndarray, lora_b: np.ndarray) -> np.ndarray:
    """(a · Aᵀ) · Bᵀ in float64, rounded once to fp32: a · Aᵀ on int4 codes and fp16 values is exact in
    float64, so every summation order gives the same fp32 result."""
    a_t, b_t = lora_a.T.astype(np.float64), lora_b.T.astype(np.float64)
    out = np.empty((a.shape[0], b_t.shape[1]), np.float32)
    rows = 2048  # row blocks (each row's sums are those of the one product), in threads

    def block(i: int) -> None:
        r = slice(i * rows, (i + 1) * rows)
        out[r] = (a[r].astype(np.float64) @ a_t) @ b_t

    parallel_for(block, -(-a.shape[0] // rows))
    return out


@dataclass
class SimLinear:
    """One linear of any scheme. `w` is the fp32 weight (f16, w4a16g dequantized exactly: int × fp16 fits
    fp32) or the int8 codes [N, Kp] (w4a4, w4a4d); `path` is the scheme's linear path below."""
    scheme: str
    inputs: str  # "float" or "codes"
    path: Callable[[SimLinear, np.ndarray, Record, str], np.ndarray]
    w: np.ndarray
    scale: np.ndarray | None = None
    in_scale: np.ndarray | None = None
    in_map: np.ndarray | None = None
    lora_a: np.ndarray | None = None
    lora_b: np.ndarray | None = None
    qmax: int = 0                     # w8a8, w4a8, w4a8g: the activation codes' range [-qmax, qmax]
    bias: np.ndarray | None = None    # w8a8, w4a8, w4a8g: optional fp32 bias [N], added last (w8a8s: required)
    shift: np.ndarray | None = None   # w8a8s: per-channel shift [K] subtracted before the static quantization
    # f16, w4a16g, w8a8: row n of the dequantized weight, fp32 (a tied model's embedding reads the output's rows)
    embed_rows: Callable[[SimLinear, np.ndarray], np.ndarray] | None = None

    @property
    def kp(self) -> int:
        return self.w.shape[1]

    def __call__(self, x: np.ndarray, record: Record = None, name: str = "") -> np.ndarray:
        """y [M, N] for the input x [M, K] (float input) or a [M, Kp] (int4 codes), per `inputs`."""
        return self.path(self, x, record, name)

    def int_gemm_exact(self, a: np.ndarray, record: Record, name: str) -> np.ndarray:
        """acc = a · wᵀ on integer codes in float64 (exact for |acc| < 2^53), returned as fp32 the way an
        engine converts its int32 acc (round to nearest even); recorded as int32 with a under `name`."""
        acc = a.astype(np.float64) @ self.w.astype(np.float64).T
        if record is not None:
            record[name], record[name + ".in"] = acc.astype(np.int32), a.astype(np.int8)
        return acc.astype(np.float32)

    def int_gemm(self, a: np.ndarray, record: Record, name: str) -> np.ndarray:
        """acc = a · qᵀ on int4 codes; fp32 holding exact int32 values (recorded with a under `name`)."""
        acc = a @ self.w.astype(np.float32).T
        if record is not None:
            record[name], record[name + ".in"] = acc.astype(np.int32), a.astype(np.int8)
        return acc


def _f32(get: TensorGetter, suffix: str) -> np.ndarray | None:
    t = get(suffix)
    return None if t is None else np.asarray(t, np.float32)


def dense_rows(lin: SimLinear, ids: np.ndarray) -> np.ndarray:
    """Rows of a dense fp32 weight (f16 widened, w4a16g's q · scale: exact in fp32)."""
    return lin.w[ids]


# f16 and w4a16g: the input rounded to fp16 first, fp32 products and accumulation
def f16_path(lin: SimLinear, x: np.ndarray, record: Record, name: str) -> np.ndarray:
    return x.astype(np.float16).astype(np.float32) @ lin.w.T


def f16_linear(get: TensorGetter) -> SimLinear:
    return SimLinear("f16", "float", f16_path, _f32(get, "weight"), embed_rows=dense_rows)


# w4a16g: w = q · scale[n, k/g] (exact in fp32), then the f16 path (fp16 inputs)
def w4a16g_linear(get: TensorGetter) -> SimLinear:
    codes = unpack_int4(np.asarray(get("qweight")))
    s = _f32(get, "scale")
    g = codes.shape[1] // s.shape[1]
    return SimLinear("w4a16g", "float", f16_path, codes.astype(np.float32) * np.repeat(s, g, axis=1),
                     embed_rows=dense_rows)


# w4a4d: per-token dynamic codes a = clamp(rint(x · 7/absmax)), y = (acc · scale[n]) · absmax/7
def dynamic_path(lin: SimLinear, x: np.ndarray, record: Record, name: str) -> np.ndarray:
    amax = np.abs(x).max(axis=1, keepdims=True)
    safe = np.where(amax > 0, amax, 1).astype(np.float32)
    a = pad_columns(round_codes(x * (np.float32(QMAX) / safe)), lin.kp)
    return (lin.int_gemm(a, record, name) * lin.scale) * (amax / np.float32(QMAX))


def w4a4d_linear(get: TensorGetter) -> SimLinear:
    return SimLinear("w4a4d", "float", dynamic_path, unpack_int4(np.asarray(get("qweight"))), _f32(get, "scale"))


# w4a4: static codes from the producer, y = float(acc) · scale[n] (+ fp32((a · Aᵀ) · Bᵀ), the low-rank branch)
def static_path(lin: SimLinear, a: np.ndarray, record: Record, name: str) -> np.ndarray:
    y = lin.int_gemm(a, record, name) * lin.scale
    if lin.lora_a is not None:
        y += lora_branch(a, lin.lora_a, lin.lora_b)
    return y


def w4a4_linear(get: TensorGetter) -> SimLinear:
    in_map = get("in_map")
    return SimLinear("w4a4", "codes", static_path, unpack_int4(np.asarray(get("qweight"))), _f32(get, "scale"),
                     _f32(get, "in_scale"), None if in_map is None else np.asarray(in_map, np.int64),
                     _f32(get, "lora_a"), _f32(get, "lora_b"))


# w8a8, w4a8, w4a8g: per-token dynamic int8 activations a = clamp(rint(x · (qmax / absmax)), -qmax, qmax),
# y = ((float(acc) · scale[n]) · (absmax / qmax)) (+ bias[n]); acc over the integer weights (int8 codes, int4
# codes, or int4 codes times their integer group scale)
def int8_dynamic_path(lin: SimLinear, x: np.ndarray, record: Record, name: str) -> np.ndarray:
    qmax = np.float32(lin.qmax)
    amax = np.abs(x).max(axis=1, keepdims=True)
    safe = np.where(amax > 0, amax, 1).astype(np.float32)
    a = pad_columns(round_codes(x * (qmax / safe), -lin.qmax, lin.qmax), lin.kp)
    y = (lin.int_gemm_exact(a, record, name) * lin.scale) * (amax / qmax)
    if lin.bias is not None:
        y = y + lin.bias
    return y


def int8_rows(lin: SimLinear, ids: np.ndarray) -> np.ndarray:
    """w8a8 rows dequantized: float(q[n, k]) · scale[n], one fp32 multiply."""
    return lin.w[ids].astype(np.float32) * lin.scale[ids][..., None]


def w8a8_linear(get: TensorGetter) -> SimLinear:
    bits = int(np.asarray(get("bits")).reshape(-1)[0])
    return SimLinear("w8a8", "float", int8_dynamic_path, np.asarray(get("qweight"), np.int8), _f32(get, "scale"),
                     qmax=(1 << (bits - 1)) - 1, bias=_f32(get, "bias"), embed_rows=int8_rows)


def w4a8_linear(get: TensorGetter) -> SimLinear:
    return SimLinear("w4a8", "float", int8_dynamic_path, unpack_int4(np.asarray(get("qweight"))),
                     _f32(get, "scale"), qmax=127, bias=_f32(get, "bias"))


def w4a8g_linear(get: TensorGetter) -> SimLinear:
    """The integer weight is q[n, k] · g[n, k / group] (int4 code times its integer group scale, in [-128, 112])."""
    codes = unpack_int4(np.asarray(get("qweight"))).astype(np.int16)
    g = np.asarray(get("gscale")).astype(np.int16)
    w = codes * np.repeat(g, codes.shape[1] // g.shape[1], axis=1)
    return SimLinear("w4a8g", "float", int8_dynamic_path, w, _f32(get, "scale"), qmax=127, bias=_f32(get, "bias"))


# w8a8s: static per-channel int8 activations a = clamp(rint((x - shift[k]) · in_scale[k]), -qmax, qmax) (one fp32
# subtraction and one fp32 multiply), y = (float(acc) · scale[n]) + bias[n]
def int8_static_path(lin: SimLinear, x: np.ndarray, record: Record, name: str) -> np.ndarray:
    a = round_codes((x - lin.shift) * lin.in_scale, -lin.qmax, lin.qmax)
    return (lin.int_gemm_exact(a, record, name) * lin.scale) + lin.bias


def w8a8s_linear(get: TensorGetter) -> SimLinear:
    bits = int(np.asarray(get("bits")).reshape(-1)[0])
    return SimLinear("w8a8s", "float", int8_static_path, np.asarray(get("qweight"), np.int8), _f32(get, "scale"),
                     in_scale=_f32(get, "in_scale"), qmax=(1 << (bits - 1)) - 1, bias=_f32(get, "bias"),
                     shift=_f32(get, "shift"))
