"""Tokenization speed: MB/s of the engine's encode (through the binding, one call on the whole text)
against the reference library on the same text (wiki.test.raw), single-threaded, best of --repeat runs.
Appends a table to bench/RESULTS.md.

    python bench/bench_tokenizer.py [--shared ../shared] [--repeat 3] [--no-append]
"""
from __future__ import annotations

import argparse
import base64
import datetime
import json
import os
import platform
import sys
import tempfile
import time
from pathlib import Path

os.environ.setdefault("RAYON_NUM_THREADS", "1")  # `tokenizers` parallelism off: compare one core to one core

from mergequant import _engine  # noqa: E402
from mergequant.convert.tokenizer import LLAMA3_PATTERN, write_tokenizer_mq  # noqa: E402

# family → (files as the converter expects them ← files in shared/data/tokenizers/<family>, reference name)
FAMILIES = {
    "smollm2": ({"tokenizer.json": "tokenizer.json"}, "tokenizers"),
    "llama2": ({"tokenizer.model": "tokenizer.model"}, "sentencepiece"),
    "llama3": ({"tokenizer.model": "tokenizer.model", "tokenizer_config.json": "tokenizer_config.WebR-modified.json"},
               "tiktoken"),
}


def reference_encoder(family: str, src: Path):
    if family == "smollm2":
        from tokenizers import Tokenizer
        tok = Tokenizer.from_file(str(src / "tokenizer.json"))
        return lambda text: tok.encode(text, add_special_tokens=False).ids
    if family == "llama2":
        import sentencepiece as spm
        sp = spm.SentencePieceProcessor(model_file=str(src / "tokenizer.model"))
        return sp.encode
    import tiktoken
    ranks = {base64.b64decode(t): int(r) for t, r in (ln.split() for ln in (src / "tokenizer.model").read_text().splitlines() if ln)}
    enc = tiktoken.Encoding("llama3", pat_str=LLAMA3_PATTERN, mergeable_ranks=ranks, special_tokens={})
    return enc.encode_ordinary


def best_time(fn, text: str, repeat: int) -> tuple[float, list[int]]:
    best, ids = float("inf"), []
    for _ in range(repeat):
        t0 = time.perf_counter()
        ids = fn(text)
        best = min(best, time.perf_counter() - t0)
    return best, ids


def machine() -> str:
    model = platform.processor() or platform.machine()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                model = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    return f"{model}, {os.cpu_count()} logical CPUs, {platform.system()} {platform.release()}"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--shared", type=Path, default=Path(os.environ.get("MERGEQUANT_SHARED",
                                                                      Path(__file__).resolve().parents[2] / "shared")))
    ap.add_argument("--repeat", type=int, default=3)
    ap.add_argument("--no-append", action="store_true", help="print only; do not append to bench/RESULTS.md")
    args = ap.parse_args()
    data = args.shared / "data"
    text = (data / "eval" / "wiki.test.raw").read_text(encoding="utf-8")
    mb = len(text.encode("utf-8")) / 1e6
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for family, (files, ref_name) in FAMILIES.items():
            d = Path(tmp) / family
            d.mkdir()
            for name, real in files.items():
                (d / name).symlink_to(data / "tokenizers" / family / real)
            write_tokenizer_mq(d, Path(tmp) / f"{family}.mq")
            tok = _engine.Tokenizer(str(Path(tmp) / f"{family}.mq"))
            t_mq, ids_mq = best_time(lambda s: tok.encode(s, add_special=False, special=False), text, args.repeat)
            t_ref, ids_ref = best_time(reference_encoder(family, d), text, args.repeat)
            rows.append((family, ref_name, len(ids_mq), ids_mq == ids_ref, mb / t_mq, mb / t_ref))
            print(f"{family:8s} engine {mb / t_mq:6.2f} MB/s   {ref_name} {mb / t_ref:6.2f} MB/s   "
                  f"tokens {len(ids_mq)}  identical {ids_mq == ids_ref}", flush=True)
    table = [f"\n## Tokenizer encode speed ({datetime.date.today().isoformat()})\n",
             f"Command: `python {' '.join([Path(sys.argv[0]).as_posix()] + sys.argv[1:])}`  ",
             f"Machine: {machine()}  ",
             f"Text: wiki.test.raw ({mb:.2f} MB), one encode call, single-threaded, best of {args.repeat}.\n",
             "| tokenizer | reference | tokens | ids identical | engine MB/s | reference MB/s |",
             "|---|---|---|---|---|---|"]
    table += [f"| {f} | {r} | {n} | {'yes' if same else 'NO'} | {a:.2f} | {b:.2f} |" for f, r, n, same, a, b in rows]
    if not args.no_append:
        with open(Path(__file__).resolve().parent / "RESULTS.md", "a", encoding="utf-8") as fh:
            fh.write("\n".join(table) + "\n")
    print("\n".join(table))


if __name__ == "__main__":
    main()
