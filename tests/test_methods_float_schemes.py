"""The methods on the float-input schemes (gptq-w4a16 on w4a16g, smoothquant on w8a8, qqq on w4a8 / w4a8g;
docs/methods.md): the smoothing folds are exact before rounding, GPTQ on a grid beats round-to-nearest on
the same grid, every method's components lower the error they target on a tiny model (measured against the
numpy reference / the f16 simulation), the recipe is recorded, and the CPU engine runs each written file
exactly like the simulator (logits, integer GEMMs, greedy tokens)."""
from __future__ import annotations

import numpy as np
import pytest

from mergequant import LLM
from mergequant.convert import convert
from mergequant.convert.inspect import inspect_model
from mergequant.convert.layers import fused_layer
from mergequant.convert.loaders import load_checkpoint
from mergequant.convert.quant.blockwise import quantize_block, tie_kv_groups
from mergequant.convert.quant.calibrate import calibration_spec, calibration_tokens
from mergequant.convert.quant.gptq import gptq_quantize
from mergequant.convert.quant.int4 import quant_groups, unpack_int4
from mergequant.convert.quant.methods import quantize
from mergequant.convert.quant.simulate import SimModel, log_softmax, rms_factor
from mergequant.convert.reference import block_forward, layer_tensors

WORDS = ("the of and to in is was for on that with as by at from his her it an were are which this be "
         "river city music year first game team war state school album film north song church").split()


def random_text(seed: int, n_words: int) -> str:
    rng = np.random.default_rng(seed)
    return " ".join(rng.choice(WORDS, n_words)).capitalize() + "."


@pytest.fixture(scope="module")
def tiny(tiny_hf_checkpoint, tmp_path_factory):
    """The conftest tiny Llama (D 64, F 128, 4 heads over 2 kv heads) and a calibration text for it."""
    ck = tiny_hf_checkpoint()
    text = tmp_path_factory.mktemp("calib") / "calib.txt"
    text.write_text(random_text(0, 3000))
    calib = dict(calib=str(text), tokenizer=str(ck.path / "tokenizer.json"), calib_n=8, calib_len=64)
    return ck, load_checkpoint(ck.path), calib


@pytest.fixture(scope="module")
def outliers(tiny_hf_checkpoint, tmp_path_factory):
    """The tiny Llama with a few planted outlier channels in both norms' weights (x30), the activation
    outliers that make per-token int8 quantization lose the other channels."""
    from safetensors.numpy import load_file, save_file
    ck = tiny_hf_checkpoint()
    out = tmp_path_factory.mktemp("outliers")
    for f in ck.path.iterdir():
        (out / f.name).write_bytes(f.read_bytes())
    t = load_file(str(out / "model.safetensors"))
    for name in [n for n in t if n.endswith("layernorm.weight")]:
        t[name] = t[name].copy()
        t[name][[3, 17, 40]] *= 30
    save_file(t, str(out / "model.safetensors"), metadata={"format": "pt"})
    text = out / "calib.txt"
    text.write_text(random_text(0, 3000))
    calib = dict(calib=str(text), tokenizer=str(out / "tokenizer.json"), calib_n=8, calib_len=64)
    return out, load_checkpoint(out), calib


def eval_ids(calib: dict) -> np.ndarray:
    from tokenizers import Tokenizer
    tok = Tokenizer.from_file(calib["tokenizer"])
    return np.asarray(tok.encode(random_text(1, 600), add_special_tokens=False).ids[:4 * 64]).reshape(4, 64)


def kl(model: SimModel, f16: SimModel, ids: np.ndarray) -> float:
    ref, lp = log_softmax(f16.forward(ids)), log_softmax(model.forward(ids))
    return float(np.mean(np.sum(np.exp(ref) * (ref - lp), axis=-1)))


class PowerOfTwoSmoothing:
    """A test method: random power-of-two smoothing scales at all four points (tied at o_proj), f16 weights."""

    def __init__(self, seed: int) -> None:
        self.rng = np.random.default_rng(seed)

    def smooth(self, layer, site, x, w, tie):
        return tie(2.0 ** self.rng.integers(-3, 4, x.shape[1])).astype(np.float32)

    def weights(self, layer, site, x, w):
        return "f16", {}


class NoSmoothing(PowerOfTwoSmoothing):
    def smooth(self, layer, site, x, w, tie):
        return None


def test_smoothing_folds_are_exact(tiny):
    """Scales folded into the norms, the v rows (tied per KV group) and the up rows leave the block's output
    unchanged: with power-of-two scales (exact in fp16 and fp32) the smoothed f16 block gives the unsmoothed
    f16 block's output, and both match the numpy reference block (fp32 weights) to fp16 accuracy."""
    from mergequant.convert.quant.simulate import block_forward as sim_block
    from mergequant.convert.reference import rope_cos_sin
    _, ck, _ = tiny
    c = ck.config
    rng = np.random.default_rng(0)
    h = rng.standard_normal((2, 24, c.hidden_size)).astype(np.float32)
    fused = fused_layer(ck, 0)
    cos_sin = rope_cos_sin(c, np.arange(24))
    tensors, blk = quantize_block(0, h, fused, c, PowerOfTwoSmoothing(1), {"linears": {}})
    assert not np.array_equal(tensors["blk.0.attn_norm.weight"], fused["blk.0.attn_norm.weight"])
    _, plain = quantize_block(0, h, fused, c, NoSmoothing(1), {"linears": {}})
    got, unsmoothed = sim_block(h, blk, c, *cos_sin), sim_block(h, plain, c, *cos_sin)
    # (the f16 linears round their inputs to fp16: an fp32 last-bit difference between the two runs moves an input
    # across an fp16 rounding boundary now and then, a 2^-11 step: 5.9e-5 of the largest output here, 2026-12-08;
    # a wrong fold is off by a factor of 2 or more)
    assert np.abs(got - unsmoothed).max() <= 5e-4 * np.abs(unsmoothed).max()
    want = np.stack([block_forward(x, layer_tensors(ck.tensors, 0), c) for x in h])
    assert np.abs(got - want).max() <= 1e-2 * np.abs(want).max()


def test_tie_kv_groups_is_the_group_max(tiny):
    _, ck, _ = tiny
    c = ck.config
    x = np.arange(c.num_attention_heads * c.head_dim, dtype=np.float32)[::-1].copy()
    tied = tie_kv_groups(x, c).reshape(c.num_attention_heads, c.head_dim)
    group = c.num_attention_heads // c.num_key_value_heads
    for hq in range(c.num_attention_heads):
        g0 = (hq // group) * group
        np.testing.assert_array_equal(tied[hq], x.reshape(c.num_attention_heads, -1)[g0:g0 + group].max(axis=0))


@pytest.mark.parametrize("grid", ["row", "group"])
def test_gptq_on_a_grid_beats_rtn(grid):
    """GPTQ codes on a fixed grid (a step per row, or per group of 32 columns) stay in range and give a lower
    output error ‖a·Wᵀ − a·Ŵᵀ‖ than round-to-nearest on the same grid, for correlated inputs; act-order too."""
    rng = np.random.default_rng(3)
    a = (rng.standard_normal((2000, 8)) @ rng.standard_normal((8, 96))).astype(np.float32)
    w = rng.standard_normal((32, 96)).astype(np.float32)
    if grid == "row":
        step = np.abs(w).max(axis=1) / 7
        full = np.repeat(step[:, None], 96, axis=1)
    else:
        q, s16 = quant_groups(w, 32)
        full = np.repeat(s16.astype(np.float32), 32, axis=1)
        step = full
    rtn = np.clip(np.rint(w / full), -8, 7)
    err = lambda q: np.linalg.norm(a @ w.T - a @ (q * full).T)  # noqa: E731
    for act_order in (False, True):
        q = gptq_quantize(w, (a.T @ a).astype(np.float64), step, -8, 7, block=32, act_order=act_order)
        assert q.min() >= -8 and q.max() <= 7
        assert err(q) < 0.7 * err(rtn)
    q6 = gptq_quantize(w, (a.T @ a).astype(np.float64), np.abs(w).max(axis=1) / 31, -31, 31)
    assert q6.min() >= -31 and q6.max() <= 31


def layer0_input(ck, calib) -> np.ndarray:
    """Layer 0's q/k/v input on the calibration windows, from the checkpoint alone (no quantized layer)."""
    spec = calibration_spec(calib)
    ids = calibration_tokens(spec, ck)
    h = ck.get("model.embed_tokens.weight").astype(np.float16)[ids].astype(np.float32)
    g1 = ck.get("model.layers.0.input_layernorm.weight")
    return (h * rms_factor(h, ck.config.rms_norm_eps) * g1).reshape(-1, h.shape[-1]).astype(np.float64)


def test_gptq_w4a16_beats_rtn_w4a16(tiny, tmp_path):
    """gptq-w4a16 keeps RTN's grid (static groups: the same fp16 group scales), lowers layer 0's q/k/v output
    error on its calibration inputs (dequantized independently from the file's bytes) and the model's KL
    divergence from f16."""
    ck_files, ck, calib = tiny
    rtn = convert(ck_files.path, tmp_path / "rtn.mq", method="rtn-w4a16", progress=False)
    gq = convert(ck_files.path, tmp_path / "gptq.mq", method="gptq-w4a16", progress=False, **calib)
    from mergequant.convert.mqfile import read_mq
    files = {k: read_mq(p) for k, p in (("rtn", rtn), ("gptq", gq))}
    np.testing.assert_array_equal(files["rtn"].tensor("blk.0.attn_qkv.scale"), files["gptq"].tensor("blk.0.attn_qkv.scale"))
    x = layer0_input(ck, calib)
    w = np.concatenate([ck.get(f"model.layers.0.self_attn.{n}_proj.weight") for n in "qkv"]).astype(np.float64)

    def dequant(mq):  # nibbles → codes, times the fp16 scale of each group of columns
        packed = mq.tensor("blk.0.attn_qkv.qweight")
        lo, hi = (packed & 0xF).astype(np.int16), (packed >> 4).astype(np.int16)
        codes = np.empty((packed.shape[0], packed.shape[1] * 2), np.int16)
        codes[:, 0::2], codes[:, 1::2] = lo - 16 * (lo >= 8), hi - 16 * (hi >= 8)
        s = mq.tensor("blk.0.attn_qkv.scale").astype(np.float64)
        return codes * np.repeat(s, codes.shape[1] // s.shape[1], axis=1)

    err = {k: np.linalg.norm(x @ w.T - x @ dequant(mq).T) for k, mq in files.items()}
    assert err["gptq"] < 0.9 * err["rtn"]
    ids = eval_ids(calib)
    f16 = quantize(ck, None)
    assert kl(SimModel.from_mq(gq), f16, ids) < kl(SimModel.from_mq(rtn), f16, ids)
    assert files["gptq"].quant["method"] == "gptq-w4a16"
    assert files["gptq"].quant["params"]["options"] == {"gptq": True, "act_order": True, "damp": 0.01, "block": 128}


def test_smoothquant_lifts_rtn_w8a8_on_outliers(outliers):
    """On planted activation outliers, SmoothQuant's migration lowers the KL from f16 of per-token W8A8 RTN;
    smoothing the o_proj and down inputs too lowers it further or keeps it (never worse by more than 10%)."""
    _, ck, calib = outliers
    ids = eval_ids(calib)
    f16 = quantize(ck, None)
    plain = kl(quantize(ck, "smoothquant", no_smooth=True, **calib), f16, ids)
    norms_only = kl(quantize(ck, "smoothquant", o_smooth="skip", down_smooth="skip", **calib), f16, ids)
    full = quantize(ck, "smoothquant", **calib)
    assert norms_only < 0.7 * plain
    assert kl(full, f16, ids) < 1.1 * norms_only
    assert full.quant["params"]["options"] == {"alpha": 0.5, "bits": 8, "smooth": True, "o_smooth": "tie",
                                               "down_smooth": "up", "gptq": False}
    assert set(full.quant["linears"].values()) == {"w8a8"}


@pytest.mark.parametrize("group_size", [0, 128])
def test_qqq_components_lower_the_error(outliers, group_size):
    """On planted outliers, QQQ's adaptive smoothing lowers W4A8's KL from f16, and GPTQ lowers it further;
    the chosen thresholds are recorded per point and layer."""
    _, ck, calib = outliers
    ids = eval_ids(calib)
    f16 = quantize(ck, None)
    args = dict(group_size=group_size, smooth_steps=24, **calib)
    rtn = kl(quantize(ck, "qqq", no_smooth=True, gptq=False, **args), f16, ids)
    smooth = kl(quantize(ck, "qqq", gptq=False, **args), f16, ids)
    full = quantize(ck, "qqq", **args)
    assert smooth < 0.8 * rtn
    assert kl(full, f16, ids) < smooth
    scheme = "w4a8g" if group_size else "w4a8"
    assert set(full.quant["linears"].values()) == {scheme}
    thr = full.quant["params"]["smoothing_thresholds"]
    assert set(thr) == {"attn_qkv", "attn_output", "ffn_gate_up", "ffn_down"}
    assert all(len(v) == ck.config.num_hidden_layers and all(0 < t <= 1 for t in v) for v in thr.values())
    assert min(thr["attn_qkv"]) < 1  # the planted outliers are smoothed


def test_fptq_lae_and_policy(outliers):
    """Layer 0's q/k/v norm weight becomes γ / s with s_j = max|X_j| / log2(2 + max|X_j|) computed here from
    the checkpoint alone (its input precedes every quantized layer), where the recorded range max|X| lies in
    [v0, v1]; with v0 above every range no point is equalized (the no-LAE model exactly)."""
    _, ck, calib = outliers
    lae = quantize(ck, "fptq", **calib)
    x = layer0_input(ck, calib)
    amax = np.abs(x).max(axis=0)
    ranges = lae.quant["params"]["activation_ranges"]
    assert set(ranges) == {"attn_qkv", "ffn_gate_up"}
    assert abs(ranges["attn_qkv"][0] - amax.max()) <= 0.01
    assert 15 <= amax.max() <= 150  # the planted outliers put layer 0 in the LAE band
    g1 = ck.get("model.layers.0.input_layernorm.weight")
    np.testing.assert_allclose(lae.blocks[0].attn_norm, g1 / (amax / np.log2(2 + amax)), rtol=1e-5)
    plain = quantize(ck, "fptq", no_lae=True, **calib)
    off = quantize(ck, "fptq", v0=1e6, v1=1e7, **calib)
    for b0, b1 in zip(off.blocks, plain.blocks):
        np.testing.assert_array_equal(b0.attn_norm, b1.attn_norm)
        np.testing.assert_array_equal(b0.qkv.w, b1.qkv.w)


CASES = {"gptq-w4a16": {}, "smoothquant": {}, "smoothquant-w6a6": {"bits": 6}, "qqq": {},
         "qqq-g128": {"group_size": 128}, "fptq": {}}


@pytest.mark.parametrize("case", CASES)
def test_engine_runs_method_files_like_the_simulator(outliers, tmp_path, case):
    """The CPU engine on each method's file: logits within 1e-4 of the simulator's (2e-3 for gptq-w4a16, whose
    fp16-rounded inputs turn the fp32 GEMMs' last-bit differences into an fp16 step now and then: 2.8e-4
    measured, 2026-12-08), every integer GEMM identical on the simulator's input codes, and the greedy
    continuation the simulator's argmax at every step."""
    src, _, calib = outliers
    method = case.split("-w6a6")[0].split("-g128")[0]
    out = convert(src, tmp_path / f"{case}.mq", method=method, progress=False,
                  **CASES[case], **(dict(calib, smooth_steps=12) if method == "qqq" else calib))
    sim = SimModel.from_mq(out)
    llm = LLM(out, device="cpu")
    ids = [5, 17, 99, 3, 42, 7, 200, 11, 64, 9]
    record: dict[str, np.ndarray] = {}
    want = sim.forward(np.array(ids), record=record)[-1]
    tol = 2e-3 if case == "gptq-w4a16" else 1e-4
    assert np.abs(llm.logits(ids) - want).max() <= tol * np.abs(want).max()
    for key in [k for k in record if k.endswith(".in")]:
        np.testing.assert_array_equal(llm._model.int_gemm(key[:-3], np.ascontiguousarray(record[key])),
                                      record[key[:-3]], err_msg=key)
    llm.generate(ids, max_tokens=16, temperature=0.0, stop_token_ids=None)
    got = llm._session.output_tokens
    logits = sim.forward(np.array(ids + got))
    assert got == [int(np.argmax(logits[len(ids) - 1 + i])) for i in range(len(got))]
    text = inspect_model(out)
    assert f"method {method!r}" in text and "calibration" in text


def test_method_arguments_checked(tiny):
    _, ck, calib = tiny
    with pytest.raises(ValueError, match="group_size must be 0"):
        quantize(ck, "qqq", group_size=64, **calib)
    with pytest.raises(ValueError, match="o_smooth must be"):
        quantize(ck, "smoothquant", o_smooth="v", **calib)
    with pytest.raises(ValueError, match="writes scheme 'w8a8'"):
        list(convert_blocks(ck, "smoothquant", "w4a8"))


def convert_blocks(ck, method, scheme):
    from mergequant.convert.quant.methods import METHODS
    return METHODS[method](ck, scheme=scheme, quant={})


def test_cli_flags_reach_the_recipe_and_inspect(tiny, tmp_path):
    """`convert --method qqq --group-size 128 ...` records every switch in the recipe, `inspect` prints it,
    and a flag of another method is refused by name."""
    import subprocess
    import sys
    ck_files, _, calib = tiny
    out = tmp_path / "qqq.mq"
    cmd = [sys.executable, "-m", "mergequant.cli", "convert", str(ck_files.path), "-o", str(out), "-q",
           "--method", "qqq", "--group-size", "128", "--o-smooth", "skip", "--smooth-steps", "8", "--no-act-order",
           "--damp", "0.02", "--grid", "ceil", "--smooth-grid", "same", "--calib", calib["calib"], "--calib-n", "4", "--calib-len", "32",
           "--opt", f"tokenizer={calib['tokenizer']}"]
    r = subprocess.run(cmd, capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr
    from mergequant.convert.mqfile import read_mq
    opts = read_mq(out).quant["params"]["options"]
    assert (opts["group_size"], opts["o_smooth"], opts["smooth_steps"], opts["act_order"], opts["damp"],
            opts["grid"], opts["smooth_grid"]) == (128, "skip", 8, False, 0.02, "ceil", "same")
    text = inspect_model(out)
    assert "options: group_size=128, smooth=True, o_smooth=skip, smooth_steps=8" in text
    assert "calibration: source=" in text and "n=4, length=32" in text
    assert "smoothing_thresholds: {" in text and "grid=ceil" in text
    r = subprocess.run([*cmd[:7], "--method", "qqq", "--alpha", "0.7"], capture_output=True, text=True, timeout=300)
    assert r.returncode != 0 and "--alpha do(es) not apply to --method qqq" in r.stderr
