"""A/B speed of two builds of mergequant-chat on one model, interleaved (A B A B ...) so a noisy machine
slows both alike: the median prefill and decode tokens/s of each over the rounds, and their ratio.

    python3 bench/ab_chat.py A_BINARY B_BINARY MODEL [--rounds 5] [--threads 2] [--tokens 64] [--prompt-tokens N]

Greedy decoding of one fixed prompt on the CPU; the two builds must also produce the same text (checked). The
prompt is a short request, or with --prompt-tokens N the start of wikitext-2's test text cut to N tokens (the chat
template adds 30), for prefill at a realistic length (the model must then answer with more than one token: it
may end its turn at once after some cuts).
"""
from __future__ import annotations

import argparse
import os
import re
import statistics
import subprocess
from pathlib import Path

PROMPT = "Write a short poem about the sea."
TIMINGS = re.compile(r"\[prefill: (\d+) tokens \(\d+ cached\), ([\d.]+) tok/s \| decode: (\d+) tokens, ([\d.]+) tok/s\]")


def long_prompt(model: str, n: int) -> str:
    """The first n tokens (by the model's tokenizer) of wikitext-2's test text."""
    from mergequant import LLM

    shared = Path(os.environ.get("MERGEQUANT_SHARED", Path(__file__).resolve().parent.parent.parent / "shared"))
    for f in (shared / "data" / "eval" / "wiki.test.raw", shared / "eval" / "wiki.test.raw"):
        if f.is_file():
            text = f.read_text(encoding="utf-8")[:20 * n]
            break
    else:
        raise SystemExit(f"wiki.test.raw not found under {shared} (set MERGEQUANT_SHARED)")
    llm = LLM(model, device="cpu")
    return llm.detokenize(llm.tokenize(text, add_special=False)[:n])


def run(binary: str, model: str, threads: int, tokens: int, prompt: str) -> tuple[str, float, float, int]:
    out = subprocess.run([binary, "-m", model, "-p", prompt, "-n", str(tokens), "--temp", "0", "-t", str(threads),
                          "--device", "cpu", "--timings"], capture_output=True, text=True, check=True)
    text = out.stdout + out.stderr
    m = TIMINGS.search(text)
    if not m:
        raise SystemExit(f"{binary}: no timings line in its output:\n{text[-2000:]}")
    return text[:m.start()], float(m.group(2)), float(m.group(4)), int(m.group(1))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("a")
    ap.add_argument("b")
    ap.add_argument("model")
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--tokens", type=int, default=64)
    ap.add_argument("--prompt-tokens", type=int, default=0, help="a prompt of this many tokens of wikitext-2")
    args = ap.parse_args()
    prompt = long_prompt(args.model, args.prompt_tokens) if args.prompt_tokens else PROMPT
    n_prefill = 0
    res: dict[str, list[tuple[float, float]]] = {"A": [], "B": []}
    texts: dict[str, str] = {}
    for _ in range(args.rounds):
        for key, binary in (("A", args.a), ("B", args.b)):
            text, pre, dec, n_prefill = run(binary, args.model, args.threads, args.tokens, prompt)
            texts.setdefault(key, text)
            res[key].append((pre, dec))
    if min(d for v in res.values() for _, d in v) <= 0:
        raise SystemExit("a run generated no tokens (the reply ended at once): try another --prompt-tokens")
    same = texts["A"] == texts["B"]
    print(f"rounds {args.rounds}, threads {args.threads}, prompt {n_prefill} tokens, {args.tokens} tokens; "
          f"same text: {same}")
    med = {k: (statistics.median(p for p, _ in v), statistics.median(d for _, d in v)) for k, v in res.items()}
    for k in ("A", "B"):
        print(f"{k}: prefill {med[k][0]:.1f} tok/s, decode {med[k][1]:.1f} tok/s  "
              f"(per round: prefill {', '.join(f'{p:.1f}' for p, _ in res[k])}; "
              f"decode {', '.join(f'{d:.1f}' for _, d in res[k])})")
    print(f"B/A: prefill {med['B'][0] / med['A'][0]:.2f}, decode {med['B'][1] / med['A'][1]:.2f}")
    if not same:
        raise SystemExit("the two builds generated different text")


if __name__ == "__main__":
    main()
