"""CPU benchmark: prefill and decode tokens/s of a model on this machine with 1 and 2 threads, next to
the machine's measured streaming-read bandwidth and the share of it that decode's weight reads reach.

    python3 bench/bench_cpu.py [MODEL ...] [--prompt-tokens 256] [--decode-tokens 128] [--write]

MODEL defaults to the built-in SmolLM2 f16 model. --write appends the table to bench/RESULTS.md.
"""
from __future__ import annotations

import argparse
import datetime
import os
import platform
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from mergequant import LLM
from mergequant.convert.mqfile import read_mq

HERE = Path(__file__).resolve().parent


def cpu_name() -> str:
    try:
        for line in open("/proc/cpuinfo"):
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown CPU"


def memory_bandwidth(threads: int) -> float:
    """GB/s of a streaming read over 1 GiB, measured by bench/membw.cpp."""
    exe = Path(tempfile.gettempdir()) / "mergequant-membw"
    if not exe.exists():
        subprocess.run(["g++", "-O3", "-march=native", "-pthread", str(HERE / "membw.cpp"), "-o", str(exe)], check=True)
    out = subprocess.run([str(exe), str(threads), "1024"], check=True, capture_output=True, text=True).stdout
    return float(out.strip())


def weight_bytes_per_token(path: str) -> int:
    """Bytes decode reads from weights per token: every linear (and the lm_head) once; embeddings and
    norms are a row or a vector, negligible."""
    f = read_mq(path)
    total = 0
    for name in f.names():
        if name.startswith("blk.") and not name.endswith("norm.weight"):
            total += f.nbytes(name)
    total += f.nbytes("output.weight" if "output.weight" in f.names() else "token_embd.weight")
    return total


def run(path: str, threads: int, n_prompt: int, n_decode: int) -> tuple[float, float]:
    llm = LLM(path, device="cpu", threads=threads, n_ctx=n_prompt + n_decode + 8)
    text = open(HERE.parent.parent / "shared" / "data" / "eval" / "wiki.test.raw", encoding="utf-8").read(200000) \
        if (HERE.parent.parent / "shared").exists() else "hello world " * 2000
    ids = llm.tokenize(text, add_special=False)[:n_prompt]
    llm.generate(ids[:16], max_tokens=4, temperature=0.0)  # warm-up (page in the weights)
    best_pf, best_dc = 0.0, 0.0
    for _ in range(2):
        llm._session.reset()
        llm.generate(ids, max_tokens=n_decode, temperature=0.0, stop_token_ids=None)
        t = llm.last_timings
        # generation may end early at an end-of-turn token; the rates use the tokens actually decoded
        best_pf = max(best_pf, t["n_prefill"] / (t["prefill_ms"] / 1e3))
        if t["n_decode"]:
            best_dc = max(best_dc, t["n_decode"] / (t["decode_ms"] / 1e3))
    return best_pf, best_dc


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("models", nargs="*")
    ap.add_argument("--prompt-tokens", type=int, default=256)
    ap.add_argument("--decode-tokens", type=int, default=128)
    ap.add_argument("--write", action="store_true", help="append the results to bench/RESULTS.md")
    a = ap.parse_args()
    if not a.models:
        from mergequant.default_model import default_model_path
        a.models = [str(default_model_path())]
    bw = {t: memory_bandwidth(t) for t in (1, 2)}
    rows = []
    for path in a.models:
        wbytes = weight_bytes_per_token(path)
        for t in (1, 2):
            pf, dc = run(path, t, a.prompt_tokens, a.decode_tokens)
            eff = dc * wbytes / 1e9
            rows.append(f"| {Path(path).name} | {t} | {pf:.1f} | {dc:.1f} | {wbytes / 1e6:.1f} | {eff:.2f} | "
                        f"{bw[t]:.2f} | {eff / bw[t]:.0%} |")
    cmd = "python3 bench/bench_cpu.py " + " ".join(sys.argv[1:])
    out = "\n".join([
        f"### CPU engine: prefill and decode ({datetime.date.today().isoformat()})",
        "",
        f"Machine: {cpu_name()}, {os.cpu_count()} cores. Command: `{cmd.strip()}`. Prompt {a.prompt_tokens} tokens "
        f"of wiki.test.raw, then up to {a.decode_tokens} greedy tokens; best of 2 runs. Memory bandwidth: streaming "
        "read of 1 GiB (bench/membw.cpp) with the same thread count. Effective = decode tok/s x weight bytes per token.",
        "",
        "| model | threads | prefill tok/s | decode tok/s | weight MB/token | effective GB/s | memory GB/s | share |",
        "|---|---|---|---|---|---|---|---|",
        *rows, ""])
    print(out)
    if a.write:
        with open(HERE / "RESULTS.md", "a", encoding="utf-8") as f:
            f.write("\n" + out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
