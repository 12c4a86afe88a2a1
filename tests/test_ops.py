"""Op parity, layer by layer. Every CPU op of engine/src/mq-backend.h (through _engine.CpuOps, python/src/bind_ops.cpp)
against the simulator (converter/quant/simulate.py) and the numpy reference (converter/reference.py) on random
inputs: integer outputs (int4 codes, int32 GEMM sums, KV-cache bits) identical, floats within the bounds stated
per test (docs/numerics.md: the float64 sums round once to fp32; fp32 dot products differ in summation order).
The same checks run again in a subprocess for each lower instruction set the CPU has (MERGEQUANT_CPU=avx2,
scalar), so every kernel path is covered. Then the CUDA op-parity program (engine/backends/cuda/test-cuda-ops.cpp:
each CUDA op against the CPU's), where a GPU and that binary are present; skipped with the reason otherwise."""
from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest

from mergequant import _engine
from mergequant.convert.quant.int4 import pack_int4, round_codes, unpack_int4
from mergequant.convert.schemes import get_scheme
from mergequant.convert.quant.simulate import KVInt8, SimLinear, causal_attention, expand_slots, rms_factor, swiglu
from mergequant.convert.reference import rope, rope_cos_sin

ROOT = Path(__file__).resolve().parent.parent
# float ops whose only difference from the simulator is an fp32 summation order (f16, w4a16g GEMMs): relative
# to the row's magnitude
FP32_SUM_TOL = 2e-6
# float ops computed in float64 and rounded once (norm factor, SwiGLU, RoPE angles, attention): the fp32 result
# may differ by an ulp where a libm differs in the last float64 bit
ONE_ROUNDING_TOL = 3e-7


@pytest.fixture(scope="module")
def ops():
    return _engine.CpuOps(2)


@pytest.fixture
def rng():
    return np.random.default_rng(0)


def in_map_for(rng, k: int, kp: int) -> np.ndarray:
    """A w4a4 input map [kp, 3]: every channel once (parts 1), a few split in 2 or 3 slots, padding -1."""
    rows = [(j, 0, 1) for j in range(k)]
    for j in rng.choice(k, size=min(4, kp - k), replace=False):
        parts = int(rng.integers(2, 4))
        rows[j] = (int(j), 0, parts)
        rows += [(int(j), p, parts) for p in range(1, parts)]
        if len(rows) >= kp - 2:
            break
    rows = rows[:kp] + [(-1, 0, 1)] * (kp - len(rows))
    return np.asarray(rows, np.int32)


def close(a: np.ndarray, b: np.ndarray, tol: float) -> None:
    scale = np.maximum(np.abs(b).max(axis=-1, keepdims=True), 1e-30)
    err = float((np.abs(a - b) / scale).max())
    assert err <= tol, f"max error {err:.3g} relative to the row's magnitude, bound {tol:.3g}"


def test_isa_is_the_forced_one():
    forced = os.environ.get("MERGEQUANT_CPU")
    assert _engine.cpu_isa() in ("avx512", "avx2", "scalar")
    if forced:
        assert _engine.cpu_isa() == forced


def test_embed(ops, rng):
    table = rng.standard_normal((50, 72)).astype(np.float16)
    ids = np.array([3, 0, 49, 3], np.int32)
    out = np.empty((4, 72), np.float32)
    ops.embed(table.view(np.uint16), ids, out)
    np.testing.assert_array_equal(out, table[ids].astype(np.float32))


def test_rmsnorm(ops, rng):
    x = (rng.standard_normal((5, 96)) * 3).astype(np.float32)
    w = (1 + 0.1 * rng.standard_normal(96)).astype(np.float32)
    out = np.empty_like(x)
    ops.rmsnorm(x, w, 1e-5, out)
    close(out, (x * rms_factor(x, 1e-5)) * w, ONE_ROUNDING_TOL)


def test_rmsnorm_quant_codes_identical(ops, rng):
    m, k, kp = 6, 96, 128
    x = (rng.standard_normal((m, k)) * 2).astype(np.float32)
    in_scale = (rng.uniform(1, 6, k)).astype(np.float32)
    in_map = in_map_for(rng, k, kp)
    out = np.empty((m, kp), np.int8)
    ops.rmsnorm_quant(x, {"in_scale": in_scale, "in_map": in_map, **w4a4_tensors(rng, 8, kp)}, 8, 1e-5, out)
    z = (x * rms_factor(x, 1e-5)) * in_scale
    np.testing.assert_array_equal(out, expand_slots(z, in_map).astype(np.int8))


def test_quantize_codes_identical(ops, rng):
    x = (rng.standard_normal((4, 100)) * 5).astype(np.float32)
    x[0, :8] = [0.5, 1.5, 2.5, -0.5, -7.5, 7.5, 100, -100]  # ties to even and the clamp
    out = np.empty((4, 128), np.int8)
    ops.quantize_codes(x, 128, out)
    want = np.zeros((4, 128), np.int8)
    want[:, :100] = round_codes(x)
    np.testing.assert_array_equal(out, want)


@pytest.mark.parametrize("m, n_ff", [(1, 80), (3, 80), (37, 83)])
def test_swiglu(ops, rng, m, n_ff):
    """Rows split across the threads; n_ff = 83 ends each row with channels past the last block of 8."""
    gu = (rng.standard_normal((m, 2 * n_ff)) * 4).astype(np.float32)
    gu[0, :4] = [-120.0, 90.0, 0.0, -0.0]  # exp far below and above 1, and both zeros
    out = np.empty((m, n_ff), np.float32)
    ops.swiglu(gu, out)
    close(out, swiglu(gu[:, :n_ff], gu[:, n_ff:]), ONE_ROUNDING_TOL)


def test_swiglu_quant_codes_identical(ops, rng):
    n_ff, kp = 100, 128
    gu = (rng.standard_normal((4, 2 * n_ff)) * 3).astype(np.float32)
    in_map = in_map_for(rng, n_ff, kp)
    out = np.empty((4, kp), np.int8)
    ops.swiglu_quant(gu, {"in_map": in_map, **w4a4_tensors(rng, 8, kp)}, 8, out)
    np.testing.assert_array_equal(out, expand_slots(swiglu(gu[:, :n_ff], gu[:, n_ff:]), in_map).astype(np.int8))


@pytest.mark.parametrize("m,n_ff,rank", [(1, 48, 0), (7, 48, 8), (26, 64, 16), (13, 40, 0)])
def test_linear_codes_swiglu_quant_codes_identical(ops, rng, m, n_ff, rank):
    """gate/up's GEMM with SwiGLU and the down_proj's quantization fused (m ≥ 4, n_ff a multiple of 16 on
    AVX-512), else the two ops: the codes of the simulator's linear, swiglu and slot expansion."""
    k, kp, kp_down = 120, 192, 128
    gate_up = w4a4_tensors(rng, 2 * n_ff, kp, rank)
    gate_up["scale"] *= 0.1  # SwiGLU values of a few steps, so that the codes are not all clamped
    a = rng.integers(-8, 8, (m, kp)).astype(np.int8)
    in_map = in_map_for(rng, n_ff, kp_down)
    down = {"in_map": in_map, **w4a4_tensors(rng, 8, kp_down)}
    out = np.empty((m, kp_down), np.int8)
    ops.linear_codes_swiglu_quant(gate_up, k, a, down, 8, out)
    y = sim("w4a4", gate_up)(a.astype(np.float32))
    want = expand_slots(swiglu(y[:, :n_ff], y[:, n_ff:]), in_map).astype(np.int8)
    assert len(np.unique(want)) > 8
    np.testing.assert_array_equal(out, want)


@pytest.mark.parametrize("scaling", [None, {"factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
                                           "original_max_position_embeddings": 64}])
def test_rope(ops, rng, scaling):
    h, hkv, hd, t = 4, 2, 32, 7
    stride = (h + 2 * hkv) * hd
    qkv = rng.standard_normal((t, stride)).astype(np.float32)
    pos = np.array([0, 1, 2, 50, 51, 1000, 4095], np.int32)
    cfg = SimpleNamespace(head_dim=hd, rope_theta=10000.0, rope_scaling=scaling)
    cos, sin = rope_cos_sin(cfg, pos)
    want = qkv.copy()
    qk = want[:, :(h + hkv) * hd].reshape(t, h + hkv, hd)
    want[:, :(h + hkv) * hd] = rope(qk, cos, sin).reshape(t, -1)
    got = qkv.copy()
    s = scaling or {}
    ops.rope(got, h, hkv, hd, pos, 10000.0, s.get("factor", 0.0), s.get("low_freq_factor", 0.0),
             s.get("high_freq_factor", 0.0), s.get("original_max_position_embeddings", 0))
    np.testing.assert_array_equal(got[:, (h + hkv) * hd:], qkv[:, (h + hkv) * hd:])  # v untouched
    close(got, want, ONE_ROUNDING_TOL)


# head shapes (n_head, n_head_kv, head_dim): the AVX-512 kernel's passes of 1-3 heads with hd = 32, 64, 128
# (4 heads a group: a pass of 3 and one of 1), and hd = 48, which takes the per-head loop
@pytest.mark.parametrize("shape", [(4, 2, 32), (9, 3, 64), (8, 2, 64), (2, 2, 128), (3, 1, 48)])
@pytest.mark.parametrize("kv", ["fp16", "int8"])
def test_kv_store_and_attention(ops, rng, kv, shape):
    (h, hkv, hd), t, n_ctx = shape, 21, 32
    q_dim, kv_dim = h * hd, hkv * hd
    qkv = rng.standard_normal((t, q_dim + 2 * kv_dim)).astype(np.float32)
    pos = np.arange(t, dtype=np.int32)
    k, v = qkv[:, q_dim:q_dim + kv_dim], qkv[:, q_dim + kv_dim:]
    if kv == "int8":
        steps = KVInt8(rng.uniform(0.01, 0.03, kv_dim).astype(np.float32),
                       rng.uniform(0.01, 0.03, kv_dim).astype(np.float32))
        kc, vc = np.zeros((n_ctx, kv_dim), np.int8), np.zeros((n_ctx, kv_dim), np.int8)
        scales = {"k_scale": steps.k_scale, "v_scale": steps.v_scale}
    else:
        kc, vc = np.zeros((n_ctx, kv_dim), np.uint16), np.zeros((n_ctx, kv_dim), np.uint16)
        scales = {}
    ops.kv_store(qkv, h, hkv, hd, pos, kc, vc, **scales)
    if kv == "int8":
        want_k = KVInt8.codes(k.reshape(t, hkv, hd), steps.k_scale).reshape(t, kv_dim).astype(np.int8)
        want_v = KVInt8.codes(v.reshape(t, hkv, hd), steps.v_scale).reshape(t, kv_dim).astype(np.int8)
        keys, values = steps.keys(k.reshape(t, hkv, hd)), steps.values(v.reshape(t, hkv, hd))
    else:
        want_k, want_v = k.astype(np.float16).view(np.uint16), v.astype(np.float16).view(np.uint16)
        keys = k.astype(np.float16).astype(np.float32).reshape(t, hkv, hd)
        values = v.astype(np.float16).astype(np.float32).reshape(t, hkv, hd)
    np.testing.assert_array_equal(kc[:t], want_k)
    np.testing.assert_array_equal(vc[:t], want_v)
    assert not kc[t:].any() and not vc[t:].any()
    out = np.empty((t, q_dim), np.float32)
    ops.attention(qkv, h, hkv, hd, pos, kc, vc, out, **scales)
    q = qkv[:, :q_dim].astype(np.float16).astype(np.float32).reshape(t, h, hd)
    close(out, causal_attention(q, keys, values), ONE_ROUNDING_TOL)


def w4a4_tensors(rng, n: int, kp: int, rank: int = 0) -> dict[str, np.ndarray]:
    t = {"qweight": pack_int4(rng.integers(-8, 8, (n, kp))), "scale": rng.uniform(0.01, 0.1, n).astype(np.float32)}
    if rank:
        t["lora_a"] = (rng.standard_normal((rank, kp)) * 0.05).astype(np.float16)
        t["lora_b"] = (rng.standard_normal((n, rank)) * 0.05).astype(np.float16)
    return t


def sim(scheme: str, tensors: dict[str, np.ndarray]) -> SimLinear:
    """The simulator's path for one linear of `scheme` (its entry in the converter's scheme table)."""
    return get_scheme(scheme).simulate(lambda name: tensors.get(name))


@pytest.mark.parametrize("m", [1, 3, 8])
def test_linear_f16(ops, rng, m):
    n, k = 40, 96
    w = rng.standard_normal((n, k)).astype(np.float16)
    x = rng.standard_normal((m, k)).astype(np.float32)
    out = np.full((m, n), 0.5, np.float32)
    ops.linear("f16", {"weight": w}, n, x, out, accumulate=True)
    close(out, 0.5 + sim("f16", {"weight": w})(x), FP32_SUM_TOL)
    # the contract itself (docs/numerics.md): the input rounded to fp16, then an exact sum of exact products
    want = x.astype(np.float16).astype(np.float64) @ w.astype(np.float64).T
    close(out - 0.5, want.astype(np.float32), FP32_SUM_TOL)
    unrounded = x.astype(np.float64) @ w.astype(np.float64).T
    assert np.abs(out - 0.5 - unrounded).max() > 10 * FP32_SUM_TOL * np.abs(unrounded).max()


@pytest.mark.parametrize("n, k", [(70, 576), (36, 1600), (20, 16)])
def test_linear_f16_blocked_gemm(ops, rng, n, k):
    """The prefill GEMM (panels of rows x blocks of 4 tokens, with row and token tails) against the simulator;
    on AVX-512 every token's output equals its own m = 1 GEMV bit for bit (one summation order for all m)."""
    m = 23
    w = (rng.standard_normal((n, k)) * 0.1).astype(np.float16)
    x = rng.standard_normal((m, k)).astype(np.float32)
    out = np.full((m, n), 0.25, np.float32)
    ops.linear("f16", {"weight": w}, n, x, out, accumulate=True)
    close(out, 0.25 + sim("f16", {"weight": w})(x), FP32_SUM_TOL)
    fresh = np.empty((m, n), np.float32)
    ops.linear("f16", {"weight": w}, n, x, fresh, accumulate=False)
    close(fresh, sim("f16", {"weight": w})(x), FP32_SUM_TOL)
    if _engine.cpu_isa() == "avx512":
        rows = np.empty((m, n), np.float32)
        for t in range(m):
            ops.linear("f16", {"weight": w}, n, x[t:t + 1], rows[t:t + 1], accumulate=False)
        np.testing.assert_array_equal(fresh, rows)


@pytest.mark.parametrize("group", [32, 64])
def test_linear_w4a16g(ops, rng, group):
    n, k, m = 40, 128, 5
    t = {"qweight": pack_int4(rng.integers(-8, 8, (n, k))),
         "scale": rng.uniform(0.01, 0.1, (n, k // group)).astype(np.float16)}
    x = rng.standard_normal((m, k)).astype(np.float32)
    out = np.empty((m, n), np.float32)
    ops.linear("w4a16g", t, n, x, out)
    close(out, sim("w4a16g", t)(x), FP32_SUM_TOL)
    # the contract itself: w = q · scale, the input rounded to fp16
    w = unpack_int4(t["qweight"]).astype(np.float64) * np.repeat(t["scale"].astype(np.float64), group, axis=1)
    close(out, (x.astype(np.float16).astype(np.float64) @ w.T).astype(np.float32), FP32_SUM_TOL)


@pytest.mark.parametrize("m", [1, 4])
def test_linear_w4a4d(ops, rng, m):
    n, k, kp = 40, 100, 128
    t = w4a4_tensors(rng, n, kp)
    x = rng.standard_normal((m, k)).astype(np.float32)
    x[-1] = 0.0  # a zero row: amax 0, codes 0
    out = np.empty((m, n), np.float32)
    ops.linear("w4a4d", t, n, x, out)
    record: dict[str, np.ndarray] = {}
    want = sim("w4a4d", t)(x, record, "l")
    # integer sums exact; (acc · scale) · step are the same two fp32 multiplies
    np.testing.assert_array_equal(out, want.astype(np.float32))
    acc = np.empty((m, n), np.int32)
    ops.int_gemm("w4a4d", t, n, k, record["l.in"], acc)
    np.testing.assert_array_equal(acc, record["l"])


@pytest.mark.parametrize("rank", [0, 8, 21])
# single tokens and the row kernels (m < 4); the blocked GEMM's 12-token tiles and their tails, units of 32 columns
# with a last unit of 16 (n = 48) or of 8 live columns (n = 40)
@pytest.mark.parametrize("m,n", [(1, 48), (3, 40), (5, 48), (11, 48), (29, 40), (40, 72)])
def test_linear_codes_w4a4(ops, rng, m, n, rank):
    k, kp = 120, 192
    t = w4a4_tensors(rng, n, kp, rank)
    a = rng.integers(-8, 8, (m, kp)).astype(np.int8)
    acc = np.empty((m, n), np.int32)
    ops.int_gemm("w4a4", t, n, k, a, acc)
    s = sim("w4a4", t)
    want_acc = s.int_gemm(a.astype(np.float32), None, "")
    np.testing.assert_array_equal(acc, want_acc.astype(np.int32))
    out = np.empty((m, n), np.float32)
    ops.linear_codes("w4a4", t, n, k, a, out)
    # float(acc) · scale, plus the low-rank branch rounded once from float64: the same fp32 values
    np.testing.assert_array_equal(out, s(a.astype(np.float32)))


def int8_case(rng, scheme: str, n: int, k: int, group: int = 0, bits: int = 8, bias: bool = False,
              extreme: bool = False) -> dict[str, np.ndarray]:
    """Random tensors of an int8-input linear (docs/format.md): codes drawn over the whole range (or all at the
    extreme codes, to reach the largest sums), scales, and an optional bias."""
    if scheme in ("w8a8", "w8a8s"):
        qmax = (1 << (bits - 1)) - 1
        q = np.full((n, k), qmax, np.int8) if extreme else rng.integers(-qmax, qmax + 1, (n, k)).astype(np.int8)
        t = {"qweight": q, "bits": np.array([bits], np.int32)}
    else:
        kp = k if scheme == "w4a8g" else -(-k // 64) * 64
        q = np.zeros((n, kp), np.int8)
        q[:, :k] = np.full((n, k), 7) if extreme else rng.integers(-8, 8, (n, k))
        t = {"qweight": pack_int4(q)}
        if scheme == "w4a8g":
            t["gscale"] = (np.full((n, k // group), 16) if extreme else rng.integers(1, 17, (n, k // group))
                           ).astype(np.uint8)
    t["scale"] = rng.uniform(0.001, 0.01, n).astype(np.float32)
    if scheme == "w8a8s":  # static steps over four decades, shifts of either sign; the bias is required
        t["in_scale"] = (10.0 ** rng.uniform(-1, 3, k)).astype(np.float32)
        t["shift"] = rng.uniform(-0.5, 0.5, k).astype(np.float32)
        bias = True
    if bias:
        t["bias"] = rng.standard_normal(n).astype(np.float32)
    return t


def check_int8_linear(ops, scheme: str, t: dict[str, np.ndarray], x: np.ndarray) -> None:
    """The engine's y bit for bit the simulator's (the same integer sums, the same fp32 epilogue), with and without
    accumulating, and its int32 GEMM on the simulator's codes the simulator's acc."""
    m, k = x.shape
    n = t["scale"].shape[0]
    record: dict[str, np.ndarray] = {}
    want = sim(scheme, t)(x, record, "l")
    out = np.empty((m, n), np.float32)
    ops.linear(scheme, t, n, x, out)
    np.testing.assert_array_equal(out, want)
    out = np.full((m, n), 0.25, np.float32)
    ops.linear(scheme, t, n, x, out, accumulate=True)
    np.testing.assert_array_equal(out, np.float32(0.25) + want)
    acc = np.empty((m, n), np.int32)
    ops.int_gemm(scheme, t, n, k, record["l.in"], acc)
    np.testing.assert_array_equal(acc, record["l"])


def int8_input(rng, m: int, k: int) -> np.ndarray:
    x = (rng.standard_normal((m, k)) * rng.uniform(0.1, 10, (m, 1))).astype(np.float32)
    x[-1] = 0.0 if m > 2 else x[-1]  # a zero row: amax 0, codes 0, y = bias
    return x


@pytest.mark.parametrize("bits", [8, 6])
@pytest.mark.parametrize("m, k", [(1, 96), (3, 100), (8, 192), (13, 64)])  # K tails of 32 and 36; token blocks
def test_linear_w8a8(ops, rng, m, k, bits):
    n = 42  # 10 blocks of 4 rows and a tail of 2
    check_int8_linear(ops, "w8a8", int8_case(rng, "w8a8", n, k, bits=bits, bias=m == 3), int8_input(rng, m, k))


@pytest.mark.parametrize("bits", [8, 6])
@pytest.mark.parametrize("m, k", [(1, 96), (3, 100), (8, 192), (13, 64)])
def test_linear_w8a8s(ops, rng, m, k, bits):
    """Static per-channel codes clamp(rint((x - shift) · in_scale)): inputs far beyond the range (clamped codes),
    values near the rounding halves and a zero row (codes of -shift alone) included."""
    n = 42
    t = int8_case(rng, "w8a8s", n, k, bits=bits)
    x = int8_input(rng, m, k)
    x[0, :4] = t["shift"][:4] + np.float32(2.5) / t["in_scale"][:4]  # near the rounding halves
    x[0, 4:8] = 1e6
    check_int8_linear(ops, "w8a8s", t, x)
    record: dict[str, np.ndarray] = {}
    sim("w8a8s", t)(x, record, "l")
    qmax = (1 << (bits - 1)) - 1
    want = np.clip(np.rint((x.astype(np.float32) - t["shift"]) * t["in_scale"]), -qmax, qmax)
    np.testing.assert_array_equal(record["l.in"], want.astype(np.int8))  # the simulator's codes, independently
    assert np.abs(record["l.in"]).max() == qmax


@pytest.mark.parametrize("m, k", [(1, 100), (5, 128), (11, 192)])
def test_linear_w4a8(ops, rng, m, k):
    n = 42
    check_int8_linear(ops, "w4a8", int8_case(rng, "w4a8", n, k, bias=m == 5), int8_input(rng, m, k))


@pytest.mark.parametrize("m, k, group", [(1, 192, 64), (5, 192, 64), (11, 384, 128), (4, 256, 128), (6, 320, 64)])
def test_linear_w4a8g(ops, rng, m, k, group):
    n = 42
    check_int8_linear(ops, "w4a8g", int8_case(rng, "w4a8g", n, k, group=group, bias=m == 5), int8_input(rng, m, k))


@pytest.mark.parametrize("scheme, k, group", [("w8a8", 70016, 0), ("w4a8g", 71680, 128), ("w4a8", 71680, 0)])
def test_int8_linear_largest_sums(ops, rng, scheme, k, group):
    """Codes at their extremes over a long K: the sums with the kernels' offsets (a + 128, q + 8) pass 2^31 before
    the offset comes off, the true acc does not; every path must still give the exact acc."""
    t = int8_case(rng, scheme, 8, k, group=group, extreme=True)
    x = np.ones((2, k), np.float32)
    x[1, ::3] = -1.0
    check_int8_linear(ops, scheme, t, x)


def test_scheme_errors(ops, rng):
    with pytest.raises(RuntimeError, match="unknown scheme 'w3a3'"):
        ops.linear("w3a3", {"weight": np.zeros((4, 8), np.float16)}, 4, np.zeros((1, 8), np.float32),
                   np.empty((1, 4), np.float32))
    t = w4a4_tensors(rng, 8, 64)
    with pytest.raises(RuntimeError, match="takes integer codes"):
        ops.linear("w4a4", t, 8, np.zeros((1, 64), np.float32), np.empty((1, 8), np.float32))


def cpu_flags() -> set[str]:
    try:
        for line in open("/proc/cpuinfo"):
            if line.startswith("flags"):
                return set(line.split(":", 1)[1].split())
    except OSError:
        pass
    return set()


def lower_isas() -> list[str]:
    """The instruction sets below the one this CPU runs by default (each gets the checks above again)."""
    flags = cpu_flags()
    have = ["scalar"]
    if {"avx2", "fma", "f16c"} <= flags:
        have.append("avx2")
    if {"avx512f", "avx512bw", "avx512dq", "avx512vl", "avx512_vnni"} <= flags:
        have.append("avx512")
    best = _engine.cpu_isa()
    return [isa for isa in have if isa != best]


@pytest.mark.skipif(os.environ.get("MERGEQUANT_CPU") is not None, reason="already a forced instruction set")
@pytest.mark.parametrize("isa", ["avx2", "scalar"])
def test_ops_on_a_forced_instruction_set(isa):
    if isa not in lower_isas():
        pytest.skip(f"this CPU has no '{isa}' path below its default '{_engine.cpu_isa()}'")
    env = dict(os.environ, MERGEQUANT_CPU=isa)
    r = subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", __file__,
                        "-k", "not forced and not cuda"], env=env, capture_output=True, text=True, cwd=ROOT)
    assert r.returncode == 0, r.stdout[-4000:] + r.stderr[-2000:]
    assert " passed" in r.stdout and "failed" not in r.stdout


def test_bad_forced_instruction_set():
    env = dict(os.environ, MERGEQUANT_CPU="avx9000")
    r = subprocess.run([sys.executable, "-c", "from mergequant import _engine; _engine.CpuOps(1)"], env=env,
                       capture_output=True, text=True)
    assert r.returncode != 0 and "invalid MERGEQUANT_CPU 'avx9000'" in r.stderr


def cuda_ops_binary() -> Path | None:
    """The built test-cuda-ops: MERGEQUANT_TEST_CUDA_OPS, else the newest under build/ (any build directory)."""
    env = os.environ.get("MERGEQUANT_TEST_CUDA_OPS")
    if env:
        return Path(env)
    found = sorted((ROOT / "build").glob("**/test-cuda-ops"), key=lambda p: p.stat().st_mtime)
    return found[-1] if found else None


def test_cuda_ops_against_cpu():
    if not _engine.cuda_built():
        pytest.skip("this build has no CUDA backend")
    why = _engine.cuda_unavailable_reason()
    if why:
        pytest.skip(why)
    exe = cuda_ops_binary()
    if exe is None or not exe.exists():
        pytest.skip("test-cuda-ops is not built (cmake --build BUILD --target test-cuda-ops, or set "
                    "MERGEQUANT_TEST_CUDA_OPS)")
    r = subprocess.run([str(exe)], capture_output=True, text=True, timeout=1800)
    tail = r.stdout[-6000:]
    assert r.returncode == 0, tail
    assert " passed, 0 failed" in r.stdout, tail


def test_cuda_sources_include_nothing_from_the_cpu_backend():
    """The backends meet only in engine/src: a CUDA source that includes backends/cpu would tie them together."""
    bad = []
    for p in sorted((ROOT / "engine" / "backends" / "cuda").iterdir()):
        for i, line in enumerate(p.read_text().splitlines(), 1):
            if line.lstrip().startswith("#include") and "cpu/" in line:
                bad.append(f"{p.name}:{i}: {line.strip()}")
    assert not bad, bad
