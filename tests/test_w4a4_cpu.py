"""The CPU engine against the numpy simulated engine (docs/numerics.md) on quantized models: the real
SmolLM2 converted with `mergequant` (small calibration) and a tiny random model in every 4-bit scheme.
Integer GEMM outputs and every int4 code the engine produces from floats must be identical, final logits
within 1e-3, greedy continuations identical."""
from __future__ import annotations

import numpy as np
import pytest

from mergequant import LLM
from mergequant.convert.convert import convert
from mergequant.convert.quant.simulate import SimModel

PROMPTS = ["The capital of France is", "Once upon a time, in a small village,", "def fibonacci(n):",
           "Water boils at a temperature of", "The three primary colors are"]


@pytest.fixture(scope="module")
def engine(smollm2_mergequant_mq):
    return LLM(smollm2_mergequant_mq, device="cpu")


@pytest.fixture(scope="module")
def sim(smollm2_mergequant_mq):
    return SimModel.from_mq(smollm2_mergequant_mq)


def rel(a: np.ndarray, b: np.ndarray) -> float:
    return float(np.abs(a - b).max() / np.abs(b).max())


def test_int_gemm_and_codes_identical_every_layer(engine, sim, shared_data):
    """Every w4a4 linear of every layer, fed the simulator's input codes of a calibration batch, gives
    bit-identical int32 outputs; and the int4 codes the engine computes itself from floats (norm-quant,
    attention output, SwiGLU) equal the simulator's in every layer: the float values that feed a rounding
    are computed in float64 and rounded once on both sides (docs/numerics.md)."""
    text = (shared_data / "eval" / "wikitext2_valid_tokens.txt").read_text(encoding="utf-8")[:4000]
    ids = engine.tokenize(text, add_special=False)[:96]
    record: dict[str, np.ndarray] = {}
    sim.forward(np.array(ids), record=record)
    traced = engine._session.trace_codes(ids)
    names = [k[:-3] for k in record if k.endswith(".in")]
    assert len(names) == 4 * engine._model.n_layer
    for name in names:
        acc = engine._model.int_gemm(name, np.ascontiguousarray(record[name + ".in"]))
        np.testing.assert_array_equal(acc, record[name], err_msg=name)
        np.testing.assert_array_equal(traced[name], record[name + ".in"], err_msg=name)


@pytest.mark.parametrize("prompt", PROMPTS)
def test_final_logits_within_1e3(engine, sim, prompt):
    ids = engine.tokenize(prompt)
    assert rel(engine.logits(ids), sim.forward(np.array(ids))[-1]) <= 1e-3


@pytest.mark.parametrize("prompt", PROMPTS)
def test_greedy_32_tokens_identical(engine, sim, prompt):
    """The engine's greedy continuation is the simulator's: every token is the simulator's argmax after the
    same prefix (teacher-forced: by induction this is the simulator's own greedy run), and every int4 code
    of the whole sequence, prompt and continuation, is the simulator's."""
    ids = engine.tokenize(prompt)
    engine.generate(ids, max_tokens=32, temperature=0.0, stop_token_ids=None)
    got = engine._session.output_tokens  # (an end-of-turn token that stops it is not among them)
    seq = ids + got
    record: dict[str, np.ndarray] = {}
    logits = sim.forward(np.array(seq), record=record)
    want = [int(np.argmax(logits[len(ids) - 1 + i])) for i in range(len(got))]
    assert got == want, prompt
    if len(got) < 32:  # only an end-of-turn token stops it early, and the simulator's greedy run ends there too
        assert engine.last_finish_reason == "stop" and int(np.argmax(logits[-1])) in engine._model.eot_ids
    traced = engine._session.trace_codes(seq)
    for key in [k for k in record if k.endswith(".in")]:
        np.testing.assert_array_equal(traced[key[:-3]], record[key], err_msg=key)


@pytest.fixture(scope="module")
def tiny_ck(tiny_hf_checkpoint):
    return tiny_hf_checkpoint()


# schemes packed by RTN with no method (convert --scheme): case → (scheme, packer parameters)
PLAIN_SCHEMES = {"w8a8": ("w8a8", {}), "w6a6": ("w8a8", {"bits": 6}), "w4a8": ("w4a8", {}),
                 "w4a8g": ("w4a8g", {}), "w4a8-bias": ("w4a8", {})}


def add_biases(path, seed: int = 0) -> None:
    """Give every linear of a file a random fp32 bias [N] (P.bias, the optional tensor of the int8-input schemes)."""
    from safetensors import safe_open
    from safetensors.numpy import load_file, save_file
    t = load_file(str(path))
    with safe_open(str(path), "np") as f:
        meta = dict(f.metadata())
    rng = np.random.default_rng(seed)
    for name in [k for k in t if k.endswith(".scale") and k.count(".") == 3]:
        prefix = name[: -len(".scale")]
        t[prefix + ".bias"] = (0.1 * rng.standard_normal(t[name].shape[0])).astype(np.float32)
    save_file(t, str(path), metadata=meta)


# methods run with options: case → (method, options); outliertune writes w8a8s (static per-channel int8 inputs with
# a shift and its bias) at the norm-fed linears and w8a8 (or, static_od, w8a8s) at o_proj / down
METHOD_CASES = {"outliertune": ("outliertune", {}),
                "outliertune-w6a6-static": ("outliertune", {"bits": 6, "static_od": True, "gptq": True})}


@pytest.mark.parametrize("method", ["rtn-w4a16", "rtn-w4a4-dynamic", "rtn-w4a4-static", "mergequant",
                                    "w8a8", "w6a6", "w4a8", "w4a8g", "w4a8-bias", "outliertune",
                                    "outliertune-w6a6-static"])
def test_tiny_every_scheme(tiny_ck, tmp_path, method):
    if method in PLAIN_SCHEMES:
        scheme, params = PLAIN_SCHEMES[method]
        out = convert(tiny_ck.path, tmp_path / f"{method}.mq", scheme=scheme, scheme_params=params, progress=False)
        if method.endswith("-bias"):
            add_biases(out)
    elif method in METHOD_CASES:
        name, opts = METHOD_CASES[method]
        out = convert(tiny_ck.path, tmp_path / f"{method}.mq", method=name, progress=False, calib_n=2, calib_len=32,
                      **opts)
    else:
        out = convert(tiny_ck.path, tmp_path / f"{method}.mq", method=method, progress=False,
                      **({} if method in ("rtn-w4a16", "rtn-w4a4-dynamic") else dict(calib_n=2, calib_len=32)))
    sim = SimModel.from_mq(out)
    llm = LLM(out, device="cpu")
    ids = [5, 17, 99, 3, 42, 7, 200, 11, 64, 9]
    record: dict[str, np.ndarray] = {}
    want = sim.forward(np.array(ids), record=record)[-1]
    assert rel(llm.logits(ids), want) <= 1e-4
    for key in [k for k in record if k.endswith(".in")]:
        np.testing.assert_array_equal(llm._model.int_gemm(key[:-3], np.ascontiguousarray(record[key])),
                                      record[key[:-3]])
    if method in METHOD_CASES:
        linears = sim.quant["linears"]
        want_od = "w8a8s" if METHOD_CASES[method][1].get("static_od") else "w8a8"
        assert {linears["blk.0.attn_qkv"], linears["blk.0.ffn_gate_up"]} == {"w8a8s"}
        assert {linears["blk.0.attn_output"], linears["blk.0.ffn_down"]} == {want_od}
    if method in PLAIN_SCHEMES or method in METHOD_CASES:
        if method in ("w6a6", "outliertune-w6a6-static"):
            assert max(int(np.abs(record[k]).max()) for k in record if k.endswith(".in")) <= 31
        # greedy continuation: every token the simulator's argmax after the same prefix
        llm.generate(ids, max_tokens=12, temperature=0.0, stop_token_ids=None)
        got = llm._session.output_tokens
        logits = sim.forward(np.array(ids + got))
        assert got == [int(np.argmax(logits[len(ids) - 1 + i])) for i in range(len(got))]


@pytest.fixture(scope="module")
def tiny_int8_files(tiny_ck, tmp_path_factory):
    d = tmp_path_factory.mktemp("int8")
    return {s: convert(tiny_ck.path, d / f"{s}.mq", scheme=s, progress=False) for s in ("w8a8", "w4a8", "w4a8g")}


def _edited(src, dst, fn):
    from safetensors import safe_open
    from safetensors.numpy import load_file, save_file
    t = load_file(str(src))
    with safe_open(str(src), "np") as f:
        meta = dict(f.metadata())
    fn(t)
    save_file(t, str(dst), metadata=meta)
    return dst


def _set(name, value):
    def fn(t):
        t[name] = value(t[name]) if callable(value) else value
    return fn


@pytest.mark.parametrize("scheme, edit, match", [
    ("w8a8", _set("blk.0.attn_qkv.bits", np.array([9], np.int32)),
     r"linear 'blk.0.attn_qkv': tensor 'blk.0.attn_qkv.bits' is 9, expected a bit width in \[2, 8\]"),
    ("w8a8", _set("blk.0.attn_qkv.bits", np.array([6], np.int32)),
     r"'blk.0.attn_qkv.qweight' has codes in \[-127, 127\], outside \[-31, 31\] of 6 bits"),
    ("w8a8", _set("blk.1.ffn_down.qweight", lambda w: w.view(np.uint8)),
     r"tensor 'blk.1.ffn_down.qweight' is U8 \[64, 128\], expected I8 \[64, 128\]"),
    ("w8a8", _set("blk.0.ffn_down.scale", lambda s: s[:-1].copy()), r"tensor 'blk.0.ffn_down.scale' is F32 \[63\]"),
    ("w8a8", lambda t: t.pop("blk.0.attn_output.bits"), r"missing tensor 'blk.0.attn_output.bits'"),
    ("w8a8", _set("blk.0.attn_qkv.bias", np.zeros(3, np.float32)), r"tensor 'blk.0.attn_qkv.bias' is F32 \[3\]"),
    ("w4a8", _set("blk.0.attn_qkv.qweight", lambda w: np.concatenate([w, w], axis=1)),
     r"linear 'blk.0.attn_qkv': w4a8 qweight has 128 columns, expected K = 64"),
    ("w4a8g", _set("blk.0.ffn_gate_up.gscale", lambda g: g * 0 + 17),
     r"'blk.0.ffn_gate_up.gscale' has a group scale 17 at 0, outside \[1, 16\]"),
    ("w4a8g", _set("blk.0.ffn_down.gscale", lambda g: np.concatenate([g, g, g], axis=1)),
     r"'blk.0.ffn_down.gscale' must be U8 \[64, K/group\] with a group a multiple of 64"),
])
def test_int8_schemes_bad_tensors_named(tiny_int8_files, tmp_path, scheme, edit, match):
    """The engine's loaders check every tensor of the int8-input schemes, naming the linear and the tensor."""
    bad = _edited(tiny_int8_files[scheme], tmp_path / "bad.mq", edit)
    with pytest.raises(RuntimeError, match=match):
        LLM(bad, device="cpu")


@pytest.fixture(scope="module")
def tiny_w8a8s_file(tiny_ck, tmp_path_factory):
    return convert(tiny_ck.path, tmp_path_factory.mktemp("w8a8s") / "ot.mq", method="outliertune", progress=False,
                   calib_n=2, calib_len=32)


@pytest.mark.parametrize("edit, match", [
    (_set("blk.0.attn_qkv.in_scale", lambda v: np.where(np.arange(v.size) == 3, 0, v).astype(np.float32)),
     r"linear 'blk.0.attn_qkv': tensor 'blk.0.attn_qkv.in_scale' has 0.0+ at 3, expected finite and > 0"),
    (_set("blk.1.ffn_gate_up.shift", lambda v: np.where(np.arange(v.size) == 5, np.nan, v).astype(np.float32)),
     r"tensor 'blk.1.ffn_gate_up.shift' has nan at 5, expected finite"),
    (lambda t: t.pop("blk.0.ffn_gate_up.bias"), r"missing tensor 'blk.0.ffn_gate_up.bias'"),
    (_set("blk.0.attn_qkv.shift", lambda v: v[:-1].copy()), r"tensor 'blk.0.attn_qkv.shift' is F32 \[63\]"),
    (_set("blk.0.attn_qkv.bits", np.array([6], np.int32)),
     r"'blk.0.attn_qkv.qweight' has codes in \[-127, 127\], outside \[-31, 31\] of 6 bits"),
])
def test_w8a8s_bad_tensors_named(tiny_w8a8s_file, tmp_path, edit, match):
    """The engine checks the static int8 scheme's input side (steps, shift) and its required bias, by name."""
    with pytest.raises(RuntimeError, match=match):
        LLM(_edited(tiny_w8a8s_file, tmp_path / "bad.mq", edit), device="cpu")


@pytest.mark.parametrize("scheme", ["w8a8", "w4a8", "w4a8g"])
def test_smollm2_int8_schemes_greedy_identical(smollm2_gguf_path, tmp_path, scheme):
    """The real model by RTN (`convert --scheme`): every linear's int32 GEMM on the simulator's codes is the
    simulator's, logits within 1e-4, and 16 greedy tokens the simulator's argmax after the same prefix (the
    whole int8-activation path is exact but the final fp32 logits GEMM, docs/numerics.md)."""
    out = convert(smollm2_gguf_path, tmp_path / f"{scheme}.mq", scheme=scheme, progress=False)
    llm, sim = LLM(out, device="cpu"), SimModel.from_mq(out)
    ids = llm.tokenize(PROMPTS[0])
    llm.generate(ids, max_tokens=16, temperature=0.0, stop_token_ids=None)
    got = llm._session.output_tokens
    record: dict[str, np.ndarray] = {}
    logits = sim.forward(np.array(ids + got), record=record)
    assert got == [int(np.argmax(logits[len(ids) - 1 + i])) for i in range(len(got))]
    assert rel(llm.logits(ids + got), logits[-1]) <= 1e-4
    for key in [k for k in record if k.endswith(".in")]:
        np.testing.assert_array_equal(llm._model.int_gemm(key[:-3], np.ascontiguousarray(record[key])),
                                      record[key[:-3]], err_msg=key)
