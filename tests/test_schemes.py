"""The converter's scheme table (converter/schemes.py): every entry's packer, layout, simulator path and
limits agree, and the parity tests it names exist."""
from __future__ import annotations

import ast
from pathlib import Path

import numpy as np
import pytest

from mergequant.convert.quant.int4 import unpack_int4
from mergequant.convert.schemes import SCHEMES, pack_linear

ROOT = Path(__file__).resolve().parents[1]


def dequantized(name: str, packed: dict[str, np.ndarray], k: int) -> np.ndarray:
    """The weight the stored tensors mean (docs/format.md, "Linear schemes"), written out independently."""
    if name == "f16":
        return packed["weight"].astype(np.float64)
    q = unpack_int4(packed["qweight"]).astype(np.float64)[:, :k]
    s = packed["scale"].astype(np.float64)
    if name == "w8a8":
        return packed["qweight"].astype(np.float64) * s[:, None]
    if name == "w8a8s":  # the step-folded weight W̃ = W · diag(1/in_scale), back in input units
        return packed["qweight"].astype(np.float64) * s[:, None] * packed["in_scale"].astype(np.float64)
    if name == "w4a16g":
        return q * np.repeat(s, k // s.shape[1], axis=1)
    if name == "w4a8g":  # int4 code · integer group scale · channel scale
        g = packed["gscale"].astype(np.float64)
        return q * np.repeat(g, k // g.shape[1], axis=1) * s[:, None]
    return q * s[:, None]


@pytest.mark.parametrize("name", list(SCHEMES))
def test_pack_and_simulate_agree(name):
    s = SCHEMES[name]
    rng = np.random.default_rng(0)
    n, k = 24, 192
    w = rng.standard_normal((n, k)).astype(np.float32)
    quant: dict = {}
    params = {}
    if name == "w8a8s":  # static steps and a shift, as a calibrating method gives them
        params = {"in_scale": (2.0 ** rng.integers(-3, 4, k)).astype(np.float32),
                  "shift": rng.uniform(-0.5, 0.5, k).astype(np.float32)}
    out = pack_linear("blk.0.ffn_down", w, name, quant, **params)
    packed = {key.rsplit(".", 1)[1]: v for key, v in out.items()}
    for suffix, (dtype, shape) in s.layout(n, k).items():
        assert packed[suffix].dtype == dtype and packed[suffix].shape == shape
        if s.k_pad > 1 and suffix == "qweight":
            assert shape[1] * 2 % s.k_pad == 0
    w_hat = dequantized(name, packed, k)
    if name == "w8a8s":  # the grid of W̃ per row, 127 levels, in input units
        assert (np.abs(w_hat - w) <= 0.5 * packed["scale"][:, None] * params["in_scale"] * 1.01).all()
    else:
        assert np.abs(w_hat - w).max() <= (1e-3 if name == "f16" else 0.5 * np.abs(w).max() / 7 * 1.01)
    lin = s.simulate(packed.get)
    x = rng.standard_normal((5, k)).astype(np.float32)
    if s.inputs == "codes":  # static codes given directly
        a = np.zeros((5, lin.kp), np.float32)
        a[:, :k] = np.clip(np.rint(x * 3), -8, 7)
        want = a[:, :k].astype(np.float64) @ w_hat.T
        y = lin(a)
    elif name == "w4a4d":
        amax = np.abs(x).max(axis=1, keepdims=True)
        a = np.clip(np.rint(x.astype(np.float64) * 7 / amax), -8, 7)
        want = (a @ w_hat.T) * amax / 7
        y = lin(x)
    elif name in ("w8a8", "w4a8", "w4a8g"):  # per-token dynamic int8 activations
        amax = np.abs(x).max(axis=1, keepdims=True)
        a = np.clip(np.rint(x.astype(np.float64) * 127 / amax), -127, 127)
        want = (a @ w_hat.T) * amax / 127
        y = lin(x)
    elif name == "w8a8s":  # static per-channel codes of x - shift; the bias gives the shift back
        sh, inv = params["shift"].astype(np.float64), params["in_scale"].astype(np.float64)
        a = np.clip(np.rint((x.astype(np.float64) - sh) * inv), -127, 127)
        want = (a / inv) @ w_hat.T + sh @ w_hat.T
        np.testing.assert_allclose(packed["bias"], sh @ w_hat.T, rtol=1e-6, atol=1e-6)
        y = lin(x)
    else:  # f16 and w4a16g round their input to fp16 first
        want = x.astype(np.float16).astype(np.float64) @ w_hat.T
        y = lin(x)
    assert np.abs(y - want).max() <= 1e-4 * np.abs(want).max()
    assert quant["linears"] == {"blk.0.ffn_down": name}


def test_limits_refused_by_name():
    with pytest.raises(ValueError, match=r"'blk.0.attn_qkv'.*w4a16g.*multiple of 64.*K=96"):
        pack_linear("blk.0.attn_qkv", np.ones((4, 96), np.float32), "w4a16g", {})
    assert SCHEMES["w4a16g"].group(192) == 64 and SCHEMES["w4a16g"].group(256) == 128


@pytest.mark.parametrize("name", list(SCHEMES))
def test_parity_tests_exist(name):
    """Each node id names a test file and, where given, a test function in it whose parameters include
    the id's bracketed part."""
    assert SCHEMES[name].parity_tests
    for node in SCHEMES[name].parity_tests:
        path, _, rest = node.partition("::")
        src = (ROOT / path).read_text(encoding="utf-8")
        if not rest:
            continue
        func, _, param = rest.partition("[")
        defs = [d for d in ast.walk(ast.parse(src)) if isinstance(d, ast.FunctionDef) and d.name == func]
        assert defs, f"{node}: no test {func} in {path}"
        if param:  # the parametrize list of the file holds the id as a string
            assert f'"{param[:-1]}"' in src, f"{node}: parameter {param[:-1]!r} not in {path}"


def test_w6a6_and_explicit_codes():
    """w8a8 takes its bit width (W6A6: codes and activations in [-31, 31], recorded in P.bits) and explicit
    codes/scales from a method; w4a8g takes a method's codes on its two-level grid; bias rides along."""
    rng = np.random.default_rng(1)
    w = rng.standard_normal((16, 128)).astype(np.float32)
    out = pack_linear("blk.0.attn_output", w, "w8a8", {}, bits=6)
    assert out["blk.0.attn_output.bits"].tolist() == [6]
    q = out["blk.0.attn_output.qweight"]
    assert q.min() == -31 and q.max() == 31
    lin = SCHEMES["w8a8"].simulate(lambda s: out.get(f"blk.0.attn_output.{s}"))
    record: dict = {}
    lin(rng.standard_normal((3, 128)).astype(np.float32), record, "l")
    assert np.abs(record["l.in"]).max() == 31
    codes = np.clip(np.rint(w * 10), -31, 31).astype(np.int8)
    bias = rng.standard_normal(16).astype(np.float32)
    out = pack_linear("p", w, "w8a8", {}, bits=6, codes=codes, scale=np.full(16, 0.1, np.float32), bias=bias)
    np.testing.assert_array_equal(out["p.qweight"], codes)
    np.testing.assert_array_equal(out["p.bias"], bias)
    with pytest.raises(ValueError, match=r"codes outside \[-31, 31\]"):
        pack_linear("p", w, "w8a8", {}, bits=6, codes=codes * 2, scale=np.ones(16, np.float32))
    with pytest.raises(ValueError, match="need their scale"):
        pack_linear("p", w, "w8a8", {}, codes=codes)
    g = np.full((16, 1), 3, np.uint8)
    c4 = np.clip(np.rint(w * 2), -8, 7).astype(np.int8)
    out = pack_linear("p", w, "w4a8g", {}, codes=c4, gscale=g, scale=np.full(16, 0.5, np.float32))
    np.testing.assert_array_equal(out["p.gscale"], g)
    with pytest.raises(ValueError, match=r"group scales outside \[1, 16\]"):
        pack_linear("p", w, "w4a8g", {}, codes=c4, gscale=g * 6, scale=np.ones(16, np.float32))
