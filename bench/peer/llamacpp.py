"""Running the peer engine from the benchmarks: llama.cpp's `llama-quantize` and `llama-bench` as built by
bench/peer/build_llamacpp.sh, and the bytes one decode step of a GGUF model reads."""
from __future__ import annotations

import json
import os
import subprocess
from pathlib import Path

import gguf

CACHE = Path(__file__).resolve().parent / "cache"


def binary(build: str, name: str) -> Path:
    """bench/peer/cache/build-{cpu,cuda}/bin/NAME (LLAMA_CPP_BIN=DIR overrides the folder)."""
    d = Path(os.environ["LLAMA_CPP_BIN"]) if os.environ.get("LLAMA_CPP_BIN") else CACHE / f"build-{build}" / "bin"
    exe = d / name
    if not exe.is_file():
        raise FileNotFoundError(f"{exe} is missing: run bench/peer/build_llamacpp.sh {build} "
                                "(after python3 bench/peer/fetch_llamacpp.py)")
    return exe


def quantize(build: str, src: Path, dst: Path, qtype: str, threads: int) -> Path:
    """llama-quantize SRC DST QTYPE (kept if DST is newer than SRC)."""
    if dst.is_file() and dst.stat().st_mtime >= src.stat().st_mtime:
        return dst
    tmp = dst.with_suffix(".part.gguf")
    r = subprocess.run([str(binary(build, "llama-quantize")), str(src), str(tmp), qtype, str(threads)],
                       capture_output=True, text=True)
    if r.returncode != 0:
        raise RuntimeError(f"llama-quantize {src} → {qtype} failed ({r.returncode}):\n{r.stderr[-3000:]}")
    tmp.replace(dst)
    return dst


def bench(build: str, model: Path, *, threads: int, n_prompt: int | tuple[int, ...], n_gen: int, depth: int = 0,
          reps: int = 1, extra: tuple[str, ...] = ()) -> dict[str, float | str]:
    """llama-bench runs (-o json; each with its own warm-up run): "pp{n}" = tok/s of a prompt of n tokens
    (empty context) for each n in n_prompt, "tg{n_gen}" = tok/s of n_gen generated tokens after `depth`
    tokens of context (0 tokens: not run); each the mean over `reps` repetitions. "build": llama.cpp's
    build string. `extra`: e.g. ("-ngl", "99", "-fa", "1") on the GPU."""
    prompts = (n_prompt,) if isinstance(n_prompt, int) else tuple(n_prompt)
    prompts = tuple(p for p in prompts if p)
    out: dict[str, float | str] = {}
    tests = []
    if prompts:
        tests.append(["-p", ",".join(map(str, prompts)), "-n", "0", "-d", "0"])
    if n_gen:
        tests.append(["-p", "0", "-n", str(n_gen), "-d", str(depth)])
    for args in tests:
        cmd = [str(binary(build, "llama-bench")), "-m", str(model), "-t", str(threads), "-r", str(reps),
               "-o", "json", *args, *extra]
        r = subprocess.run(cmd, capture_output=True, text=True)
        if r.returncode != 0:
            raise RuntimeError(f"{' '.join(cmd)} failed ({r.returncode}):\n{r.stderr[-3000:]}")
        for rec in json.loads(r.stdout):
            key = f"pp{rec['n_prompt']}" if rec["n_gen"] == 0 else f"tg{rec['n_gen']}"
            out[key] = float(rec["avg_ts"])
            out["build"] = rec.get("build_commit", "?")
    return out


def decode_bytes(path: Path) -> int:
    """Bytes of the tensors one decode step reads: every matrix once (the linears and the output matrix;
    the embedding table only where it is the output matrix too, as in a tied model), plus the norm
    vectors; the embedding lookup reads one row, which is not counted."""
    r = gguf.GGUFReader(str(path))
    names = {t.name for t in r.tensors}
    return sum(int(t.n_bytes) for t in r.tensors if not (t.name == "token_embd.weight" and "output.weight" in names))
