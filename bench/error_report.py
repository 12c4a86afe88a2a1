"""The per-linear error report of a MergeQuant conversion (`mergequant convert ... --method mergequant
--report FILE`) as a RESULTS.md section: for every linear, the relative output error ‖y − ŷ‖²/‖y‖² on the
held-out calibration windows from its weights alone, its input quantization alone, and both (the linear as
stored), y = x·Wᵀ on the fp input from the quantized stream; then the mean per linear kind.

    python bench/error_report.py REPORT.json --command "mergequant convert ..." [--write]
"""
from __future__ import annotations

import argparse
import json
import re
from collections import defaultdict
from datetime import date
from pathlib import Path

HERE = Path(__file__).resolve().parent
BEGIN, END = "<!-- error_report:begin -->", "<!-- error_report:end -->"
KINDS = ("attn_qkv", "attn_output", "ffn_gate_up", "ffn_down")


def markdown(rep: dict, command: str) -> str:
    rows = rep["linears"]
    cal = rep["calibration"]
    by_kind: dict[str, list[dict]] = defaultdict(list)
    for r in rows:
        by_kind[r["linear"]].append(r)
    lines = [f"## Per-linear error report: SmolLM2-135M-Instruct MergeQuant ({date.today()})", "",
             f"Command: `{command}` then `python bench/error_report.py REPORT.json --write`  ",
             f"Relative output error ‖y − ŷ‖²/‖y‖² of each linear on {rep['held_out']} held-out windows of "
             f"{cal['length']} tokens (calibration {cal['n']} × {cal['length']}, seed {cal['seed']}; held-out "
             f"windows drawn with seed {cal['seed'] + 1}), y = x·Wᵀ on the fp input from the quantized stream. "
             "weights: unrounded input, the stored int4 weights + low-rank branch; inputs: the int4 input codes, "
             "the fp weights; both: the linear as stored.", "",
             "Mean per linear kind (over the layers), and the layer where `both` is worst:", "",
             "| linear | weights | inputs | both | worst layer (both) |", "|---|---|---|---|---|"]
    for kind in KINDS:
        rs = by_kind[kind]
        mean = {k: sum(r[k] for r in rs) / len(rs) for k in ("weights", "inputs", "both")}
        worst = max(rs, key=lambda r: r["both"])
        lines.append(f"| {kind} | {mean['weights']:.4f} | {mean['inputs']:.4f} | {mean['both']:.4f} | "
                     f"{worst['layer']} ({worst['both']:.4f}) |")
    lines += ["", "Every linear (weights / inputs / both):", "",
              "| layer | " + " | ".join(KINDS) + " |", "|---|" + "---|" * len(KINDS)]
    layers = sorted({r["layer"] for r in rows})
    cell = {(r["layer"], r["linear"]): r for r in rows}
    for i in layers:
        lines.append(f"| {i} | " + " | ".join(
            f"{cell[i, k]['weights']:.3f} / {cell[i, k]['inputs']:.3f} / {cell[i, k]['both']:.3f}" for k in KINDS) + " |")
    return "\n".join([BEGIN, *lines, END]) + "\n"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("report", type=Path)
    ap.add_argument("--command", default="mergequant convert MODEL -o OUT --method mergequant --report REPORT.json")
    ap.add_argument("--results", type=Path, default=HERE / "RESULTS.md")
    ap.add_argument("--write", action="store_true")
    a = ap.parse_args()
    section = markdown(json.loads(a.report.read_text()), a.command)
    print(section)
    if a.write:
        text = a.results.read_text()
        pattern = re.compile(re.escape(BEGIN) + ".*?" + re.escape(END) + "\n?", re.S)
        text = pattern.sub(lambda _: section, text) if pattern.search(text) else text.rstrip("\n") + "\n\n" + section
        a.results.write_text(text)


if __name__ == "__main__":
    main()
