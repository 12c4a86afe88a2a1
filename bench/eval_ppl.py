"""Perplexity of the engine vs the numpy reference on the same windows of a text (an f16 model file).

    python3 bench/eval_ppl.py [MODEL] [--text FILE] [--window 512] [--max-windows 16] [--write]

MODEL defaults to the built-in SmolLM2 f16 model, FILE to ../shared/data/eval/wiki.test.raw. Both run
non-overlapping windows, each a fresh context, predicting every token after the first of a window.
"""
from __future__ import annotations

import argparse
import datetime
import math
import sys
import time
from pathlib import Path

from tqdm import tqdm

from mergequant import LLM
from mergequant.convert.reference import reference_from_mq

REPO = Path(__file__).resolve().parent.parent


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("model", nargs="?")
    ap.add_argument("--text", default=str(REPO.parent / "shared" / "data" / "eval" / "wiki.test.raw"))
    ap.add_argument("--window", type=int, default=512)
    ap.add_argument("--max-windows", type=int, default=16)
    ap.add_argument("--write", action="store_true", help="append the result to bench/RESULTS.md")
    a = ap.parse_args()
    if a.model is None:
        from mergequant.default_model import default_model_path
        a.model = str(default_model_path("f16"))
    llm = LLM(a.model, device="cpu")
    ids = llm.tokenize(Path(a.text).read_text(encoding="utf-8"), add_special=False)
    n = min(len(ids) // a.window, a.max_windows)
    windows = [ids[w * a.window:(w + 1) * a.window] for w in range(n)]

    t0 = time.time()
    nll = 0.0
    for w in tqdm(windows, desc="engine", unit="window"):
        nll -= float(llm.token_logprobs(w).sum())
    count = n * (a.window - 1)
    ppl_engine = math.exp(nll / count)
    t_engine = time.time() - t0

    t0 = time.time()
    ref = reference_from_mq(a.model)
    nll_ref = 0.0
    for w in tqdm(windows, desc="reference", unit="window"):
        nll_ref += ref.perplexity(w, a.window).nll_sum
    ppl_ref = math.exp(nll_ref / count)
    t_ref = time.time() - t0

    diff = abs(ppl_engine - ppl_ref) / ppl_ref
    cmd = "python3 bench/eval_ppl.py " + " ".join(sys.argv[1:])
    out = "\n".join([
        f"### Perplexity: engine vs numpy reference ({datetime.date.today().isoformat()})",
        "",
        f"Model `{Path(a.model).name}`, text `{Path(a.text).name}`, {n} non-overlapping windows of {a.window} tokens "
        f"({count} predictions), CPU backend. Command: `{cmd.strip()}` (the engine side alone: "
        f"`mergequant eval MODEL --ppl {Path(a.text).name} --window {a.window} --max-windows {a.max_windows}`).",
        "",
        "| | perplexity | time |",
        "|---|---|---|",
        f"| engine (C++, CPU) | {ppl_engine:.4f} | {t_engine:.0f} s |",
        f"| numpy reference (fp32) | {ppl_ref:.4f} | {t_ref:.0f} s |",
        f"| relative difference | {diff:.4%} | |",
        ""])
    print(out)
    if a.write:
        with open(REPO / "bench" / "RESULTS.md", "a", encoding="utf-8") as f:
            f.write("\n" + out)
    return 0 if diff < 0.005 else 1


if __name__ == "__main__":
    sys.exit(main())
