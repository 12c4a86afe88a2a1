"""CPU benchmark, side by side with llama.cpp: SmolLM2-135M-Instruct (the built-in default model), a prompt of
512 tokens then 128 greedy tokens, on this engine's files and on llama.cpp's `llama-bench`, with 1 thread,
2 threads, and 2 threads beside a busy process (one core spinning), in one run.

    python3 bench/bench_cpu.py [--mergequant FILE.mq] [--rounds 3] [--md OUT.md]

Files (made on first use and cached in bench/peer/cache/models/ unless given):
- mergequant: the default `mergequant convert <GGUF> -o F --method mergequant` (what a user gets), and the
  same with `--output-scheme w8a8` (the tied output matrix / embedding as int8 rows: fewer decode bytes);
- f16: the built-in f16 file (mergequant.default_model);
- RTN W4A4 static and dynamic: `--method rtn-w4a4-static` / `rtn-w4a4-dynamic`;
- llama.cpp F16: bench/peer/write_gguf.py smollm2 (the same dequantized values as the f16 file), and Q4_0:
  llama.cpp's own llama-quantize of that F16 file. llama.cpp: bench/peer/build_llamacpp.sh cpu;
- with --schemes S,..: one RTN file per scheme (`--scheme S`: w8a8, w4a8, w4a8g, ...), and with --methods M,..: the
  default conversion of each method (`--method M`, its default calibration), so every scheme's speed stands in
  the same run; the conversion time of each file made in the run is in the table. --no-llamacpp leaves
  llama.cpp out (and the ratio table with it).

Every configuration runs every engine once per round, engines interleaved (A B C ... A B C ...) so that
drift of a shared machine hits all alike; the best round of each is reported. llama.cpp runs as
llama-bench pp512 (prompt, empty context) and tg128 at depth 512 (decode after 512 tokens of context),
which is what this engine's prefill and decode time here. Decode bytes per token: the bytes of every tensor
a decode step reads once (all linears, the output matrix, norms, split maps and low-rank factors; the
embedding table only where tied to the output); achieved GB/s = decode tok/s × that, against the streaming
read bandwidth measured (bench/membw.cpp) in the same configuration.
"""
from __future__ import annotations

import argparse
import datetime
import os
import shlex
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE / "peer"))
import llamacpp  # noqa: E402

from mergequant import LLM  # noqa: E402
from mergequant.convert.mqfile import read_mq  # noqa: E402

MODELS = HERE / "peer" / "cache" / "models"
CONFIGS = ((1, False, "1 thread"), (2, False, "2 threads"), (2, True, "2 threads + busy neighbour"))
CPU_FEATURES = ("avx2", "fma", "f16c", "avx_vnni", "avx512f", "avx512bw", "avx512vl", "avx512_vnni", "avx512_bf16",
                "avx512_fp16", "avx512vbmi", "amx_tile", "amx_int8", "amx_bf16")


def lscpu() -> tuple[str, str]:
    """(model name, the SIMD flags that matter here) from lscpu."""
    out = subprocess.run(["lscpu"], capture_output=True, text=True).stdout
    info = dict(line.split(":", 1) for line in out.splitlines() if ":" in line)
    flags = set(info.get("Flags", "").split())
    return info.get("Model name", "?").strip(), " ".join(f for f in CPU_FEATURES if f in flags)


def memory_bandwidth(threads: int) -> float:
    """GB/s of a streaming read over 1 GiB (bench/membw.cpp), built once per source version."""
    src = HERE / "membw.cpp"
    exe = Path(tempfile.gettempdir()) / f"mergequant-membw-{int(src.stat().st_mtime)}"
    if not exe.exists():
        subprocess.run(["g++", "-O3", "-march=native", "-pthread", str(src), "-o", str(exe)], check=True)
    out = subprocess.run([str(exe), str(threads), "1024"], check=True, capture_output=True, text=True).stdout
    return float(out.strip())


def mq_decode_bytes(path: Path) -> int:
    """Same rule as llamacpp.decode_bytes: every tensor but the tokenizer's and an untied embedding table."""
    f = read_mq(str(path))
    names = set(f.names())
    return sum(f.nbytes(n) for n in names if not n.startswith("tokenizer.")
               and not (n == "token_embd.weight" and "output.weight" in names))


def prompt_ids(llm: LLM, n: int) -> list[int]:
    text_file = HERE.parent.parent / "shared" / "data" / "eval" / "wiki.test.raw"
    text = text_file.read_text(encoding="utf-8")[:200000] if text_file.is_file() else "hello world " * 4000
    ids = llm.tokenize(text, add_special=False)[:n]
    if len(ids) < n:
        raise ValueError(f"prompt text gave {len(ids)} tokens, {n} wanted")
    return ids


@dataclass
class Engine:
    label: str
    engine: str   # "mergequant" or "llama.cpp"
    path: Path
    decode_bytes: int = 0
    convert_s: float | None = None  # the conversion's wall time, where this run made the file
    build: str = ""  # llama.cpp's build string, from llama-bench
    best: dict = field(default_factory=dict)  # config label → (prefill tok/s, decode tok/s)
    _llms: dict = field(default_factory=dict)

    def run(self, threads: int, n_prompt: int, n_gen: int) -> tuple[float, float]:
        if self.engine == "llama.cpp":
            r = llamacpp.bench("cpu", self.path, threads=threads, n_prompt=n_prompt, n_gen=n_gen, depth=n_prompt)
            self.build = str(r["build"])
            return float(r[f"pp{n_prompt}"]), float(r[f"tg{n_gen}"])
        if threads not in self._llms:
            llm = LLM(str(self.path), device="cpu", threads=threads, n_ctx=n_prompt + n_gen + 8)
            llm.generate(prompt_ids(llm, 16), max_tokens=4, temperature=0.0)  # warm-up: page the weights in
            self._llms[threads] = (llm, prompt_ids(llm, n_prompt))
        llm, ids = self._llms[threads]
        s = llm._session
        s.reset()
        # greedy, exactly n_gen tokens: the end-of-turn token does not end the run (ignore_eos)
        sid = s.start(ids, n_gen, 0.0, 0, 1.0, 0.0, 1.0, -1, [], [], True)
        while s.next(sid) is not None:
            pass
        t = llm.last_timings
        return t["n_prefill"] / (t["prefill_ms"] / 1e3), t["n_decode"] / (t["decode_ms"] / 1e3)


CONVERT_SECONDS: dict[Path, float] = {}  # files converted in this run → wall seconds


def convert(src: Path, out: Path, args: list[str]) -> Path:
    if not out.is_file():
        out.parent.mkdir(parents=True, exist_ok=True)
        tmp = out.with_suffix(".part.mq")
        cmd = [sys.executable, "-c", "import sys; from mergequant.cli import main; sys.exit(main())",
               "convert", str(src), "-o", str(tmp), "-q", *args]
        print("+", shlex.join(cmd), file=sys.stderr, flush=True)
        t0 = time.time()
        subprocess.run(cmd, check=True)
        tmp.replace(out)
        CONVERT_SECONDS[out] = time.time() - t0
        print(f"  converted in {CONVERT_SECONDS[out]:.0f} s", file=sys.stderr, flush=True)
    return out


def build_files(a: argparse.Namespace) -> list[Engine]:
    from mergequant.default_model import default_gguf_path, default_model_path

    gguf_src = default_gguf_path()
    extra = shlex.split(a.convert_opts)
    tag = "-" + "".join(c for c in a.convert_opts if c.isalnum()) if extra else ""
    engines = [
        Engine("mergequant (default --method mergequant)", "mergequant",
               Path(a.mergequant) if a.mergequant else
               convert(gguf_src, MODELS / f"smollm2-mergequant{tag}.mq", ["--method", "mergequant", *extra])),
        Engine("mergequant (default --method mergequant), output w8a8", "mergequant",
               convert(gguf_src, MODELS / f"smollm2-mergequant-out-w8a8{tag}.mq",
                       ["--method", "mergequant", "--output-scheme", "w8a8", *extra])),
        Engine("mergequant f16", "mergequant", default_model_path("f16")),
        Engine("mergequant RTN W4A4 static", "mergequant",
               convert(gguf_src, MODELS / f"smollm2-rtn-w4a4-static{tag}.mq", ["--method", "rtn-w4a4-static", *extra])),
        Engine("mergequant RTN W4A4 dynamic", "mergequant",
               convert(gguf_src, MODELS / "smollm2-rtn-w4a4-dynamic.mq", ["--method", "rtn-w4a4-dynamic"])),
    ]
    for scheme in filter(None, a.schemes.split(",")):
        engines.append(Engine(f"mergequant RTN {scheme}", "mergequant",
                              convert(gguf_src, MODELS / f"smollm2-rtn-{scheme}.mq", ["--scheme", scheme])))
    for method in filter(None, a.methods.split(",")):
        engines.append(Engine(f"mergequant --method {method} (default)", "mergequant",
                              convert(gguf_src, MODELS / f"smollm2-{method}.mq", ["--method", method])))
    for e in engines:
        e.convert_s = CONVERT_SECONDS.get(e.path)
    if a.no_llamacpp:
        for e in engines:
            e.decode_bytes = mq_decode_bytes(e.path)
        return engines
    f16_gguf = MODELS / "smollm2-135m-f16.gguf"
    if not f16_gguf.is_file():
        subprocess.run([sys.executable, str(HERE / "peer" / "write_gguf.py"), "smollm2", str(f16_gguf)], check=True)
    q4_gguf = llamacpp.quantize("cpu", f16_gguf, MODELS / "smollm2-135m-q4_0.gguf", "Q4_0", os.cpu_count() or 1)
    engines += [Engine("llama.cpp Q4_0", "llama.cpp", q4_gguf), Engine("llama.cpp F16", "llama.cpp", f16_gguf)]
    for e in engines:
        e.decode_bytes = mq_decode_bytes(e.path) if e.engine == "mergequant" else llamacpp.decode_bytes(e.path)
    return engines


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--mergequant", default=None, help="the default --method mergequant file (else converted here)")
    ap.add_argument("--convert-opts", default="", help="extra options for the static conversions (e.g. a short "
                    "calibration for a quick check: '--calib-n 2 --calib-len 64'; changes no shape, so no speed)")
    ap.add_argument("--prompt-tokens", type=int, default=512)
    ap.add_argument("--decode-tokens", type=int, default=128)
    ap.add_argument("--rounds", type=int, default=3, help="interleaved rounds per configuration (best kept)")
    ap.add_argument("--configs", default="1,2,2busy", help="subset of 1,2,2busy")
    ap.add_argument("--schemes", default="", help="also an RTN file per scheme, e.g. w8a8,w4a8,w4a8g")
    ap.add_argument("--methods", default="", help="also each method's default conversion, e.g. outliertune,fptq")
    ap.add_argument("--no-llamacpp", action="store_true", help="leave llama.cpp out (no ratio table)")
    ap.add_argument("--md", default=str(HERE / "peer" / "cache" / "bench_cpu.md"), help="write the markdown here")
    a = ap.parse_args()
    wanted = set(a.configs.split(","))
    configs = [c for c in CONFIGS if (f"{c[0]}busy" if c[1] else str(c[0])) in wanted]
    engines = build_files(a)
    bw: dict[str, float] = {}
    for threads, busy, label in configs:
        hog = subprocess.Popen([sys.executable, "-c", "while True: pass"]) if busy else None
        try:
            time.sleep(0.5 if busy else 0)
            bw[label] = memory_bandwidth(threads)
            for r in range(a.rounds):
                for e in engines:
                    pf, dc = e.run(threads, a.prompt_tokens, a.decode_tokens)
                    old = e.best.get(label, (0.0, 0.0))
                    e.best[label] = (max(old[0], pf), max(old[1], dc))
                    print(f"[{label}, round {r + 1}] {e.label}: prefill {pf:.1f} tok/s, decode {dc:.1f} tok/s",
                          file=sys.stderr, flush=True)
        finally:
            if hog is not None:
                hog.kill()
                hog.wait()

    model, flags = lscpu()
    now = datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC")
    cmd = "python3 bench/bench_cpu.py " + shlex.join(sys.argv[1:])
    load = " / ".join(f"{v:.2f}" for v in os.getloadavg())
    title = "mergequant's files" if a.no_llamacpp else "mergequant vs llama.cpp"
    lines = [f"## CPU: {title}, SmolLM2-135M ({now})", "",
             f"Command: `{cmd.strip()}`  ",
             f"CPU: {model}, {os.cpu_count()} logical CPUs; flags: {flags}  ",
             *([] if a.no_llamacpp else [
                 f"llama.cpp: {engines[-1].build} (llama-cpp-python sdist's vendored llama.cpp, "
                 "bench/peer/build_llamacpp.sh cpu: GGML_NATIVE, AMX off, OpenMP); llama-bench pp{0} and tg{1} at "
                 "depth {0}.  ".format(a.prompt_tokens, a.decode_tokens)]),
             f"Prompt {a.prompt_tokens} tokens, then {a.decode_tokens} greedy tokens; best of {a.rounds} interleaved "
             "rounds. Busy neighbour: one process spinning on a core. Read BW: bench/membw.cpp, same threads, same "
             f"configuration. Load average at the end (1 / 5 / 15 min): {load}. Convert: wall seconds of the file's "
             "conversion where this run made it (this machine, before the timings).", "",
             "| configuration | engine, file | file MB | convert s | decode MB/token | prefill tok/s | decode tok/s | "
             "achieved GB/s | read BW GB/s | share |",
             "|---|---|---|---|---|---|---|---|---|---|"]
    for _, _, label in configs:
        for e in engines:
            pf, dc = e.best[label]
            gbs = dc * e.decode_bytes / 1e9
            conv = f"{e.convert_s:.0f}" if e.convert_s is not None else "—"
            lines.append(f"| {label} | {e.label} | {e.path.stat().st_size / 1e6:.1f} | {conv} | "
                         f"{e.decode_bytes / 1e6:.1f} | {pf:.1f} | {dc:.1f} | {gbs:.2f} | {bw[label]:.2f} | "
                         f"{gbs / bw[label]:.0%} |")
    by = {e.label: e for e in engines}
    if not a.no_llamacpp:
        mq, q4, mf, lf = (by["mergequant (default --method mergequant)"], by["llama.cpp Q4_0"], by["mergequant f16"],
                          by["llama.cpp F16"])
        mo = by["mergequant (default --method mergequant), output w8a8"]
        lines += ["", "| configuration | mergequant / llama.cpp Q4_0, prefill | decode | mergequant f16 / llama.cpp "
                  "F16, prefill | decode | output w8a8 / f16 output (mergequant), decode |", "|---|---|---|---|---|---|"]
        for _, _, label in configs:
            rat = lambda x, y, i: x.best[label][i] / y.best[label][i]  # noqa: E731
            lines.append(f"| {label} | {rat(mq, q4, 0):.2f}x | {rat(mq, q4, 1):.2f}x | {rat(mf, lf, 0):.2f}x | "
                         f"{rat(mf, lf, 1):.2f}x | {rat(mo, mq, 1):.2f}x |")
    scaling = []
    for e in engines:
        one, two, busy = (e.best.get(c[2]) for c in CONFIGS)
        if one and two:
            s = f"{e.label}: 1→2 threads decode {two[1] / one[1]:.2f}x, prefill {two[0] / one[0]:.2f}x"
            if busy:
                s += f"; beside a busy process 2 threads decode at {busy[1] / two[1]:.0%} of quiet"
            scaling.append("- " + s)
    lines += ["", *scaling, ""]
    md = "\n".join(lines)
    print(md)
    Path(a.md).parent.mkdir(parents=True, exist_ok=True)
    Path(a.md).write_text(md, encoding="utf-8")
    print(f"(markdown written to {a.md})", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
