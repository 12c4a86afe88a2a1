"""Quantization transforms are exact before rounding; the fitting pieces (clipping, low-rank, GPTQ) do
what they claim on planted data; MergeQuant beats plain static W4A4 on a tiny model; a converted file
simulates exactly like the in-memory result."""
from __future__ import annotations

import numpy as np
import pytest

from mergequant.convert import convert
from mergequant.convert.layers import fused_layer
from mergequant.convert.loaders import load_checkpoint
from mergequant.convert.quant.methods import quantize
from mergequant.convert.quant.clip import ACT_RATIOS, fake_quant, search_act_clip
from mergequant.convert.quant.gptq import gptq_codes
from mergequant.convert.quant.int4 import QMAX, quant_rows
from mergequant.convert.quant.lowrank import fit_lowrank
from mergequant.convert.quant.mergequant import tie_kv_groups, v_row_steps
from mergequant.convert.quant.simulate import SimModel, log_softmax
from mergequant.convert.quant.split import allocate_parts, build_in_map, expand_columns
from mergequant.convert.reference import attention, block_forward, layer_tensors, rope, rope_cos_sin, silu

TINY = dict(hidden_size=96, intermediate_size=160, num_attention_heads=3, num_key_value_heads=1)


WORDS = ("the of and to in is was for on that with as by at from his her it an were are which this be "
         "river city music year first game team war state school album film river north song church").split()


def random_text(seed: int, n_words: int) -> str:
    """Text-like byte statistics for the tiny byte-level tokenizer (calibration and evaluation differ)."""
    rng = np.random.default_rng(seed)
    return " ".join(rng.choice(WORDS, n_words)).capitalize() + "."


@pytest.fixture(scope="module")
def tiny(tiny_hf_checkpoint, tmp_path_factory):
    ck = tiny_hf_checkpoint(**TINY)
    text = tmp_path_factory.mktemp("calib") / "calib.txt"
    text.write_text(random_text(0, 2000))
    calib = dict(calib=str(text), tokenizer=str(ck.path / "tokenizer.json"), calib_n=16, calib_len=64)
    return ck, load_checkpoint(ck.path), calib


def test_folds_and_splits_leave_fp32_block_unchanged(tiny):
    """The static W4A4 block of docs/numerics.md with its rint/clamp removed, built from the folded
    tensors (γ/Δ, W·diag(Δ) in slot layout, v rows / Δᵒ, up rows / Δᵈ), equals the fp32 block."""
    _, ck, _ = tiny
    c = ck.config
    rng = np.random.default_rng(0)
    d, f, hd = c.hidden_size, c.intermediate_size, c.head_dim
    nq, nkv = c.num_attention_heads * hd, c.num_key_value_heads * hd
    fused = fused_layer(ck, 0)
    x = rng.standard_normal((20, d)).astype(np.float32) * 3

    def site(w, k):  # random ranges, split parts from the allocator, slot map with padding
        ranges = rng.uniform(0.5, 8, k).astype(np.float32)
        parts = allocate_parts(ranges, np.sum(w * w, axis=0), extra=13)
        in_map = build_in_map(parts, k + 13 + 7)
        step = ranges / (7 * parts)
        return step, in_map, expand_columns(w * step, in_map)

    def slots(z, in_map):  # floor((t + k)/m) without rounding: each part carries z/m
        out = np.zeros((len(z), len(in_map)), np.float32)
        live = in_map[:, 0] >= 0
        out[:, live] = z[:, in_map[live, 0]] / in_map[live, 2]
        return out

    g1, g2 = fused["blk.0.attn_norm.weight"], fused["blk.0.ffn_norm.weight"]
    step1, map1, w_qkv = site(fused["blk.0.attn_qkv"], d)
    step_o = tie_kv_groups(rng.uniform(0.5, 4, nq).astype(np.float32), c)
    w_qkv[nq + nkv:] /= v_row_steps(step_o, c)[:, None]
    step2, map2, w_gu = site(fused["blk.0.ffn_gate_up"], d)
    step3, map3, w_down = site(fused["blk.0.ffn_down"], f)
    w_gu[f:] /= step3[:, None]

    r = lambda h: 1 / np.sqrt(np.mean(h * h, axis=1, keepdims=True) + c.rms_norm_eps)  # noqa: E731
    y = slots(x * r(x) * (g1 / step1), map1) @ w_qkv.T
    cos, sin = rope_cos_sin(c, np.arange(len(x)))
    q = rope(y[:, :nq].reshape(len(x), -1, hd), cos, sin)
    k = rope(y[:, nq:nq + nkv].reshape(len(x), -1, hd), cos, sin)
    o = attention(q, k, y[:, nq + nkv:].reshape(len(x), -1, hd), 0)  # already o / Δᵒ
    h = x + o @ (fused["blk.0.attn_output"] * step_o).T
    y = slots(h * r(h) * (g2 / step2), map2) @ w_gu.T
    out = h + slots(silu(y[:, :f]) * y[:, f:], map3) @ w_down.T
    ref = block_forward(x, layer_tensors(ck.tensors, 0), c)
    assert np.abs(out - ref).max() / np.abs(ref).max() < 1e-5


def test_clip_search_finds_the_grid_minimum_on_heavy_tails():
    rng = np.random.default_rng(1)
    x = rng.standard_t(3, size=(4000, 8)).astype(np.float32)
    amax = np.abs(x).max(axis=0)
    ratio = search_act_clip(x, amax, np.ones(8), (2.4,))[0]
    for j in range(8):  # brute force, channel by channel
        errs = {p: np.sum(np.abs(fake_quant(x[:, j], p * amax[j]) - x[:, j]) ** 2.4) for p in ACT_RATIOS}
        assert errs[ratio[j]] <= min(errs.values()) * (1 + 1e-5)
        assert errs[ratio[j]] < 0.5 * errs[1.0]


def test_lowrank_recovers_planted_map():
    rng = np.random.default_rng(2)
    a = np.rint(rng.standard_normal((3000, 64)) * 3).astype(np.float32)
    planted = (rng.standard_normal((64, 4)) @ rng.standard_normal((4, 40))).astype(np.float32)
    resid = a @ planted + 0.01 * rng.standard_normal((3000, 40)).astype(np.float32)
    la, lb = fit_lowrank(a.T @ a, a.T @ resid, rank=4, damp=1e-5)
    assert la.shape == (4, 64) and lb.shape == (40, 4)
    assert np.linalg.norm(resid - a @ la.T @ lb.T) < 0.01 * np.linalg.norm(resid)


def test_gptq_beats_rtn_on_correlated_inputs():
    rng = np.random.default_rng(3)
    a = np.rint(rng.standard_normal((2000, 8)) @ rng.standard_normal((8, 96)) * 0.8).astype(np.float32)
    w = rng.standard_normal((32, 96)).astype(np.float32)
    q_rtn, scale = quant_rows(w)
    q_gptq = gptq_codes(w, a.T @ a, scale)
    err = lambda q: np.linalg.norm(a @ w.T - (a @ q.T.astype(np.float32)) * scale)  # noqa: E731
    assert q_gptq.min() >= -8 and q_gptq.max() <= 7
    assert err(q_gptq) < 0.7 * err(q_rtn)


def kl_to_f16(model: SimModel, f16: SimModel, ids: np.ndarray) -> float:
    ref, lp = log_softmax(f16.forward(ids)), log_softmax(model.forward(ids))
    return float(np.mean(np.sum(np.exp(ref) * (ref - lp), axis=-1)))


def test_mergequant_beats_plain_static(tiny):
    _, ck, calib = tiny
    from tokenizers import Tokenizer
    tok = Tokenizer.from_file(calib["tokenizer"])
    ids = np.asarray(tok.encode(random_text(1, 400), add_special_tokens=False).ids[:4 * 64]).reshape(4, 64)
    f16 = quantize(ck, None)
    plain_model = quantize(ck, "rtn-w4a4-static", **calib)
    plain = kl_to_f16(plain_model, f16, ids)
    # plain static W4A4 has no low-rank branch on any linear (ffn_down's and attn_output's own ranks included)
    assert all(lin.lora_a is None for b in plain_model.blocks for lin in (b.qkv, b.o, b.gate_up, b.down))
    full = quantize(ck, "mergequant", **calib)
    assert kl_to_f16(full, f16, ids) < 0.7 * plain
    assert full.quant["params"]["options"]["rank"] > 0
    off = quantize(ck, "mergequant", no_clip=True, no_split=True, rank=0, gptq=True, **calib)
    opts = off.quant["params"]["options"]
    assert (opts["clip"], opts["split"], opts["rank"], opts["gptq"]) == (False, False, 0, True)
    assert off.blocks[0].qkv.in_map[:, 2].max() == 1
    assert all(lin.lora_a is None for b in off.blocks for lin in (b.qkv, b.o, b.gate_up, b.down))  # rank 0: none


def test_converted_file_simulates_like_memory(tiny, tmp_path):
    ck_files, ck, calib = tiny
    out = convert(ck_files.path, tmp_path / "tiny-mq.mq", method="mergequant", progress=False, **calib)
    ids = np.arange(5, 40)
    from_file = SimModel.from_mq(out)
    assert from_file.quant["method"] == "mergequant"
    rec_file: dict[str, np.ndarray] = {}
    rec_mem: dict[str, np.ndarray] = {}
    logits_file = from_file.forward(ids, rec_file)
    logits_mem = quantize(ck, "mergequant", **calib).forward(ids, rec_mem)
    assert rec_file.keys() == rec_mem.keys()
    for name in rec_file:  # integer codes and accumulators are identical
        assert np.array_equal(rec_file[name], rec_mem[name]), name
    # float GEMMs (low-rank branch, lm_head) may sum in another order for another memory alignment
    assert np.abs(logits_file - logits_mem).max() < 1e-5 * np.abs(logits_mem).max()


def test_error_report_is_held_out_and_exact(tiny, tmp_path):
    """The report's held-out windows change nothing in the fitted model, and its `inputs` error of layer
    0's q/k/v (whose input does not depend on any quantized layer) equals the error recomputed here from
    the stored steps and slots."""
    import json
    from dataclasses import replace

    from mergequant.convert.quant.calibrate import calibration_spec, calibration_tokens
    from mergequant.convert.quant.simulate import rms_factor

    _, ck, calib = tiny
    path = tmp_path / "report.json"
    plain = quantize(ck, "mergequant", **calib)
    reported = quantize(ck, "mergequant", report=str(path), report_n=3, **calib)
    for b0, b1 in zip(plain.blocks, reported.blocks):
        for name in ("qkv", "o", "gate_up", "down"):
            assert np.array_equal(getattr(b0, name).w, getattr(b1, name).w)
            assert np.array_equal(getattr(b0, name).scale, getattr(b1, name).scale)
    rep = json.loads(path.read_text())
    assert len(rep["linears"]) == 4 * ck.config.num_hidden_layers
    assert all(0 < r[k] < 1 for r in rep["linears"] for k in ("weights", "inputs", "both"))

    spec = calibration_spec({k: v for k, v in calib.items() if k != "calib"} | {"calib": calib["calib"]})
    ids = calibration_tokens(replace(spec, n=3, seed=spec.seed + 1), ck)
    h = ck.get("model.embed_tokens.weight").astype(np.float16)[ids].astype(np.float32)
    g1 = ck.get("model.layers.0.input_layernorm.weight")
    x = (h * rms_factor(h, ck.config.rms_norm_eps) * g1).reshape(-1, h.shape[-1]).astype(np.float64)
    blk = reported.blocks[0].qkv
    step = g1 / blk.in_scale
    z = x / step
    src, parts = blk.in_map[:, 0], blk.in_map[:, 2]
    x_hat = np.zeros_like(x)
    for s in np.flatnonzero(src >= 0):  # each slot: floor((t + k) / m) of t = clamp(rint(z), -8m, 7m)
        m = parts[s]
        t = np.clip(np.rint(z[:, src[s]]), -8 * m, 7 * m)
        x_hat[:, src[s]] += np.floor((t + blk.in_map[s, 1]) / m) * step[src[s]]
    w = np.concatenate([ck.get(f"model.layers.0.self_attn.{n}_proj.weight") for n in "qkv"]).astype(np.float64)
    y = x @ w.T
    want = np.sum((y - x_hat @ w.T) ** 2) / np.sum(y ** 2)
    got = next(r for r in rep["linears"] if r["layer"] == 0 and r["linear"] == "attn_qkv")["inputs"]
    assert abs(got - want) <= 1e-3 * want


def linear_problem(rng: np.random.Generator, m: int, k: int, n: int, kp: int):
    """One linear to fit: inputs x [m, k] with channel scales over a decade, weights w [n, k], absmax static steps
    (no split slots, kp - k padding slots) and the input codes a [m, kp]."""
    from mergequant.convert.quant.mergequant import InputQuant

    x = (rng.standard_normal((m, k)) * rng.uniform(0.2, 3, k)).astype(np.float32)
    w = (rng.standard_normal((n, k)) / 8).astype(np.float32)
    step = (np.abs(x).max(axis=0) / 7).astype(np.float32)
    inp = InputQuant(step, build_in_map(np.ones(k, np.int64), kp))
    return x, w, inp, inp.codes(x)


@pytest.mark.parametrize("n", [40, 300])  # the low-rank cross term via (aᵀx)·Wᵀ (n = 300), and from y (n = 40)
def test_lowrank_branch_fits_the_residual_of_the_codes(n):
    """quantize_linear's low-rank branch is the reduced-rank fit of what its int4 weights leave, whichever way it
    forms the cross term: its fitted output matches the float64 closed form (same codes, same Gram matrix)."""
    from mergequant.convert.quant.mergequant import Options, quantize_linear
    from mergequant.convert.quant.simulate_linear import lora_branch

    x, w, inp, a = linear_problem(np.random.default_rng(5), 4000, 64, n, 64)
    lq = quantize_linear(a, x, w, inp, Options(clip=False, split=False, rank=4, gptq=False))
    a64, x64 = a.astype(np.float64), x.astype(np.float64)
    y_q = (a64 @ lq.codes.T.astype(np.float64)) * lq.scale
    resid = x64 @ w.T.astype(np.float64) - y_q
    la, lb = fit_lowrank(a64.T @ a64, a64.T @ resid, 4, 0.01)
    want = (a64 @ la.T.astype(np.float64)) @ lb.T.astype(np.float64)
    got = lora_branch(a, *lq.lora)
    assert np.linalg.norm(got - want) < 1e-2 * np.linalg.norm(want)
    assert np.linalg.norm(resid - got) < np.linalg.norm(resid)  # and it reduces the error


def test_convert_names_its_stages(tiny, tmp_path, capsys):
    """The conversion's progress bar shows the stage that runs (calibration text, each layer's linears)."""
    ck_files, _, calib = tiny
    convert(ck_files.path, tmp_path / "t.mq", method="mergequant", progress=True, **calib)
    err = capsys.readouterr().err
    for stage in ("calibration text", "layer 0: attn_qkv", "layer 0: attention", "layer 0: attn_output",
                  "layer 1: ffn_gate_up", "layer 1: ffn_down"):
        assert stage in err, stage


def test_packaged_calibration_text_is_the_shared_one(shared_data, tiny, monkeypatch):
    """Without the shared data folder (a fresh install) the built-in calibration sets come from the copies shipped
    with the converter: the same bytes, so the same calibration windows and the same converted file."""
    from mergequant.convert.quant.calibrate import (BUILTIN_SETS, PACKAGED_DATA, CalibrationSpec, builtin_set_files,
                                                    calibration_tokens)

    _, ck, calib = tiny
    for name in BUILTIN_SETS["wikitext2+c4"]:
        assert (PACKAGED_DATA / name).read_bytes() == (shared_data / "eval" / name).read_bytes()
    spec = CalibrationSpec("wikitext2+c4", 6, 64, 3, calib["tokenizer"])
    with_shared = calibration_tokens(spec, ck)
    import mergequant.convert.quant.calibrate as calibrate

    def absent():
        raise FileNotFoundError("no shared data")

    monkeypatch.setattr(calibrate, "shared_data_dir", absent)
    assert [p.parent for p in builtin_set_files("wikitext2+c4")] == [PACKAGED_DATA] * 2
    assert np.array_equal(calibration_tokens(spec, ck), with_shared)


@pytest.mark.parametrize("report", [False, True])
def test_layer_stream_is_the_engines(tiny, report):
    """quantize_layer fits every linear on the codes the engine feeds it and returns the block's output itself
    (no second pass): that stream is exactly what the simulator's block_forward computes from the written tensors,
    held-out rows of the error report included."""
    from mergequant.convert.quant.calibrate import calibration_spec, calibration_tokens
    from mergequant.convert.quant.mergequant import Options, quantize_layer
    from mergequant.convert.quant.simulate import block_forward as sim_block_forward

    _, ck, calib = tiny
    spec = calibration_spec(calib)
    ids = calibration_tokens(spec, ck)
    h = ck.get("model.embed_tokens.weight").astype(np.float16)[ids].astype(np.float32)
    cos, sin = rope_cos_sin(ck.config, np.arange(ids.shape[1]))
    rows: list = []
    for i in range(ck.config.num_hidden_layers):
        quant = {"method": "mergequant", "params": {}, "linears": {}}
        _, blk, h_next = quantize_layer(i, h, fused_layer(ck, i), ck.config, Options(), quant,
                                        np.random.default_rng(0), held_out=4 if report else 0,
                                        report=rows if report else None)
        want = sim_block_forward(h, blk, ck.config, cos, sin)
        assert np.array_equal(h_next, want), i
        h = want


def test_mergequant_per_linear_ranks_and_clip_scales(tiny):
    """rank_down / rank_o set those linears' low-rank branches alone; clip_scales only adds range candidates, so
    the layer error of the ranges it picks is never above the ranges picked without it."""
    from mergequant.convert.quant.mergequant import Options, choose_ranges, layer_error
    _, ck, calib = tiny
    m = quantize(ck, "mergequant", rank=4, rank_down=6, rank_o=2, clip_scales="0.9,1.1", **calib)
    b = m.blocks[0]
    assert b.qkv.lora_a.shape[0] == 4 and b.gate_up.lora_a.shape[0] == 4
    assert b.down.lora_a.shape[0] == 6 and b.o.lora_a.shape[0] == 2
    assert tuple(m.quant["params"]["options"]["clip_scales"]) == (0.9, 1.1)
    rng = np.random.default_rng(3)
    x = (rng.standard_normal((1500, 48)) * rng.uniform(0.2, 3, 48)).astype(np.float32)
    x[::50] *= 8  # outlier tokens
    w = (rng.standard_normal((32, 48)) / 8).astype(np.float32)
    parts = np.ones(48, np.int64)
    y = x @ w.T
    base = choose_ranges(x, w, parts, Options(), lambda c: c, y)
    wide = choose_ranges(x, w, parts, Options(clip_scales=(0.8, 0.9, 1.1)), lambda c: c, y)
    assert layer_error(x, y, w, wide, parts) <= layer_error(x, y, w, base, parts)


def test_gptq_and_lowrank_work_in_the_callers_hessian_buffer():
    """The inverse factor GPTQ needs is formed in place: with overwrite_hessian, gptq_quantize allocates nothing of
    the Hessian's size (tracemalloc sees numpy's buffers), its factor is the textbook one (upper Cholesky of H⁻¹),
    and its codes are those of the copying call; fit_lowrank likewise with overwrite; gram_matrix is aᵀa exactly."""
    import tracemalloc
    from mergequant.convert.quant.gptq import gptq_quantize, inverse_upper_cholesky
    from mergequant.convert.quant.mergequant import gram_matrix

    rng = np.random.default_rng(2)
    m, k, n = 3000, 640, 24
    a = np.clip(np.rint(rng.standard_normal((m, k)) * 3), -8, 7).astype(np.float32)
    h = gram_matrix(a, cols=100)
    assert np.array_equal(gram_matrix(a, np.float32), a.T @ a)
    assert np.array_equal(h, (a.T @ a).astype(np.float64))
    ref = np.linalg.cholesky(np.linalg.inv(h + np.eye(k))).T
    u = inverse_upper_cholesky(h + np.eye(k))
    assert np.abs(u - ref).max() < 1e-9 * np.abs(ref).max() and not np.tril(u, -1).any()

    w = (rng.standard_normal((n, k)) / 8).astype(np.float32)
    step = np.abs(w).max(axis=1) / 7
    want = gptq_quantize(w, h, step)  # copies: h is left as it was
    assert np.array_equal(h, (a.T @ a).astype(np.float64))
    buf = h.copy()
    tracemalloc.start()
    tracemalloc.reset_peak()
    got = gptq_quantize(w, buf, step, overwrite_hessian=True)
    peak = tracemalloc.get_traced_memory()[1]
    tracemalloc.stop()
    assert peak < 0.25 * h.nbytes
    assert np.mean(got == want) > 0.999  # the same factor up to rounding in its last bits

    cross = np.asfortranarray(rng.standard_normal((k, n)))
    la, lb = fit_lowrank(h, cross, 4)  # copies
    buf, cross_buf = h.copy(), cross.copy(order="F")
    tracemalloc.start()
    tracemalloc.reset_peak()
    la2, lb2 = fit_lowrank(buf, cross_buf, 4, overwrite=True)
    peak = tracemalloc.get_traced_memory()[1]
    tracemalloc.stop()
    assert peak < 0.25 * h.nbytes
    assert np.allclose(la @ la.T, la2 @ la2.T, rtol=1e-4) and np.allclose(np.abs(lb), np.abs(lb2), atol=1e-5)


@pytest.mark.parametrize("n", [48, 300])  # N ≤ Kp (the cross term from y), N > Kp (via xᵀa, the in-place solve)
def test_float32_gram_path_matches_float64(n, monkeypatch):
    """Above Options.f64_limit the Gram matrix, GPTQ's factor and the low-rank solve are float32 (half the memory
    of a 7B linear), and the work arrays formed in blocks: the fitted linear is the float64 one up to rounding."""
    import mergequant.convert.quant.mergequant as mq
    from mergequant.convert.quant.mergequant import Options, quantize_linear

    monkeypatch.setattr(mq, "LARGE_BYTES", 4096)  # blocks of a few rows
    x, w, inp, a = linear_problem(np.random.default_rng(7), 4000, 96, n, 128)
    y = x @ w.T
    f64 = quantize_linear(a, x, w, inp, Options(rank=4))
    f32 = quantize_linear(a, x, w, inp, Options(rank=4, f64_limit=0))
    assert np.mean(f64.codes == f32.codes) > 0.99
    e64, e32 = (float(np.sum((y - lq.y) ** 2)) for lq in (f64, f32))
    assert abs(e32 - e64) < 0.01 * e64
    rtn = quantize_linear(a, x, w, inp, Options(rank=0, gptq=False))
    assert e32 < 0.97 * float(np.sum((y - rtn.y) ** 2))


def test_lowrank_in_place_solve_matches_the_copying_one():
    """N > K with overwrite and a Fortran-ordered float64 cross term: M and Z take the cross term's memory and
    M·V_r comes from L; the factors are the copying call's."""
    rng = np.random.default_rng(4)
    a = np.rint(rng.standard_normal((2000, 64)) * 3).astype(np.float32)
    resid = a @ (rng.standard_normal((64, 6)) @ rng.standard_normal((6, 200))) + rng.standard_normal((2000, 200))
    gram, cross = (a.T @ a).astype(np.float64), np.asfortranarray((a.T @ resid).astype(np.float64))
    la, lb = fit_lowrank(gram, cross, 4)
    buf, cross_buf = gram.copy(), cross.copy(order="F")
    la2, lb2 = fit_lowrank(buf, cross_buf, 4, overwrite=True)
    assert np.allclose(la.T @ lb.T, la2.T @ lb2.T, rtol=1e-4, atol=1e-6 * np.abs(la.T @ lb.T).max())


@pytest.mark.parametrize("overwrite", [False, True])
def test_act_order_is_gptq_on_the_permuted_problem(overwrite):
    """Act-order (with the Hessian permuted in place under overwrite_hessian) gives the codes of natural-order
    GPTQ on the columns sorted by decreasing diag(H), put back in place; per-row and per-element steps alike."""
    from mergequant.convert.quant.gptq import gptq_quantize, permute_symmetric
    rng = np.random.default_rng(9)
    a = np.rint(rng.standard_normal((1500, 12)) @ rng.standard_normal((12, 80)) * rng.uniform(0.3, 2, 80))
    h = (a.T @ a).astype(np.float64)
    w = rng.standard_normal((20, 80)).astype(np.float32)
    perm = np.argsort(-np.diag(h), kind="stable")
    p = h.copy()
    permute_symmetric(p, perm)
    assert np.array_equal(p, h[np.ix_(perm, perm)])
    for step in (np.abs(w).max(axis=1) / 7, np.abs(w) / 5 + 0.01):
        want = np.empty((20, 80), np.int8)
        want[:, perm] = gptq_quantize(w[:, perm], h[np.ix_(perm, perm)], step if step.ndim == 1 else step[:, perm])
        got = gptq_quantize(w, h.copy(), step, act_order=True, overwrite_hessian=overwrite)
        assert np.mean(got == want) > (0.999 if overwrite else 1.0 - 1e-12), step.ndim


def test_weight_scale_search_in_row_blocks_is_the_same(monkeypatch):
    """A weight above clip.BLOCK_BYTES is searched in blocks of rows (a 7B linear's temporaries): the same steps."""
    import mergequant.convert.quant.clip as clip
    rng = np.random.default_rng(11)
    w = (rng.standard_normal((300, 200)) * rng.uniform(0.1, 3, (300, 1))).astype(np.float32)
    h = rng.uniform(0, 1, 200)
    whole = clip.search_weight_scale(w, h)
    monkeypatch.setattr(clip, "BLOCK_BYTES", 4096)
    assert np.array_equal(clip.search_weight_scale(w, h), whole)


def test_act_clip_search_in_column_blocks_is_the_same(monkeypatch):
    """An input above clip.BLOCK_BYTES is searched in blocks of channels: the same ratios."""
    import mergequant.convert.quant.clip as clip
    rng = np.random.default_rng(12)
    x = (rng.standard_normal((700, 90)) * rng.uniform(0.2, 3, 90)).astype(np.float32)
    x[::37] *= 6
    amax = np.abs(x).max(axis=0)
    parts = rng.integers(1, 3, 90)
    whole = clip.search_act_clip(x, amax, parts, (2.4, 2.0))
    monkeypatch.setattr(clip, "BLOCK_BYTES", 4 * 700 * 16)
    assert np.array_equal(clip.search_act_clip(x, amax, parts, (2.4, 2.0)), whole)


def test_lowrank_float32_in_place_matches_float64():
    """A float32 Gram matrix and a Fortran-ordered float32 cross term with overwrite (a large linear, N ≤ K):
    M and Z in the cross term's memory, M·V_r from L; the branch is the float64 copying fit's up to rounding."""
    rng = np.random.default_rng(6)
    a = np.rint(rng.standard_normal((3000, 120)) * 3).astype(np.float32)
    resid = a @ (rng.standard_normal((120, 5)) @ rng.standard_normal((5, 40))) + rng.standard_normal((3000, 40))
    gram, cross = a.T @ a, (a.T @ resid)
    la, lb = fit_lowrank(gram.astype(np.float64), cross, 4)
    la2, lb2 = fit_lowrank(gram.copy(), np.asfortranarray(cross, np.float32), 4, overwrite=True)
    want, got = la.T @ lb.T, la2.T @ lb2.T
    assert np.abs(got - want).max() < 1e-3 * np.abs(want).max()


@pytest.mark.parametrize("dtype", [np.float64, np.float32])
@pytest.mark.parametrize("act_order", [False, True])
def test_gptq_on_prepared_columns_is_gptq_on_w(dtype, act_order):
    """GPTQ given its working copy made beforehand (working_columns, from diag(H) alone: quantize_linear makes it
    before the Gram matrix exists and drops W̃) gives the codes of GPTQ on W itself, bit for bit, in the float64
    and the float32 (overwrite_hessian) sweep; column_energy is diag(aᵀa) exactly."""
    from mergequant.convert.quant.gptq import gptq_quantize, working_columns
    from mergequant.convert.quant.mergequant import column_energy, gram_matrix

    rng = np.random.default_rng(12)
    a = np.clip(np.rint(rng.standard_normal((2500, 12)) @ rng.standard_normal((12, 150)) * 2), -8, 7)
    a = a.astype(np.float32)
    a[:, 7] = 0  # a column no input reaches
    h = gram_matrix(a, dtype)
    diag = column_energy(a, cols=64)
    assert diag.dtype == np.float64 and np.array_equal(diag, np.diag(h).astype(np.float64))
    w = (rng.standard_normal((30, 150)) / 8).astype(np.float32)
    step = np.abs(w).max(axis=1) / 7
    want = gptq_quantize(w, h.copy(), step, act_order=act_order, overwrite_hessian=True)
    cols = working_columns(w, diag, act_order, dtype)
    got = gptq_quantize(cols, h.copy(), step, act_order=act_order, overwrite_hessian=True)
    assert got.dtype == np.int8 and np.array_equal(got, want)
    with pytest.raises(ValueError):  # a working copy in the other precision is refused, not silently copied
        gptq_quantize(working_columns(w, diag, act_order, np.float32 if dtype == np.float64 else np.float64),
                      h.copy(), step, act_order=act_order, overwrite_hessian=True)


def test_quantize_linear_holds_one_weight_copy_during_gptq(monkeypatch):
    """During GPTQ, quantize_linear holds no [N, Kp] folded weight beside GPTQ's working copy (the 7B peak: W̃ was
    alive twice), unless the error report reads it again; the fit is unchanged by it."""
    import sys
    import mergequant.convert.quant.mergequant as mq
    from mergequant.convert.quant.gptq import Columns
    from mergequant.convert.quant.mergequant import Options, quantize_linear

    x, w, inp, a = linear_problem(np.random.default_rng(8), 3000, 96, 200, 128)
    seen = []
    real = mq.gptq_codes

    def spy(cols, *args, **kw):
        frame = sys._getframe(1)
        assert frame.f_code.co_name == "quantize_linear" and isinstance(cols, Columns)
        held = [name for name, v in frame.f_locals.items()
                if isinstance(v, np.ndarray) and v.ndim == 2 and v.shape == (w.shape[0], a.shape[1])]
        seen.append(held)
        return real(cols, *args, **kw)

    monkeypatch.setattr(mq, "gptq_codes", spy)
    for limit in (Options().f64_limit, 0):  # the float64 and the float32 path
        lq = quantize_linear(a, x, w, inp, Options(rank=4, f64_limit=limit))
        assert seen.pop() == [] and lq.codes.shape == (200, 128)
    quantize_linear(a, x, w, inp, Options(rank=4), fit=2000)  # the error report keeps W̃ for its "inputs" error
    assert seen.pop() != []


@pytest.mark.parametrize("parts_dtype", [np.int64, np.float32])  # a float64 step (as layer_error's), a float32 one
def test_rtn_fold_rows_is_quant_rows_folded_back(parts_dtype, monkeypatch):
    """layer_error's in-place RTN of the folded rows gives the values of quant_rows' codes times its steps over Δ
    bit for bit (zero rows, ties and the float32 rounding of q·s included), and layer_error in row blocks is the
    sum of the blocks' errors of that formula."""
    import mergequant.convert.quant.mergequant as mq
    rng = np.random.default_rng(13)
    w = (rng.standard_normal((70, 90)) * rng.uniform(0.1, 3, (70, 1))).astype(np.float32)
    w[5] = 0
    w[6, :3] = [0.5, -0.5, 1.5]  # halves: ties of rint
    c = np.abs(rng.standard_normal(90)).astype(np.float32) + 0.1
    parts = np.ones(90, parts_dtype)
    parts[:20] = 2
    step = np.where(c > 0, c, 1) / (QMAX * parts)
    q, s = quant_rows(w * step)
    want = q * s[:, None] / step
    got = mq.rtn_fold_rows(w, step)
    assert got.dtype == want.dtype and np.array_equal(got, want) and not np.signbit(got[got == 0]).any()
    x = (rng.standard_normal((300, 90)) * 2).astype(np.float32)
    y = x @ w.T
    x_hat = fake_quant(x, c, parts)
    ref = 0.0
    monkeypatch.setattr(mq, "LARGE_BYTES", 4 * 90 * 16)  # blocks of 16 rows
    for r0 in range(0, 70, 16):
        e = y[:, r0:r0 + 16] - x_hat @ want[r0:r0 + 16].T
        ref += float(np.sum(e * e, dtype=np.float64))
    assert mq.layer_error(x, y, w, c, parts) == ref


def test_top_directions_of_a_float32_z_in_column_blocks(monkeypatch):
    """A float32 Z (the in-place solve of a large linear with N > K) meets float64 eigenvectors in blocks of its
    columns, not as a float64 copy of Z: the factors equal those of the one mixed-precision product."""
    import mergequant.convert.quant.lowrank as lr
    rng = np.random.default_rng(14)
    a = np.rint(rng.standard_normal((3000, 64)) * 3).astype(np.float32)
    resid = (a @ (rng.standard_normal((64, 5)) @ rng.standard_normal((5, 700))) + rng.standard_normal((3000, 700)))
    gram, cross = a.T @ a, np.asfortranarray((a.T @ resid).astype(np.float32))
    solved = lr.ridge_solve(gram.copy(), cross.copy(order="F"), overwrite=True)
    assert solved[2].dtype == np.float32 and solved[4]  # Z in float32, the left (N > K) side
    want = lr.top_directions(*solved, 4)
    monkeypatch.setattr(lr, "GATHER_COLS", 128)  # 6 blocks (multiples of the BLAS blocking, as the default)
    got = lr.top_directions(*lr.ridge_solve(gram.copy(), cross.copy(order="F"), overwrite=True), 4)
    assert all(np.allclose(g, w, rtol=1e-6, atol=1e-7 * np.abs(w).max()) for g, w in zip(got, want))


def test_allocate_layers_spends_the_pool_exactly_and_best():
    """The shared split budget: every unit of the pool is given, each layer keeps its free slots, and no other
    split of the units lowers the weighted noise more (brute force over all of them on a small problem)."""
    import itertools
    from mergequant.convert.quant.split import allocate_layers, greedy_slots
    rng = np.random.default_rng(5)
    gains = []
    for i in range(3):
        ranges = rng.uniform(0.2, 4, 12) * (1 + 20 * (rng.random(12) < 0.1))
        norms = rng.uniform(0.5, 2, 12)
        parts, g = greedy_slots(ranges, norms, 3 + 5 * 2)
        assert np.array_equal(parts, allocate_parts(ranges, norms, 3 + 5 * 2))
        assert np.all(np.diff(g) <= 0) and parts.sum() - 12 == len(g)  # the slots' gains in the order given
        gains.append(g * rng.uniform(0.5, 2))
    out = allocate_layers(gains, free=3, units=5, unit=2)
    assert sum(out) == 3 * 3 + 5 * 2 and all(e >= 3 and (e - 3) % 2 == 0 for e in out)
    dropped = lambda alloc: sum(float(g[:e].sum()) for g, e in zip(gains, alloc))  # noqa: E731
    best = max(dropped([3 + 2 * u for u in us]) for us in itertools.product(range(6), repeat=3) if sum(us) == 5)
    assert dropped(out) == pytest.approx(best, rel=1e-12)
    # equal layers share equally
    assert allocate_layers([gains[0]] * 3, free=3, units=3, unit=2) == [5, 5, 5]
    # a cap: no layer above it, the pool still spent, the best split among the capped ones
    capped = allocate_layers(gains, free=3, units=5, unit=2, cap=2)
    assert sum(capped) == 3 * 3 + 5 * 2 and max(capped) <= 3 + 2 * 2
    best = max(dropped([3 + 2 * u for u in us]) for us in itertools.product(range(3), repeat=3) if sum(us) == 5)
    assert dropped(capped) == pytest.approx(best, rel=1e-12)
    with pytest.raises(ValueError):
        allocate_layers(gains, free=3, units=5, unit=2, cap=1)


def test_alloc_down_keeps_ffn_downs_total_slots(tiny):
    """alloc_down moves ffn_down's split slots between layers: the layers' slots sum to what the budget gives every
    layer (the same int4 bytes), each layer's K + slots a multiple of K_ALIGN, the shares recorded in the recipe;
    the other linears' inputs are those of the default."""
    from mergequant.convert.quant.int4 import pad_k
    from mergequant.convert.quant.split import extra_slots
    _, ck, calib = tiny
    c = ck.config
    base = quantize(ck, "mergequant", budget_down=0.8, **calib)
    m = quantize(ck, "mergequant", budget_down=0.8, alloc_down=True, alloc_probe=2, **calib)
    f = c.intermediate_size
    slots = m.quant["params"]["down_slots"]
    assert m.quant["params"]["options"]["alloc_down"] is True
    assert len(slots) == c.num_hidden_layers
    assert sum(slots) == c.num_hidden_layers * extra_slots(f, 0.8)
    kps = [b.down.in_map.shape[0] for b in m.blocks]
    assert kps == [pad_k(f + e) for e in slots] and sum(kps) == sum(b.down.in_map.shape[0] for b in base.blocks)
    for b0, b1 in zip(base.blocks, m.blocks):
        assert b1.qkv.in_map.shape == b0.qkv.in_map.shape and b1.gate_up.in_map.shape == b0.gate_up.in_map.shape
    with pytest.raises(ValueError, match="alloc_norm"):
        quantize(ck, "mergequant", alloc_down=True, alloc_norm="max", **calib)


def test_clip_refine_lowers_the_output_error_of_the_inputs():
    """refine_act_clip moves the ranges only where the output error of the quantized inputs drops (it is never above
    the start's, and here, with correlated weight columns and outlier tokens, below it), within amax; mergequant's
    clip_refine records the option and leaves the file's shapes alone."""
    from mergequant.convert.quant.clip import refine_act_clip
    rng = np.random.default_rng(7)
    x = (rng.standard_normal((800, 96)) * rng.uniform(0.2, 3, 96)).astype(np.float32)
    x[::40] *= 6
    w = (rng.standard_normal((40, 96)) / 8).astype(np.float32)
    w[:, 10:30] += w[:, 30:50]
    parts = np.ones(96, np.int64)
    parts[:8] = 3
    amax = np.abs(x).max(axis=0)
    c = search_act_clip(x, amax, parts, (2.0,))[0] * amax
    err = lambda r: float(np.sum(((fake_quant(x, r, parts) - x).astype(np.float64) @ w.T) ** 2))  # noqa: E731
    for sweeps in (1, 2):
        r = refine_act_clip(x, w, c, amax, parts, sweeps)
        assert err(r) < err(c) and np.all(r <= amax) and np.all(r >= 0.85 ** sweeps * c * (1 - 1e-6))
    assert np.array_equal(refine_act_clip(x, np.zeros_like(w), c, amax, parts), c)  # no output error: unchanged


def test_clip_refine_option(tiny):
    _, ck, calib = tiny
    base = quantize(ck, "mergequant", **calib)
    m = quantize(ck, "mergequant", clip_refine=1, **calib)
    assert m.quant["params"]["options"]["clip_refine"] == 1
    b0, b1 = base.blocks[0], m.blocks[0]
    assert b1.qkv.in_map.shape == b0.qkv.in_map.shape and not np.array_equal(b1.qkv.in_scale, b0.qkv.in_scale)
