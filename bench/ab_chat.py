"""A/B speed of two builds of mergequant-chat on one model, interleaved (A B A B ...) so a noisy machine
slows both alike: the median prefill and decode tokens/s of each over the rounds, and their ratio.

    python3 bench/ab_chat.py A_BINARY B_BINARY MODEL [--rounds 5] [--threads 2] [--tokens 64]

Greedy decoding of one fixed prompt on the CPU; the two builds must also produce the same text (checked).
"""
from __future__ import annotations

import argparse
import re
import statistics
import subprocess

PROMPT = "Write a short poem about the sea."
TIMINGS = re.compile(r"\[prefill: (\d+) tokens \(\d+ cached\), ([\d.]+) tok/s \| decode: (\d+) tokens, ([\d.]+) tok/s\]")


def run(binary: str, model: str, threads: int, tokens: int) -> tuple[str, float, float]:
    out = subprocess.run([binary, "-m", model, "-p", PROMPT, "-n", str(tokens), "--temp", "0", "-t", str(threads),
                          "--device", "cpu", "--timings"], capture_output=True, text=True, check=True)
    text = out.stdout + out.stderr
    m = TIMINGS.search(text)
    if not m:
        raise SystemExit(f"{binary}: no timings line in its output:\n{text[-2000:]}")
    return text[:m.start()], float(m.group(2)), float(m.group(4))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("a")
    ap.add_argument("b")
    ap.add_argument("model")
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--tokens", type=int, default=64)
    args = ap.parse_args()
    res: dict[str, list[tuple[float, float]]] = {"A": [], "B": []}
    texts: dict[str, str] = {}
    for _ in range(args.rounds):
        for key, binary in (("A", args.a), ("B", args.b)):
            text, pre, dec = run(binary, args.model, args.threads, args.tokens)
            texts.setdefault(key, text)
            res[key].append((pre, dec))
    same = texts["A"] == texts["B"]
    print(f"rounds {args.rounds}, threads {args.threads}, {args.tokens} tokens; same text: {same}")
    med = {k: (statistics.median(p for p, _ in v), statistics.median(d for _, d in v)) for k, v in res.items()}
    for k in ("A", "B"):
        print(f"{k}: prefill {med[k][0]:.1f} tok/s, decode {med[k][1]:.1f} tok/s  "
              f"(decode per round: {', '.join(f'{d:.1f}' for _, d in res[k])})")
    print(f"B/A: prefill {med['B'][0] / med['A'][0]:.2f}, decode {med['B'][1] / med['A'][1]:.2f}")
    if not same:
        raise SystemExit("the two builds generated different text")


if __name__ == "__main__":
    main()
