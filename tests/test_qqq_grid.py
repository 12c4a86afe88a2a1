"""The searched w4a8g grid (quant/int4.qqq_grid_search, qqq's `grid="mse"`): its codes and group scales lie
in the scheme's ranges, no row's squared rounding error exceeds the ceil rule's (int4.qqq_grid), a brute-force
loop over every channel-scale candidate and every group scale picks the same grid, and a qqq file written
with it holds exactly that grid (gscale, scale) and its codes."""
from __future__ import annotations

import numpy as np
import pytest

from mergequant.convert.layers import fused_layer
from mergequant.convert.loaders import load_checkpoint
from mergequant.convert.mqfile import read_mq
from mergequant.convert.quant.int4 import (QQQ_SHRINKS, qqq_grid, qqq_grid_search, quant_qqq, unpack_int4,
                                           w4a8g_grid)
from mergequant.convert.quant.methods import quantize


def heavy_tailed(n: int, k: int, seed: int) -> np.ndarray:
    """Student-t (3 degrees of freedom) rows of varied magnitude, a few planted outlier weights, a zero row."""
    rng = np.random.default_rng(seed)
    w = rng.standard_t(3, (n, k)) * np.exp(rng.normal(0, 1, (n, 1))) * 0.02
    w[rng.integers(0, n, 6), rng.integers(0, k, 6)] *= 25
    w[n // 2] = 0
    return w.astype(np.float32)


def row_errors(w: np.ndarray, group: int, gscale: np.ndarray, scale: np.ndarray) -> np.ndarray:
    """sum_k (W - q·g·s)² per row in float64, q by quant_qqq on the given grid."""
    q, _, _ = quant_qqq(w, group, gscale, scale)
    deq = q.astype(np.float64) * np.repeat(gscale.astype(np.float64), group, axis=1) * scale[:, None]
    return ((w.astype(np.float64) - deq) ** 2).sum(axis=1)


@pytest.mark.parametrize("n,k,group", [(96, 512, 128), (64, 576, 64)])
def test_search_ranges_and_no_row_worse_than_ceil(n, k, group):
    w = heavy_tailed(n, k, seed=n + k)
    g, s = qqq_grid_search(w, group)
    assert g.shape == (n, k // group) and g.dtype == np.uint8 and s.shape == (n,) and s.dtype == np.float32
    assert g.min() >= 1 and g.max() <= 16
    q, _, _ = quant_qqq(w, group, g, s)
    assert q.min() >= -8 and q.max() <= 7
    assert s[n // 2] == 0 and np.all(g[n // 2] == 1) and np.all(q[n // 2] == 0)
    searched = row_errors(w, group, g, s)
    ceil = row_errors(w, group, *qqq_grid(w, group))
    assert np.all(searched <= ceil * (1 + 1e-6))
    # the search is worth something on heavy tails: most rows strictly better, the total clearly lower
    assert np.mean(searched < ceil * (1 - 1e-6)) > 0.8
    assert searched.sum() < 0.85 * ceil.sum()
    # channel scales are the candidates c·max|W|/112, some below 1 (the row's largest weights clipped)
    ratio = s[s > 0] / (np.abs(w[s > 0]).max(axis=1) / np.float32(112))
    assert np.all(np.min(np.abs(ratio[:, None] - np.asarray(QQQ_SHRINKS)[None]), axis=1) < 1e-6)
    assert np.any(ratio < 0.99)


def brute_force(w: np.ndarray, group: int, shrinks) -> tuple[np.ndarray, np.ndarray]:
    """Every row, every candidate channel scale, every group, every g in [1, 16], one at a time."""
    n, k = w.shape
    gs, ss = np.ones((n, k // group), np.uint8), np.zeros(n, np.float32)
    for r in range(n):
        s0 = np.float32(np.abs(w[r]).max() / np.float32(112))
        if s0 == 0:
            continue
        best = np.inf
        for c in shrinks:
            s = np.float32(s0 * np.float32(c))
            choice, total = [], 0.0
            for j in range(k // group):
                x = w[r, j * group:(j + 1) * group].astype(np.float32)
                errs = []
                for g in range(1, 17):
                    step = np.float32(s * np.float32(g))
                    q = np.clip(np.rint(x / step), -8, 7)
                    errs.append(float(np.sum((x.astype(np.float64) - q * np.float64(step)) ** 2)))
                choice.append(int(np.argmin(errs)) + 1)
                total += min(errs)
            if total < best * (1 - 1e-9):
                best, gs[r], ss[r] = total, choice, s
    return gs, ss


def test_search_matches_brute_force():
    w = heavy_tailed(12, 256, seed=7)
    g, s = qqq_grid_search(w, 64)
    bg, bs = brute_force(w, 64, QQQ_SHRINKS)
    np.testing.assert_array_equal(s, bs)
    np.testing.assert_array_equal(g, bg)
    # a candidate list of one (c = 1) is the per-group best g at qqq_grid's channel scale
    g1, s1 = qqq_grid_search(w, 64, shrinks=(1.0,))
    bg1, bs1 = brute_force(w, 64, (1.0,))
    np.testing.assert_array_equal(s1, bs1)
    np.testing.assert_array_equal(g1, bg1)
    np.testing.assert_array_equal(s1, qqq_grid(w, 64)[1])


def test_grid_rule_names():
    w = heavy_tailed(8, 128, seed=3)
    for a, b in zip(w4a8g_grid(w, 64, "ceil"), qqq_grid(w, 64)):
        np.testing.assert_array_equal(a, b)
    for a, b in zip(w4a8g_grid(w, 64, "mse"), qqq_grid_search(w, 64)):
        np.testing.assert_array_equal(a, b)
    with pytest.raises(ValueError, match="grid must be one of"):
        w4a8g_grid(w, 64, "max")
    with pytest.raises(ValueError, match="not a multiple"):
        qqq_grid_search(w, 48)


@pytest.mark.parametrize("gptq", [False, True])
def test_qqq_file_holds_the_searched_grid(tiny_hf_checkpoint, tmp_path, gptq):
    """qqq g128 without smoothing writes each linear's grid as the search chose it on the checkpoint's
    weight (GPTQ keeps the grid and changes codes only); the RTN file's codes are quant_qqq's on it."""
    from mergequant.convert import convert
    ck_files = tiny_hf_checkpoint()
    text = tmp_path / "calib.txt"
    text.write_text(" ".join(["the river city music year first game team war state"] * 300))
    out = convert(ck_files.path, tmp_path / "qqq.mq", method="qqq", group_size=128, no_smooth=True, gptq=gptq,
                  calib=str(text), tokenizer=str(ck_files.path / "tokenizer.json"), calib_n=4, calib_len=32,
                  progress=False)
    f = read_mq(out)
    assert f.quant["params"]["options"]["grid"] == "mse"
    ck = load_checkpoint(ck_files.path)
    checked = 0
    for i in range(ck.config.num_hidden_layers):
        for name, w in fused_layer(ck, i).items():
            if name.endswith(".weight"):
                continue
            group = 128 if w.shape[1] % 128 == 0 else 64
            g, s = qqq_grid_search(w, group)
            np.testing.assert_array_equal(f.tensor(name + ".gscale"), g, err_msg=name)
            np.testing.assert_array_equal(f.tensor(name + ".scale"), s, err_msg=name)
            codes = unpack_int4(f.tensor(name + ".qweight"))
            rtn, _, _ = quant_qqq(w, group, g, s)
            if gptq:
                assert codes.min() >= -8 and codes.max() <= 7 and np.any(codes != rtn), name
            else:
                np.testing.assert_array_equal(codes, rtn, err_msg=name)
            checked += 1
    assert checked == 4 * ck.config.num_hidden_layers


def test_qqq_grid_argument_checked(tiny_hf_checkpoint):
    ck = load_checkpoint(tiny_hf_checkpoint().path)
    with pytest.raises(ValueError, match="grid must be one of"):
        quantize(ck, "qqq", group_size=128, grid="max")
    with pytest.raises(ValueError, match="smooth_grid must be"):
        quantize(ck, "qqq", group_size=128, smooth_grid="mse")


@pytest.mark.parametrize("grid,smooth_grid,seen", [("mse", "same", {"mse"}), ("ceil", "same", {"ceil"}),
                                                   ("mse", "ceil", {"ceil"})])
def test_smoothing_search_rounds_on_the_recorded_grid(tiny_hf_checkpoint, tmp_path, monkeypatch, grid, smooth_grid,
                                                      seen):
    """The smoothing search's fake weights use the written grid unless smooth_grid="ceil"; both are recorded."""
    from mergequant.convert.quant import qqq as qqq_module
    calls: list = []
    real = qqq_module.fake_weight
    monkeypatch.setattr(qqq_module, "fake_weight", lambda w, scheme, g="ceil": calls.append(g) or real(w, scheme, g))
    ck_files = tiny_hf_checkpoint()
    text = tmp_path / "calib.txt"
    text.write_text(" ".join(["the river city music year first game team war state"] * 300))
    out = quantize(load_checkpoint(ck_files.path), "qqq", group_size=128, smooth_steps=3, grid=grid,
                   smooth_grid=smooth_grid, calib=str(text), tokenizer=str(ck_files.path / "tokenizer.json"),
                   calib_n=4, calib_len=32)
    assert set(calls) == seen and len(calls) == 3 * 4 * 2  # 3 thresholds, 4 points, 2 layers
    opts = out.quant["params"]["options"]
    assert (opts["grid"], opts["smooth_grid"]) == (grid, smooth_grid)
