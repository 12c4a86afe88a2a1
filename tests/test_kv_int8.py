"""The int8 KV cache (docs/numerics.md, "int8 KV cache"). The converter's per-channel steps against an absmax
of what the engine stores (k after RoPE, v) recomputed apart from the converter's hook; the CPU engine with an
int8 cache against the simulator with the same cache (w4a4: every int4 and cached int8 code and greedy
continuations, bit for bit; f16: greedy continuations and the first layer's codes); perplexity against the
fp16 cache; chunked prefill and prefix reuse; bad input."""
from __future__ import annotations

import math
import re
import subprocess
import sys
from dataclasses import asdict
from pathlib import Path

import numpy as np
import pytest
from conftest import KV_CALIB
from safetensors import safe_open
from safetensors.numpy import load_file, save_file

from mergequant import LLM, ArgumentError, EngineError, _engine
from mergequant.convert.convert import convert
from mergequant.convert.loaders import load_checkpoint
from mergequant.convert.mqfile import read_mq
from mergequant.convert.quant.calibrate import CalibrationSpec, calibration_tokens
from mergequant.convert.quant.simulate import SimModel, block_forward, rms_factor, split_qkv
from mergequant.convert.quant.simulate_linear import lora_branch
from mergequant.convert.reference import rope, rope_cos_sin

PROMPTS = ["The capital of France is", "Once upon a time, in a small village,"]
TINY_CALIB = {"calib_n": 2, "calib_len": 64}


def rel(a: np.ndarray, b: np.ndarray) -> float:
    """max-abs difference over max-abs of the reference b (docs/numerics.md)."""
    return float(np.abs(np.asarray(a) - b).max() / np.abs(b).max())


def calibration_ids(src: Path, calib: dict) -> tuple[CalibrationSpec, np.ndarray]:
    """The windows `convert(src, ..., kv_int8=True, **calib)` calibrates on (default source and seed)."""
    spec = CalibrationSpec(n=calib["calib_n"], length=calib["calib_len"])
    return spec, calibration_tokens(spec, load_checkpoint(src))


def file_steps(path: Path) -> np.ndarray:
    """[L, 2, Hkv·hd]: each layer's attn_k_scale and attn_v_scale, checked to be F32 [Hkv·hd]."""
    mq = read_mq(path)
    c = mq.config
    out = []
    for i in range(c.num_hidden_layers):
        pair = []
        for name in (f"blk.{i}.attn_k_scale", f"blk.{i}.attn_v_scale"):
            assert mq.dtype(name) == "F32" and mq.shape(name) == (c.num_key_value_heads * c.head_dim,), name
            pair.append(mq.tensor(name))
        out.append(pair)
    return np.array(out, np.float32)


def steps_of(amax: np.ndarray) -> np.ndarray:
    # s = absmax / 127 in fp32, 1 where absmax = 0
    return np.where(amax > 0, amax.astype(np.float32) / np.float32(127), np.float32(1)).astype(np.float32)


@pytest.fixture(scope="module")
def tiny_kv(tiny_hf_checkpoint, tmp_path_factory) -> Path:
    """The tiny random model in f16 with KV-cache scales (`convert --kv-int8`)."""
    ck = tiny_hf_checkpoint()
    return convert(ck.path, tmp_path_factory.mktemp("kv_tiny") / "tiny-kv.mq", progress=False, kv_int8=True,
                   **TINY_CALIB)


@pytest.fixture(scope="module")
def tiny_plain(tiny_hf_checkpoint, tmp_path_factory) -> Path:
    """The same without them (a plain conversion)."""
    ck = tiny_hf_checkpoint()
    return convert(ck.path, tmp_path_factory.mktemp("kv_tiny") / "tiny.mq", progress=False)


# --- (a) the converter's steps ------------------------------------------------------------------------

def stream_kv_absmax(path: Path, ids: np.ndarray) -> np.ndarray:
    """Per layer absmax of k after RoPE and of v [L, 2, Hkv·hd] of an f16 file, recomputed block by block:
    the stream entering layer i (the simulator's blocks, fp16 cache), its RMSNorm, the qkv linear, RoPE."""
    sim = SimModel.from_mq(path)
    c = sim.config
    t, hkv, hd = ids.shape[1], c.num_key_value_heads, c.head_dim
    cos, sin = rope_cos_sin(c, np.arange(t))
    amax = np.zeros((c.num_hidden_layers, 2, hkv * hd), np.float32)
    for row in ids:
        h = sim.embed(row[None]).astype(np.float32)
        for i, blk in enumerate(sim.blocks):
            assert blk.qkv.scheme == "f16"
            x = (h * rms_factor(h, c.rms_norm_eps) * blk.attn_norm).reshape(t, -1)
            _, k, v = split_qkv(blk.qkv(x), c)
            k = rope(k.reshape(t, hkv, hd), cos, sin).reshape(t, -1)
            amax[i] = np.maximum(amax[i], np.abs(np.stack([k, v])).max(axis=1))
            h = block_forward(h, blk, c, cos, sin)
    return amax


def recorded_kv_absmax(path: Path, ids: np.ndarray) -> np.ndarray:
    """The same for a w4a4 file, rebuilt from the simulator's recorded attn_qkv accumulators and input codes:
    y = float(acc)·scale (+ the low-rank branch), split into q/k/v, RoPE on k (v is in o_proj step units)."""
    mq = read_mq(path)
    c = mq.config
    sim = SimModel.from_mq(path)
    names = set(mq.names())
    t, hkv, hd = ids.shape[1], c.num_key_value_heads, c.head_dim
    cos, sin = rope_cos_sin(c, np.arange(t))
    amax = np.zeros((c.num_hidden_layers, 2, hkv * hd), np.float32)
    for row in ids:
        record: dict[str, np.ndarray] = {}
        sim.forward(row, record=record)
        for i in range(c.num_hidden_layers):
            p = f"blk.{i}.attn_qkv"
            assert mq.quant["linears"][p] == "w4a4"
            y = record[p].astype(np.float32) * mq.tensor(p + ".scale")
            if p + ".lora_a" in names:
                y += lora_branch(record[p + ".in"].astype(np.float32), mq.tensor(p + ".lora_a").astype(np.float32),
                                 mq.tensor(p + ".lora_b").astype(np.float32))
            _, k, v = split_qkv(y, c)
            k = rope(k.reshape(t, hkv, hd), cos, sin).reshape(t, -1)
            amax[i] = np.maximum(amax[i], np.abs(np.stack([k, v])).max(axis=1))
    return amax


def test_converter_steps_f16_exact(smollm2_f16_kv_mq, smollm2_gguf_path):
    """SmolLM2 f16 `convert --kv-int8`: every step is, bit for bit, absmax/127 of k after RoPE and of v
    recomputed layer by layer on the calibration windows; the recipe records the cache and its calibration."""
    spec, ids = calibration_ids(smollm2_gguf_path, KV_CALIB)
    assert read_mq(smollm2_f16_kv_mq).quant["params"]["kv_cache"] == {"dtype": "int8", "calibration": asdict(spec)}
    np.testing.assert_array_equal(file_steps(smollm2_f16_kv_mq), steps_of(stream_kv_absmax(smollm2_f16_kv_mq, ids)))


def test_converter_steps_w4a4_exact(tiny_hf_checkpoint, tmp_path):
    """A `mergequant` W4A4 conversion with --kv-int8 (tiny model): the steps equal, bit for bit, absmax/127
    of k after RoPE and of v rebuilt from the recorded integer accumulators; the file also runs (engine)."""
    ck = tiny_hf_checkpoint()
    out = convert(ck.path, tmp_path / "tiny-mq-kv.mq", method="mergequant", progress=False, kv_int8=True,
                  **TINY_CALIB)
    spec, ids = calibration_ids(ck.path, TINY_CALIB)
    quant = read_mq(out).quant
    assert quant["params"]["kv_cache"] == {"dtype": "int8", "calibration": asdict(spec)}
    assert quant["params"]["calibration"]["n"] == TINY_CALIB["calib_n"]  # the method got the options too
    np.testing.assert_array_equal(file_steps(out), steps_of(recorded_kv_absmax(out, ids)))
    # the file runs with the int8 cache: the codes it caches are the simulator's, in every layer
    engine = LLM(out, device="cpu", kv_cache="int8")
    seq = engine.tokenize("the quick brown fox jumps")
    engine.logits(seq)
    cache_codes_match(engine._session, SimModel.from_mq(out, kv_cache="int8"), seq, exact=True)


# --- (b) CPU engine = simulator, int8 cache --------------------------------------------------------------

@pytest.fixture(scope="module")
def w4a4(smollm2_mergequant_kv_mq):
    return LLM(smollm2_mergequant_kv_mq, device="cpu", kv_cache="int8"), \
        SimModel.from_mq(smollm2_mergequant_kv_mq, kv_cache="int8")


@pytest.fixture(scope="module")
def f16(smollm2_f16_kv_mq):
    return LLM(smollm2_f16_kv_mq, device="cpu", kv_cache="int8"), SimModel.from_mq(smollm2_f16_kv_mq, kv_cache="int8")


@pytest.fixture(scope="module")
def text_ids(w4a4, shared_data) -> list[int]:
    text = (shared_data / "eval" / "wikitext2_valid_tokens.txt").read_text(encoding="utf-8")[:4000]
    return w4a4[0].tokenize(text, add_special=False)[:96]


def cache_codes_match(session, sim: SimModel, seq: list[int], exact: bool) -> None:
    """The int8 codes the engine's cache holds after evaluating seq against the simulator's codes of the
    same sequence, k and v of every layer: identical where `exact`. Otherwise (f16 linears, whose fp32 GEMM
    sums end in other last bits than numpy's) the first layer's codes are identical except where the
    simulator's x·inv lies within 1e-3 of a half-integer, a rounding the last bits decide; later layers are
    not compared: one such flip moves an attention output by a whole step and the layers after it drift
    apart (see test_f16_greedy_and_cache_codes)."""
    stored: dict[int, tuple[np.ndarray, np.ndarray]] = {}
    sim.forward(np.array(seq), kv_observer=lambda i, k, v: stored.__setitem__(i, (k, v)))
    for i, kv in enumerate(sim.kv if exact else sim.kv[:1]):
        rows = session.kv_cache_rows(i)
        for x, scale, got in ((stored[i][0], kv.k_scale, rows["k"]), (stored[i][1], kv.v_scale, rows["v"])):
            want = kv.codes(x, scale).reshape(len(seq), -1)
            assert got.shape == want.shape
            if exact:
                np.testing.assert_array_equal(got, want, err_msg=f"layer {i}")
                continue
            diff = got.astype(np.float32) != want
            z = np.abs(x * (np.float32(1) / scale.reshape(x.shape[1:]))).reshape(len(seq), -1)[diff]
            assert np.all(np.abs(got[diff] - want[diff]) == 1) and np.all(np.abs(z - np.floor(z) - 0.5) < 1e-3)


def test_w4a4_codes_identical_every_layer(w4a4, text_ids, smollm2_mergequant_kv_mq):
    """Every int4 code of every layer (norm-quant, attention output read from the int8 cache, SwiGLU) is the
    simulator's, in one prefill and in prefill chunks of 5 tokens, and so is every int8 code in the caches;
    and the int8 cache is in effect: the attention-output codes differ from the fp16 cache's."""
    engine, sim = w4a4
    record: dict[str, np.ndarray] = {}
    sim.forward(np.array(text_ids), record=record)
    chunked = _engine.Session(engine._model, n_ctx=512, n_batch=5, kv_cache="int8")
    for session in (engine._session, chunked):
        traced = session.trace_codes(text_ids)
        keys = [k for k in record if k.endswith(".in")]
        assert len(keys) == 4 * engine._model.n_layer
        for key in keys:
            np.testing.assert_array_equal(traced[key[:-3]], record[key], err_msg=key)
        cache_codes_match(session, sim, text_ids, exact=True)
    fp16 = LLM(smollm2_mergequant_kv_mq, device="cpu")._session.trace_codes(text_ids)
    assert any(not np.array_equal(fp16[f"blk.{i}.attn_output"], record[f"blk.{i}.attn_output.in"])
               for i in range(engine._model.n_layer))


def teacher_forced_greedy(engine: LLM, sim: SimModel, prompt: str | list[int], tie: float = 0.0
                          ) -> tuple[list[int], np.ndarray, dict[str, np.ndarray]]:
    """The engine's greedy 32 tokens, checked to be the simulator's argmax after every prefix (by induction
    the simulator's own greedy run; an early stop is the simulator's end-of-turn token); returns the whole
    sequence, the simulator's logits and its record. With `tie` > 0 a token whose simulated logit is within
    tie · max|logit| of the simulator's best also counts (a near-tie that logits `tie`-close can order either
    way; the later steps are still checked on the engine's own sequence)."""
    ids = engine.tokenize(prompt) if isinstance(prompt, str) else list(prompt)
    engine.generate(ids, max_tokens=32, temperature=0.0, stop_token_ids=None)
    got = engine._session.output_tokens
    seq = ids + got
    record: dict[str, np.ndarray] = {}
    logits = sim.forward(np.array(seq), record=record)
    want = [int(np.argmax(logits[len(ids) - 1 + i])) for i in range(len(got) + 1)]
    if tie > 0:
        for i, tok in enumerate(got):
            row = logits[len(ids) - 1 + i]
            assert row[tok] >= row.max() - tie * np.abs(row).max(), (prompt, i, tok, want[i])
        want[:len(got)] = got
    assert got == want[:len(got)], prompt
    assert len(got) == 32 or want[-1] in engine._model.eot_ids, prompt
    return seq, logits, record


@pytest.mark.parametrize("prompt", PROMPTS)
def test_w4a4_greedy_32_tokens_identical(w4a4, prompt):
    """Greedy continuation with the int8 cache (prefill, then decode steps) equals the simulator's, and so
    does every int4 code of the whole sequence."""
    engine, sim = w4a4
    seq, _, record = teacher_forced_greedy(engine, sim, prompt)
    traced = engine._session.trace_codes(seq)
    for key in [k for k in record if k.endswith(".in")]:
        np.testing.assert_array_equal(traced[key[:-3]], record[key], err_msg=key)


F16_CASES = [("tiny", None), ("smollm2", PROMPTS[0]), ("smollm2", PROMPTS[1])]


@pytest.mark.parametrize("model, prompt", F16_CASES)
def test_f16_greedy_and_cache_codes(model, prompt, tiny_kv, f16):
    """f16 models with the int8 cache (the tiny random model with a 40-token prompt, SmolLM2): greedy 32
    tokens are the simulator's; the first layer's cached codes are its codes up to boundary cases; logits
    within 5e-2. Bit-exactness needs exact inputs to the cache's rounding, as w4a4 blocks have (above): here
    the f16 GEMMs sum in another order than numpy's BLAS, a k or v at a rounding boundary flips to the
    neighbouring code, a whole step, and later layers drift apart. Measured on SmolLM2 (34-token sequence):
    logits 1.2e-2 apart, 92% of all cached codes identical (first layer: 1 flip in 13056); the simulator
    against itself with its GEMMs summed in float64: 1.0e-2 and 84% (with the fp16 cache: 3.5e-4). So the greedy check takes near-ties (1e-3 of the largest logit) either
    way: with fp16 linear inputs (numerics.md) step 23 of the second SmolLM2 prompt is one, 1.3e-4 apart
    (2026-12-08)."""
    if model == "tiny":
        engine, sim = LLM(tiny_kv, device="cpu", kv_cache="int8"), SimModel.from_mq(tiny_kv, kv_cache="int8")
        prompt = np.random.default_rng(3).integers(3, engine.n_vocab, 40).tolist()
    else:
        engine, sim = f16
    seq, logits, _ = teacher_forced_greedy(engine, sim, prompt, tie=1e-3)
    assert rel(engine.logits(seq), logits[-1]) <= 5e-2
    cache_codes_match(engine._session, sim, seq, exact=False)


# --- (c) perplexity: int8 vs fp16 cache -------------------------------------------------------------------

def test_perplexity_int8_within_2_percent_of_fp16(smollm2_f16_kv_mq, shared_data):
    """2 windows x 256 tokens of WikiText-2 test, scales from 2 x 256 calibration tokens (measured
    2026-11-22: fp16 cache 28.44, int8 28.72, +0.97%): within 2%, and not identical (the int8 cache is in
    effect)."""
    text = (shared_data / "eval" / "wiki.test.raw").read_text(encoding="utf-8")[:20000]
    ppl = {}
    for kv in ("fp16", "int8"):
        llm = LLM(smollm2_f16_kv_mq, device="cpu", kv_cache=kv)
        assert llm.kv_cache == kv
        ids = llm.tokenize(text, add_special=False)[:512]
        nll = -sum(float(llm.token_logprobs(ids[w * 256:(w + 1) * 256]).sum()) for w in range(2))
        ppl[kv] = math.exp(nll / (2 * 255))
    assert ppl["int8"] != ppl["fp16"]
    assert abs(ppl["int8"] - ppl["fp16"]) / ppl["fp16"] < 0.02, ppl


# --- (e) prefix reuse and chunked prefill -----------------------------------------------------------------

def test_chunked_prefill_and_prefix_reuse_int8(smollm2_f16_kv_mq):
    """Prefill in chunks of 7 tokens gives bit-identical logits to one chunk; a generation that reuses the
    cached prefix (same prompt, then the conversation extended) gives the tokens of a fresh context."""
    model = _engine.Model(str(smollm2_f16_kv_mq), device="cpu")
    llm = LLM(smollm2_f16_kv_mq, device="cpu", kv_cache="int8")
    prompt = "In the beginning the universe was created. This has made a lot of people very angry and been " \
             "widely regarded as a bad move. Many were increasingly of the opinion that"
    ids = llm.tokenize(prompt)
    whole = _engine.Session(model, n_ctx=512, kv_cache="int8")
    chunked = _engine.Session(model, n_ctx=512, n_batch=7, kv_cache="int8")
    np.testing.assert_array_equal(whole.logits(ids), chunked.logits(ids))

    a = llm.generate(prompt, max_tokens=16, temperature=0.0)
    b = llm.generate(prompt, max_tokens=16, temperature=0.0)  # prompt prefix cached from a
    assert llm.last_timings["n_cached"] > 0 and a == b
    longer = prompt + a + " However,"
    c = llm.generate(longer, max_tokens=16, temperature=0.0)
    assert llm.last_timings["n_cached"] >= len(ids)
    assert c == LLM(smollm2_f16_kv_mq, device="cpu", kv_cache="int8").generate(longer, max_tokens=16, temperature=0.0)


# --- (d) bad input ----------------------------------------------------------------------------------------

@pytest.mark.parametrize("value", ["int4", "bogus", "FP16", ""])
def test_bad_kv_cache_value(tiny_kv, value):
    with pytest.raises(ArgumentError, match=f"invalid kv_cache '{value}': expected fp16 or int8"):
        LLM(tiny_kv, device="cpu", kv_cache=value)


def test_int8_without_scales_names_the_fix(tiny_plain):
    with pytest.raises(ArgumentError, match=re.escape(f"model file {tiny_plain} has no KV-cache scales "
                                                      "(attn_k_scale/attn_v_scale): convert it with --kv-int8")):
        LLM(tiny_plain, device="cpu", kv_cache="int8")
    assert LLM(tiny_plain, device="cpu").kv_cache == "fp16"  # fp16 needs no scales
    with pytest.raises(ValueError, match="--kv-int8"):
        SimModel.from_mq(tiny_plain, kv_cache="int8")


def _edited(src: Path, dst: Path, edit) -> Path:
    t = load_file(str(src))
    with safe_open(str(src), "np") as f:
        meta = dict(f.metadata())
    edit(t)
    save_file(t, str(dst), metadata=meta)
    return dst


@pytest.mark.parametrize("case, edit, match", [
    ("shape", lambda t: t.update({"blk.0.attn_k_scale": t["blk.0.attn_k_scale"][:-1].copy()}),
     r"tensor 'blk.0.attn_k_scale' is F32 \[31\], expected F32 \[32\]"),
    ("dtype", lambda t: t.update({"blk.1.attn_v_scale": t["blk.1.attn_v_scale"].astype(np.float16)}),
     r"tensor 'blk.1.attn_v_scale' is F16 \[32\], expected F32 \[32\]"),
    ("zero", lambda t: t["blk.0.attn_v_scale"].__setitem__(3, 0.0),
     "tensor 'blk.0.attn_v_scale' channel 3 is 0.0+: KV-cache scales must be finite and > 0"),
    ("nan", lambda t: t["blk.1.attn_k_scale"].__setitem__(5, np.nan),
     "tensor 'blk.1.attn_k_scale' channel 5 is .*nan.*: KV-cache scales must be finite and > 0"),
    ("negative", lambda t: t["blk.0.attn_k_scale"].__setitem__(0, -1.0),
     "channel 0 is -1.0+: KV-cache scales must be finite and > 0"),
    ("one layer missing", lambda t: t.pop("blk.1.attn_v_scale"), "missing tensor 'blk.1.attn_v_scale'"),
])
def test_corrupt_scales_are_engine_errors(tiny_kv, tmp_path, case, edit, match):
    """A bad scale tensor is refused when the model loads (whatever cache is asked for), naming the file."""
    bad = _edited(tiny_kv, tmp_path / "bad.mq", edit)
    with pytest.raises(EngineError, match=match) as e:
        LLM(bad, device="cpu")
    assert str(bad) in str(e.value) and not isinstance(e.value, ArgumentError)


def cli(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "mergequant.cli", *args], capture_output=True, text=True, timeout=300)


def test_cli_convert_generate_eval_int8(tiny_hf_checkpoint, tmp_path, shared_data):
    """`convert --kv-int8` with calibration options and no method, then generate/eval --kv-cache int8 (the
    same greedy text as the API); a bad --kv-cache value and int8 on a file without scales are messages."""
    ck = tiny_hf_checkpoint()
    out, plain = tmp_path / "t-kv.mq", tmp_path / "t.mq"
    r = cli("convert", str(ck.path), "-o", str(out), "--kv-int8", "--calib-n", "2", "--calib-len", "64", "-q")
    assert r.returncode == 0, r.stderr
    assert "kv cache: fp16 or int8 (attn_k_scale/attn_v_scale in 2 of 2 layers)" in cli("inspect", str(out)).stdout
    r = cli("generate", str(out), "-p", "the", "-n", "6", "--temp", "0", "--device", "cpu", "--kv-cache", "int8")
    assert r.returncode == 0, r.stderr
    assert r.stdout == LLM(out, device="cpu", kv_cache="int8").generate("the", max_tokens=6, temperature=0.0) + "\n"
    r = cli("eval", str(out), "--ppl", str(shared_data / "eval" / "wiki.test.raw"), "--window", "64",
            "--max-windows", "1", "--kv-cache", "int8", "--device", "cpu", "-q")
    assert r.returncode == 0 and "kv cache int8" in r.stdout, r.stderr
    r = cli("generate", str(out), "-p", "the", "--kv-cache", "int4")
    assert r.returncode == 2 and "invalid choice: 'int4'" in r.stderr
    assert cli("convert", str(ck.path), "-o", str(plain), "-q").returncode == 0
    assert "kv cache: fp16 only" in cli("inspect", str(plain)).stdout
    r = cli("generate", str(plain), "-p", "the", "--kv-cache", "int8")
    assert r.returncode == 1 and "has no KV-cache scales" in r.stderr and "--kv-int8" in r.stderr
    r = cli("convert", str(ck.path), "-o", str(plain), "--calib-n", "2")
    assert r.returncode != 0 and "--kv-int8" in r.stderr


def test_chat_binary_kv_cache(tiny_kv, tiny_plain):
    from test_bad_input import chat_binary

    exe = chat_binary()
    r = subprocess.run([exe, "-m", str(tiny_kv), "-p", "hi", "-n", "4", "--temp", "0", "--kv-cache", "int8"],
                       capture_output=True, text=True, timeout=60)
    assert r.returncode == 0, r.stderr
    r = subprocess.run([exe, "-m", str(tiny_kv), "-p", "hi", "--kv-cache", "bogus"], capture_output=True, text=True,
                       timeout=60)
    assert r.returncode == 1 and "mergequant-chat: error: invalid value 'bogus' for --kv-cache" in r.stderr
    r = subprocess.run([exe, "-m", str(tiny_plain), "-p", "hi", "--kv-cache", "int8"], capture_output=True, text=True,
                       timeout=60)
    assert r.returncode == 1 and "has no KV-cache scales" in r.stderr and "--kv-int8" in r.stderr
