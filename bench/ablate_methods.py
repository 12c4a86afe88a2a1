"""The methods on the float-input schemes (gptq-w4a16, smoothquant, qqq, fptq, outliertune; docs/methods.md) and their ablations,
measured by the engine: each row is converted to a .mq file by the converter (timed, under the caller's nice
level), then the CPU engine computes its WikiText-2 test perplexity on the first W non-overlapping windows of
L tokens (each a fresh context) and the mean KL divergence KL(P_f16 ‖ P_row) per predicted token from the f16
file's next-token distributions on the same windows. Writes (or replaces) its section of bench/RESULTS.md.

    nice -n 10 python bench/ablate_methods.py --rows gptq-w4a16,smoothquant,qqq-g128 --windows 16 --window 512
    python bench/ablate_methods.py --rows smoothquant --calib-n 4 --no-write     # a quick look

Rows already measured are kept in bench/ablate_methods.json (keyed by row, calibration and windows), so a
later run adds rows to the table instead of recomputing it; --fresh recomputes.
"""
from __future__ import annotations

import argparse
import json
import math
import os
import platform
import tempfile
import time
from datetime import date
from pathlib import Path
from typing import Any

import numpy as np
from tqdm import tqdm

from mergequant import LLM
from results_section import write_section
from mergequant.convert.convert import convert
from mergequant.default_model import default_gguf_path

HERE = Path(__file__).resolve().parent
TEXT = HERE.parent.parent / "shared" / "data" / "eval" / "wiki.test.raw"

# row key → (label, method, method options, scheme for a plain RTN row)
ROWS: dict[str, tuple[str, str | None, dict[str, Any]]] = {
    "f16": ("f16 file", None, {}),
    "rtn-w4a16": ("RTN W4A16 (w4a16g)", "rtn-w4a16", {}),
    "gptq-w4a16": ("GPTQ W4A16 (w4a16g; act-order, static groups)", "gptq-w4a16", {}),
    "gptq-w4a16-natural": ("GPTQ W4A16, natural column order", "gptq-w4a16", {"act_order": False}),
    "rtn-w8a8": ("RTN W8A8 per-token (smoothquant, no smoothing)", "smoothquant", {"no_smooth": True}),
    "smoothquant": ("SmoothQuant W8A8 (α 0.5, all four points)", "smoothquant", {}),
    "smoothquant-norms": ("SmoothQuant W8A8, norm-fed points only (as published)", "smoothquant",
                          {"o_smooth": "skip", "down_smooth": "skip"}),
    "smoothquant-w6a6": ("SmoothQuant W6A6", "smoothquant", {"bits": 6}),
    "rtn-w4a8": ("RTN W4A8 per-channel (qqq, no smoothing, no GPTQ)", "qqq", {"no_smooth": True, "gptq": False}),
    "qqq-nosmooth": ("QQQ per-channel without smoothing (GPTQ only)", "qqq", {"no_smooth": True}),
    "qqq": ("QQQ W4A8 per-channel (w4a8)", "qqq", {}),
    "qqq-oskip": ("QQQ per-channel, o_proj point skipped (as published for GQA)", "qqq", {"o_smooth": "skip"}),
    "rtn-w4a8g": ("RTN W4A8 g128 (qqq, no smoothing, no GPTQ; ceil grid)", "qqq",
                  {"group_size": 128, "no_smooth": True, "gptq": False, "grid": "ceil"}),
    "rtn-w4a8g-mse": ("RTN W4A8 g128 (qqq, no smoothing, no GPTQ; mse grid)", "qqq",
                      {"group_size": 128, "no_smooth": True, "gptq": False, "grid": "mse"}),
    "qqq-g128": ("QQQ W4A8 group 128 (w4a8g; the defaults: mse grid, smoothing searched on the ceil grid)", "qqq",
                 {"group_size": 128}),
    "qqq-g128-40-ceil": ("QQQ W4A8 group 128 (w4a8g), 40 thresholds per point, ceil grid", "qqq",
                         {"group_size": 128, "smooth_steps": 40, "grid": "ceil"}),
    "qqq-g128-40-mse": ("QQQ W4A8 group 128 (w4a8g), 40 thresholds per point, mse grid, smoothing searched on it", "qqq",
                        {"group_size": 128, "smooth_steps": 40, "grid": "mse", "smooth_grid": "same"}),
    "qqq-g128-40-mse-ceilsearch": ("QQQ W4A8 group 128 (w4a8g), 40 thresholds, mse grid, smoothing searched on the ceil grid",
                                   "qqq", {"group_size": 128, "smooth_steps": 40, "grid": "mse", "smooth_grid": "ceil"}),
    "qqq-40": ("QQQ W4A8 per-channel (w4a8), 40 thresholds per point", "qqq", {"smooth_steps": 40}),
    "fptq": ("FPTQ W4A8 g128 (w4a8g; LAE with the v0/v1 policy, RTN)", "fptq", {}),
    "outliertune": ("OutlierTune W8A8 (w8a8s static per-channel q/k/v, gate/up with shift; o/down per-token)",
                    "outliertune", {}),
    "outliertune-noshift": ("OutlierTune W8A8 without symmetrization", "outliertune", {"shift": False}),
    "outliertune-static": ("OutlierTune W8A8, o/down static per-channel too", "outliertune", {"static_od": True}),
    "outliertune-w6a6": ("OutlierTune W6A6", "outliertune", {"bits": 6}),
    "outliertune-w6a6-gptq": ("OutlierTune W6A6, GPTQ weights", "outliertune", {"bits": 6, "gptq": True}),
    "outliertune-w6a6-static": ("OutlierTune W6A6, o/down static per-channel too", "outliertune",
                                {"bits": 6, "static_od": True}),
}
CALIBRATED = {"gptq-w4a16", "smoothquant", "qqq", "fptq", "outliertune"}
BEGIN, END = "<!-- ablate_methods:begin -->", "<!-- ablate_methods:end -->"


def engine_eval(path: Path, base: list[np.ndarray] | None, windows: list[list[int]]) -> tuple[float, float]:
    """(perplexity, mean KL(P_base ‖ P_model) per predicted token; 0 without a base) by the CPU engine;
    `base`: the f16 file's log-probabilities of every window (computed once, by the engine)."""
    llm = LLM(str(path), device="cpu")
    nll, kl, count = 0.0, 0.0, 0
    for w, win in enumerate(tqdm(windows, desc=f"eval {path.stem}", unit="window")):
        lq = llm.log_probs(win)[:-1]
        nll -= float(lq[np.arange(len(lq)), win[1:]].sum(dtype=np.float64))
        if base is not None:
            lp = base[w]
            kl += float((np.exp(lp) * (lp - lq)).sum(dtype=np.float64))
        count += len(lq)
    return math.exp(nll / count), kl / count


def markdown(rows: list[str], done: dict[str, dict[str, Any]], args: argparse.Namespace) -> str:
    f16 = done["f16"]["ppl"]
    lines = [
        f"## Methods on the float-input schemes measured by the engine: SmolLM2-135M-Instruct ({date.today()})", "",
        f"Command: `nice -n {os.nice(0)} python bench/ablate_methods.py --rows {','.join(rows)} --windows {args.windows} "
        f"--window {args.window} --calib-n {args.calib_n} --calib-len {args.calib_len}`  ",
        f"Text: WikiText-2 test raw, the first {args.windows} windows of {args.window} tokens, each a fresh context; "
        "perplexity and KL(P_f16 ‖ P_row) (mean per predicted token, nats) by the CPU engine "
        "(`LLM(..., device='cpu').log_probs`) on the converted files. "
        f"Calibration (calibrated methods): {args.calib_n} × {args.calib_len} tokens (WikiText-2 validation + C4 "
        f"sample, seed 0). Convert: wall time of `convert()` under nice {os.nice(0)} on "
        f"{os.cpu_count()} CPU cores ({platform.machine()}) shared with other jobs: direction only. Size: the file.", "",
        "| row | method: options | PPL | ×f16 | KL | convert (s) | size (MB) |", "|---|---|---|---|---|---|---|",
    ]
    for key in rows:
        r = done[key]
        opts = ", ".join(f"{k}={v}" for k, v in r["options"].items()) or "—"
        lines.append(f"| {r['label']} | {r['method'] or 'f16'}: {opts} | {r['ppl']:.2f} | {r['ppl'] / f16:.3f} | "
                     f"{r['kl']:.4f} | {r['seconds']:.0f} | {r['bytes'] / 1e6:.1f} |")
    return "\n".join([BEGIN, *lines, END]) + "\n"



def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--rows", default="f16,gptq-w4a16", help=f"comma-separated subset of {','.join(ROWS)}")
    ap.add_argument("--windows", type=int, default=16)
    ap.add_argument("--window", type=int, default=512)
    ap.add_argument("--calib-n", type=int, default=16)
    ap.add_argument("--calib-len", type=int, default=512)
    ap.add_argument("--cache", type=Path, default=HERE / "ablate_methods.json")
    ap.add_argument("--fresh", action="store_true", help="recompute rows already in the cache")
    ap.add_argument("--results", type=Path, default=HERE / "RESULTS.md")
    ap.add_argument("--no-write", action="store_true", help="print the table only")
    args = ap.parse_args()
    rows = [r for r in args.rows.split(",") if r]
    unknown = set(rows) - ROWS.keys()
    if unknown:
        raise SystemExit(f"unknown rows {sorted(unknown)}; known: {', '.join(ROWS)}")
    rows = ["f16"] + [r for r in rows if r != "f16"]
    src = default_gguf_path()
    cache = json.loads(args.cache.read_text()) if args.cache.exists() and not args.fresh else {}
    tag = f"{args.calib_n}x{args.calib_len}/{args.windows}x{args.window}"
    with tempfile.TemporaryDirectory() as tmp:
        f16_path = Path(tmp) / "f16.mq"
        t0 = time.perf_counter()
        convert(src, f16_path, progress=False)
        f16_seconds = time.perf_counter() - t0
        f16 = LLM(str(f16_path), device="cpu")
        ids = f16.tokenize(TEXT.read_text(encoding="utf-8"), add_special=False)
        windows = [ids[w * args.window:(w + 1) * args.window] for w in range(args.windows)]
        base: list[np.ndarray] | None = None
        if any(f"{k}@{tag}" not in cache for k in rows if k != "f16"):
            base = [f16.log_probs(win)[:-1] for win in tqdm(windows, desc="f16 log-probs", unit="window")]
        for key in rows:
            label, method, opts = ROWS[key]
            ckey = f"{key}@{tag}"
            if ckey in cache:
                continue
            if key == "f16":
                out, seconds = f16_path, f16_seconds
            else:
                calib = {"calib_n": args.calib_n, "calib_len": args.calib_len} if method in CALIBRATED else {}
                out = Path(tmp) / f"{key}.mq"
                t0 = time.perf_counter()
                convert(src, out, method=method, progress=True, **opts, **calib)
                seconds = time.perf_counter() - t0
            ppl, kl = engine_eval(out, None if key == "f16" else base, windows)
            cache[ckey] = {"label": label, "method": method, "options": opts, "ppl": ppl, "kl": kl,
                           "seconds": seconds, "bytes": out.stat().st_size, "date": str(date.today())}
            print(f"{key}: PPL {ppl:.3f}, KL {kl:.4f}, converted in {seconds:.0f} s", flush=True)
            args.cache.write_text(json.dumps(cache, indent=1, ensure_ascii=False) + "\n")
            if out != f16_path:
                out.unlink()
    section = markdown(rows, {k: cache[f"{k}@{tag}"] for k in rows}, args)
    print(section)
    if not args.no_write:
        write_section(args.results, section, BEGIN, END)


if __name__ == "__main__":
    main()
