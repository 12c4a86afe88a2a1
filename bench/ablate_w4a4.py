"""W4A4 levers measured by the engine: each row is converted to a .mq file by the converter (timed, under
the caller's nice level) and its WikiText-2 test perplexity is measured by the CPU engine on the first W
non-overlapping windows of L tokens (each a fresh context), beside the f16 file's. Writes (or replaces) its
section of bench/RESULTS.md.

    nice -n 10 python bench/ablate_w4a4.py --rows default,act-order --windows 16 --window 512
    python bench/ablate_w4a4.py --rows default --calib-n 8 --no-write   # a quick look

Rows already measured are kept in bench/ablate_w4a4.json (keyed by row and calibration), so a later run
adds rows to the table instead of recomputing it; --fresh recomputes.
"""
from __future__ import annotations

import argparse
import json
import math
import os
import tempfile
import time
from datetime import date
from pathlib import Path
from typing import Any

import numpy as np
from mergequant import LLM
from results_section import cpu_name, write_section
from mergequant.convert.convert import convert
from mergequant.default_model import default_gguf_path

HERE = Path(__file__).resolve().parent
TEXT = HERE.parent.parent / "shared" / "data" / "eval" / "wiki.test.raw"

# the 2026-12-04 defaults, explicit: the single-lever rows of the 32 x 512 table are measured on top of them
OLD_DEFAULT = {"act_order": False, "rank_down": None, "rank_o": None, "budget_down": 0.2}

# row key → (label, method, method options)
ROWS: dict[str, tuple[str, str | None, dict[str, Any]]] = {
    "f16": ("f16 file", None, {}),
    "w4a16": ("RTN W4A16 (group 128)", "rtn-w4a16", {}),
    "rtn-static": ("RTN W4A4 static (migration only)", "rtn-w4a4-static", {}),
    "before": ("MergeQuant as before (GPTQ in natural order on W̃, rank 16)", "mergequant",
               {"act_order": False, "gptq_target": "w", "rank": 16, "budget_down": None}),
    "no-lowrank": ("MergeQuant without the low-rank branch", "mergequant", {"rank": 0}),
    "rtn-weights": ("MergeQuant with RTN weights (no GPTQ)", "mergequant", {"gptq": False}),
    "act-order": ("+ GPTQ act-order (on the 2026-12-04 defaults)", "mergequant", {**OLD_DEFAULT, "act_order": True}),
    "ridge1": ("+ act-order, GPTQ target: least squares shrunk to W̃ (ridge 1)", "mergequant",
               {"act_order": True, "gptq_target": "ridge", "ridge": 1.0, "budget_down": None}),
    "ridge0.1": ("+ act-order, GPTQ target: least squares shrunk to W̃ (ridge 0.1)", "mergequant",
                 {"act_order": True, "gptq_target": "ridge", "ridge": 0.1}),
    "ls": ("+ act-order, GPTQ target: plain least squares", "mergequant", {"act_order": True, "gptq_target": "ls"}),
    "budget0.1": ("split budget 10% of K (3% before)", "mergequant", {"budget": 0.1, "budget_down": None}),
    "down0.1": ("split budget 10% of K for ffn_down only", "mergequant", {"budget_down": 0.1}),
    "down0.2": ("split budget 20% of K for ffn_down only (the default from 2026-12-02)", "mergequant",
                {"budget_down": 0.2}),
    "down0.35": ("split budget 35% of K for ffn_down only", "mergequant", {**OLD_DEFAULT, "budget_down": 0.35}),
    "down-a8": ("mixed precision: ffn_down in w4a8 (per-token int8 inputs, smoothed α 0.5), not plain W4A4",
                "mergequant", {"down_a8": True}),
    "rank32": ("+ act-order, rank 32", "mergequant", {"act_order": True, "rank": 32}),
    "ls-nat": ("GPTQ target: plain least squares on the int4 inputs, natural column order", "mergequant",
               {**OLD_DEFAULT, "gptq_target": "ls"}),
    "ridge1-nat": ("GPTQ target: least squares shrunk to W̃ (ridge 1), natural column order", "mergequant",
                   {"gptq_target": "ridge", "ridge": 1.0}),
    "rank32-heavy": ("rank 32 for ffn_down and attn_output only (16 elsewhere)", "mergequant",
                     {**OLD_DEFAULT, "rank_down": 32, "rank_o": 32}),
    "clip-scales": ("activation ranges: the chosen ones scaled by 0.8, 0.9, 1.1 tried too (layer error decides)",
                    "mergequant", {**OLD_DEFAULT, "clip_scales": [0.8, 0.9, 1.1]}),
    "damp0.001": ("GPTQ / low-rank damping 0.001 (0.01 before)", "mergequant", {**OLD_DEFAULT, "damp": 0.001}),
    "damp0.1": ("GPTQ / low-rank damping 0.1 (0.01 before)", "mergequant", {"damp": 0.1}),
    "calib64": ("calibration 64 × 512 tokens (twice the default)", "mergequant", {"calib_n": 64}),
    "d0-down0.35": ("split only ffn_down's input, 35% of K (qkv / gate_up inputs unsplit)", "mergequant",
                    {"budget": 0.0, "budget_down": 0.35}),
    "d0-down0.5": ("split only ffn_down's input, 50% of K (about the default's int4 bytes)", "mergequant",
                   {"budget": 0.0, "budget_down": 0.5}),
    "clip-sample8k": ("activation range searches on 8192 sampled tokens (2048 before)", "mergequant",
                      {"clip_sample": 8192}),
    "d0-down0.2": ("split only ffn_down's input, 20% of K (5% int4 bytes over plain W4A4)", "mergequant",
                   {"budget": 0.0, "budget_down": 0.2}),
    "combo-down0.35": ("act-order + rank 32 for ffn_down / attn_output + ffn_down split 35% (the 2026-12-05 "
                       "default's options and file)", "mergequant",
                       {"act_order": True, "rank_down": 32, "rank_o": 32, "budget_down": 0.35}),
    "combo-d0-down0.5": ("act-order + rank 32 for ffn_down / attn_output + only ffn_down split, 50% (the old "
                         "default's int4 bytes)", "mergequant",
                         {"act_order": True, "rank_down": 32, "rank_o": 32, "budget": 0.0, "budget_down": 0.5}),
    "default-r3": ("the 2026-12-04 default options on recipe 3 (GPTQ's factor and the low-rank solve in place)",
                   "mergequant", OLD_DEFAULT),
    "budget0.12": ("the 2026-12-05 default + 128 split slots for the q/k/v and gate/up inputs (budget 0.12; 64 at "
                   "0.03)", "mergequant", {"budget": 0.12}),
    "rank64-heavy": ("the 2026-12-05 default with rank 64 for ffn_down and attn_output (32 before; 16 elsewhere)",
                     "mergequant", {"rank_down": 64, "rank_o": 64}),
    "down0.5": ("the 2026-12-05 default with ffn_down's split budget 50% (35% before)", "mergequant",
                {"budget_down": 0.5}),
    "b0.12-down0.5": ("the 2026-12-05 default with 128 split slots for q/k/v and gate/up (budget 0.12) and ffn_down's "
                      "split budget 50%", "mergequant", {"budget": 0.12, "budget_down": 0.5}),
    "default-1204": ("MergeQuant default of 2026-12-04 (main 210f76c: natural GPTQ order, rank 16, ffn_down split 20%)",
                     "mergequant", OLD_DEFAULT),
    "default": ("MergeQuant default (2026-12-08, recipe 5: act-order, rank 32 at ffn_down / attn_output, ffn_down's "
                "split slots, 35% of K per layer in all, shared by the layers from a float probe of 8 sequences)",
                "mergequant", {}),
    "default-r4": ("MergeQuant default of 2026-12-05 (recipe 4: act-order, rank 32 at ffn_down / attn_output, "
                   "ffn_down split 35% in every layer)", "mergequant", {"alloc_down": False}),
    "alloc-down": ("the 2026-12-05 default with ffn_down's split slots shared by the layers (the same total; each "
                   "layer's share by the noise model on a float probe of 4 sequences, weighed by the residual "
                   "stream's energy)", "mergequant", {"alloc_down": True, "alloc_probe": 4}),
    "alloc-down-abs": ("as alloc-down, the layers' noise weighed as it is (not by the residual stream's energy)",
                       "mergequant", {"alloc_down": True, "alloc_norm": "abs", "alloc_probe": 4}),
    "alloc-down-cap2": ("as alloc-down, no layer's ffn_down above twice the even share of split slots", "mergequant",
                        {"alloc_down": True, "alloc_cap": 2.0, "alloc_probe": 4}),
    "alloc-down-probe8": ("as alloc-down, the probe on 8 calibration sequences (4): a replicate with a nearby "
                          "allocation", "mergequant", {"alloc_down": True, "alloc_probe": 8}),
    "alloc-down-damp0.1": ("alloc-down with GPTQ / low-rank damping 0.1 (0.01)", "mergequant",
                           {"alloc_down": True, "alloc_probe": 4, "damp": 0.1}),
    "clip-refine": ("the 2026-12-05 default with the split inputs' ranges refined per channel against the linear's "
                    "output error (one sweep of c·0.85 … 1.15)", "mergequant", {"clip_refine": 1, "alloc_down": False}),
}

# the rows measured before recipe 5 (2026-12-08) ran with ffn_down's split budget in every layer alike
for _key in ("before", "no-lowrank", "rtn-weights", "act-order", "ridge1", "ridge0.1", "ls", "budget0.1", "down0.1",
             "down0.2", "down0.35", "down-a8", "rank32", "ls-nat", "ridge1-nat", "rank32-heavy", "clip-scales",
             "damp0.001", "damp0.1", "calib64", "d0-down0.35", "d0-down0.5", "clip-sample8k", "d0-down0.2",
             "combo-down0.35", "combo-d0-down0.5", "default-r3", "budget0.12", "rank64-heavy", "down0.5",
             "b0.12-down0.5", "default-1204"):
    ROWS[_key] = (ROWS[_key][0], ROWS[_key][1], {**ROWS[_key][2], "alloc_down": False})


def markers(calib_n: int, calib_len: int) -> tuple[str, str]:
    """The section's begin/end markers: one section per calibration size (the 8 × 256 one kept its first
    markers), so a table at another calibration is added at the end of RESULTS.md instead of replacing it."""
    if (calib_n, calib_len) == (8, 256):
        return "<!-- ablate_w4a4:begin -->", "<!-- ablate_w4a4:end -->"
    return f"<!-- ablate_w4a4 {calib_n}x{calib_len}:begin -->", f"<!-- ablate_w4a4 {calib_n}x{calib_len}:end -->"


def engine_ppl(path: Path, ids: list[int], windows: int, window: int) -> float:
    llm = LLM(str(path), device="cpu")
    nll = 0.0
    for w in range(windows):
        nll -= float(llm.token_logprobs(ids[w * window:(w + 1) * window]).sum())
    return math.exp(nll / (windows * (window - 1)))


def linear_bytes(path: Path) -> dict[str, int] | None:
    """The int4 weight bytes of a W4A4 file's block linears (qweight), those plain static W4A4 would store
    (N × K padded to the kernels' multiple, K the linear's source channels, no split slots), and the low-rank
    factors' bytes; None for a file without w4a4 linears."""
    from mergequant.convert.mqfile import read_mq
    from mergequant.convert.quant.int4 import pad_k
    mq = read_mq(path)
    names = set(mq.names())
    out = {"int4": 0, "plain": 0, "lora": 0}
    for name in names:
        if not (name.startswith("blk.") and name.endswith(".qweight")):
            continue
        prefix = name[: -len(".qweight")]
        if prefix + ".in_map" not in names and prefix + ".scale" not in names:
            continue
        n, half = mq.shape(name)
        out["int4"] += mq.nbytes(name)
        if prefix + ".in_map" in names:
            in_map = mq.tensor(prefix + ".in_map")
            k = int(np.sum((in_map[:, 0] >= 0) & (in_map[:, 1] == 0)))
        else:
            k = 2 * half
        out["plain"] += n * pad_k(k) // 2
        for f in (".lora_a", ".lora_b"):
            if prefix + f in names:
                out["lora"] += mq.nbytes(prefix + f)
    return out if out["plain"] else None


def markdown(rows: list[str], done: dict[str, dict[str, Any]], args: argparse.Namespace) -> str:
    f16 = done["f16"]["ppl"]
    begin, end = markers(args.calib_n, args.calib_len)
    lines = [
        f"## W4A4 levers measured by the engine: SmolLM2-135M-Instruct, {args.calib_n} × {args.calib_len} "
        f"calibration ({date.today()})", "",
        f"Command: `nice -n {os.nice(0)} python bench/ablate_w4a4.py --rows {','.join(rows)} --windows {args.windows} "
        f"--window {args.window} --calib-n {args.calib_n} --calib-len {args.calib_len}` (rows in the cache, "
        "bench/ablate_w4a4.json, are not recomputed: the rows were converted by earlier calls of the same command on "
        "the code of their commits)  ",
        f"Text: WikiText-2 test raw, the first {args.windows} windows of {args.window} tokens, each a fresh context; "
        "perplexity by the CPU engine (`LLM(..., device='cpu').token_logprobs`) on the converted file. "
        f"Calibration: {args.calib_n} × {args.calib_len} tokens (WikiText-2 validation + C4 sample, seed 0). "
        f"Convert: wall time of `convert()` under nice on {os.cpu_count()} CPU cores "
        f"({cpu_name()}) shared with other jobs (load from several other processes): direction only.", "",
        "int4 bytes: the block linears' int4 weights against plain static W4A4's (no split slots); "
        "low-rank: the fp16 factors' bytes (— : not recorded for the row).", "",
        "| row | options | PPL | ×f16 | int4 bytes vs plain | low-rank MB | convert (s) |",
        "|---|---|---|---|---|---|---|",
    ]
    for key in rows:
        r = done[key]  # (the label and options as ROWS states them now; the numbers as measured)
        opts = ", ".join(f"{k}={v}" for k, v in ROWS[key][2].items()) or "—"
        b = r.get("bytes")
        ratio = f"{b['int4'] / b['plain']:.3f}" if b else "—"
        lora = f"{b['lora'] / 1e6:.2f}" if b else "—"
        lines.append(f"| {ROWS[key][0]} | {r['method'] or 'f16'}: {opts} | {r['ppl']:.2f} | {r['ppl'] / f16:.2f} | "
                     f"{ratio} | {lora} | {r['seconds']:.0f} |")
    return "\n".join([begin, *lines, end]) + "\n"



def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--rows", default="f16,default", help=f"comma-separated subset of {','.join(ROWS)}")
    ap.add_argument("--windows", type=int, default=16)
    ap.add_argument("--window", type=int, default=512)
    ap.add_argument("--calib-n", type=int, default=32)
    ap.add_argument("--calib-len", type=int, default=512)
    ap.add_argument("--cache", type=Path, default=HERE / "ablate_w4a4.json")
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
    ids = None
    with tempfile.TemporaryDirectory() as tmp:
        for key in rows:
            label, method, opts = ROWS[key]
            ckey = f"{key}@{tag}"
            if ckey in cache:
                continue
            calib = {"calib_n": args.calib_n, "calib_len": args.calib_len} if method in ("mergequant",
                                                                                         "rtn-w4a4-static") else {}
            calib |= {k: v for k, v in opts.items() if k in ("calib_n", "calib_len")}  # a row's own calibration
            opts = {k: v for k, v in opts.items() if k not in calib}
            out = Path(tmp) / f"{key}.mq"
            t0 = time.perf_counter()
            convert(src, out, method=method, progress=True, **opts, **calib)
            seconds = time.perf_counter() - t0
            if ids is None:
                ids = LLM(str(out), device="cpu").tokenize(TEXT.read_text(encoding="utf-8"), add_special=False)
            ppl = engine_ppl(out, ids, args.windows, args.window)
            cache[ckey] = {"label": label, "method": method, "options": ROWS[key][2], "ppl": ppl, "seconds": seconds,
                           "bytes": linear_bytes(out)}
            print(f"{key}: PPL {ppl:.3f}, converted in {seconds:.0f} s", flush=True)
            args.cache.write_text(json.dumps(cache, indent=1, ensure_ascii=False) + "\n")
            out.unlink()
    section = markdown(rows, {k: cache[f"{k}@{tag}"] for k in rows}, args)
    print(section)
    if not args.no_write:
        write_section(args.results, section, *markers(args.calib_n, args.calib_len))


if __name__ == "__main__":
    main()
