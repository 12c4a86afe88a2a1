"""GPU end-to-end benchmark, side by side with the peers: a Llama-2-7B-shaped model with random weights,
written straight into the .mq format for each scheme (no calibration), run by the CUDA engine; in the same
run a PyTorch fp16 forward (cuBLAS matmuls, KV cache) on the f16 file's weights and llama.cpp's llama-bench
(-ngl 99 -fa 1) on GGUF files of the same weights (F16, and Q4_0 / Q4_K_M from llama.cpp's llama-quantize),
and the streaming-read bandwidth of the GPU.

Reports per model: decode tokens/s at batch 1 (128 tokens after a 512-token prompt, greedy), prefill
tokens/s for 512 and 2048 tokens, and the bytes one decode step reads per token, as GB/s and as a share of
the measured read bandwidth. Extra model files (e.g. SmolLM2-135M) are benchmarked the same way.

    python bench/bench_gpu.py --tokenizer DIR [--gguf-dir DIR] [--extra MODEL.mq=LABEL ...] [--md OUT.md]
    python bench/bench_gpu.py --tokenizer DIR --shape tiny --build-only   # file writers only, no GPU

Files (bench/peer/random_weights.py draws every weight, so all engines run the same model):
- f16: the random weights (uniform, sd 0.02), q/k/v and gate/up fused as docs/format.md says; the GGUF
  files of bench/peer/write_gguf.py hold the same values (q/k rows in llama.cpp's rotary order).
- w4a16g: random codes, fp16 group scales. w4a8 / w4a8g (the layouts of qqq per-channel / g128; per-token
  int8 activations): random codes, per-row scales, w4a8g's group scales random in [1, 16]. w8a8 (smoothquant's
  layout): random int8 codes, per-row scales. w8a8s: w8a8 with random static steps, shifts and biases at every
  linear (outliertune puts it at q/k/v and gate/up only: the file bounds that method's speed from below).
  w4a4: random static RTN codes, per-row scales, identity
  in_map, in_scale of ones (plain static RTN). w4a4-mq: the structure of a default `--method mergequant`
  file: split slots at the converter's default budgets on the three splittable linears (Kp =
  pad(K + ceil(budget·K)), `budget` for q/k/v and gate/up, `budget_down` for ffn_down; the extra slots as
  second parts of random channels) and the low-rank branch
  at the converter's default rank of each linear (Options.rank_for: 16, and 32 at ffn_down and attn_output;
  fp16 A [r, Kp], B [N, r]); random codes.
"""
from __future__ import annotations

import argparse
import datetime
import gc
import json
import os
import statistics
import sys
import tempfile
import time
import zlib
from dataclasses import asdict
from pathlib import Path

import numpy as np

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE / "peer"))
import llamacpp  # noqa: E402
import random_weights as rw  # noqa: E402

from mergequant.convert.config import LlamaConfig  # noqa: E402
from mergequant.convert.mqfile import read_mq, write_mq  # noqa: E402
from mergequant.convert.quant.mergequant import Options  # noqa: E402
from mergequant.convert.quant.split import build_in_map, extra_slots  # noqa: E402
from mergequant.convert.quant.int4 import pad_k  # noqa: E402
from mergequant.convert.schemes import get_scheme  # noqa: E402
from mergequant.convert.tokenizer import export_source  # noqa: E402

PROMPT, DECODE, PREFILLS = 512, 128, (512, 2048)
SCHEMES = ("f16", "w4a16g", "w4a4", "w4a4-mq", "w4a8", "w4a8g", "w8a8", "w8a8s")
SCHEME_LABEL = {"f16": "f16", "w4a16g": "w4a16g", "w4a4": "w4a4, plain RTN",
                "w4a4-mq": "w4a4, MergeQuant structure", "w4a8": "w4a8 (QQQ per-channel layout)",
                "w4a8g": "w4a8g (QQQ g128 layout)", "w8a8": "w8a8 (SmoothQuant layout)",
                "w8a8s": "w8a8s (OutlierTune q/k/v, gate/up layout)"}
GGUF_TYPES = (("f16", "F16"), ("q4_0", "Q4_0"), ("q4_k_m", "Q4_K_M"))


def gguf_path(d: Path, shape: str, kind: str) -> Path:
    return d / f"llama2-{shape}-{kind}.gguf"


def llama_config(s: rw.Shape) -> LlamaConfig:
    return LlamaConfig(architecture="llama", rope_scaling=None, tie_word_embeddings=False, **asdict(s))


def linear_shapes(c: LlamaConfig) -> dict[str, tuple[int, int]]:
    """(N, K) of each linear of a block (docs/format.md: q/k/v and gate/up fused)."""
    hd = c.head_dim
    return {"attn_qkv": ((c.num_attention_heads + 2 * c.num_key_value_heads) * hd, c.hidden_size),
            "attn_output": (c.hidden_size, c.num_attention_heads * hd),
            "ffn_gate_up": (2 * c.intermediate_size, c.hidden_size),
            "ffn_down": (c.hidden_size, c.intermediate_size)}


FUSED = {"attn_qkv": ("q", "k", "v"), "attn_output": ("o",), "ffn_gate_up": ("gate", "up"), "ffn_down": ("down",)}


def f16_linear(c: LlamaConfig, layer: int, short: str) -> np.ndarray:
    """The fused linear from the HF-layout random weights (the same values as the GGUF files)."""
    parts = [rw.linear(c, layer, hf) for hf in FUSED[short]]
    return parts[0] if len(parts) == 1 else np.concatenate(parts, axis=0)


def rng_for(name: str) -> np.random.Generator:
    return np.random.Generator(np.random.PCG64(zlib.crc32(name.encode())))


def random_tensor(name: str, dtype: np.dtype, shape: tuple[int, ...]) -> np.ndarray:
    """Random contents of a packed tensor: any byte is a valid pair of int4 codes; scales positive."""
    g = rng_for(name)
    if name.endswith(".gscale"):  # w4a8g's integer group scales: [1, 16]
        return g.integers(1, 17, size=shape, dtype=np.uint8)
    if name.endswith(".bits"):  # w8a8, w8a8s: 8-bit codes
        return np.full(shape, 8, np.int32)
    if dtype == np.int8:  # w8a8, w8a8s codes in [-127, 127]
        return g.integers(-127, 128, size=shape, dtype=np.int8)
    if name.endswith((".in_scale", ".shift", ".bias")):  # w8a8s: steps' inverses of a unit-range input, shifts
        return (g.random(shape, dtype=np.float32) * 100 + 20 if name.endswith(".in_scale")
                else (g.random(shape, dtype=np.float32) - 0.5) * 0.01)
    if dtype == np.uint8:
        return np.frombuffer(g.bytes(int(np.prod(shape))), np.uint8).reshape(shape)
    return (g.random(shape, dtype=np.float32) * 0.004 + 0.001).astype(dtype)


def identity_in_map(kp: int, k: int) -> np.ndarray:
    return build_in_map(np.ones(k, np.int64), kp)


def mergequant_in_map(name: str, k: int, budget: float) -> np.ndarray:
    """Slots of a split input at the converter's budget: every extra slot a second part of a distinct
    random channel (the converter's allocation gives some channels more parts; the slot count, which is
    what the kernels see, is the same)."""
    extra = extra_slots(k, budget)
    parts = np.ones(k, np.int64)
    parts[rng_for(name).choice(k, size=extra, replace=False)] = 2
    return build_in_map(parts, pad_k(k + extra))


def low_rank(name: str, n: int, kp: int, rank: int) -> dict[str, np.ndarray]:
    g = rng_for(name)
    return {f"{name}.lora_a": (g.standard_normal((rank, kp), dtype=np.float32) * 0.01).astype(np.float16),
            f"{name}.lora_b": (g.standard_normal((n, rank), dtype=np.float32) * 0.01).astype(np.float16)}


def build_model(path: Path, scheme: str, c: LlamaConfig, tok_meta: dict, tok_tensors: dict,
                keep: dict | None = None) -> Path:
    """Writes the model; for f16 the weights go into `keep` too (the PyTorch baseline)."""
    tensors = dict(tok_tensors)
    D = c.hidden_size
    tensors["token_embd.weight"] = rw.embedding(c)
    tensors["output.weight"] = rw.output(c)
    tensors["output_norm.weight"] = np.ones(D, np.float32)
    if keep is not None:
        keep.update(emb=tensors["token_embd.weight"], out=tensors["output.weight"], layers=[])
    opts = Options()
    method = {"f16": "f16", "w4a16g": "rtn-w4a16", "w4a4": "rtn-w4a4-static", "w4a4-mq": "mergequant",
              "w4a8": "qqq", "w4a8g": "qqq", "w8a8": "smoothquant", "w8a8s": "outliertune"}[scheme]
    params = {"random_weights": True}
    if scheme == "w4a4-mq":
        params |= {"budget": opts.budget, "budget_down": opts.budget_down, "rank": opts.rank,
                   "rank_down": opts.rank_for("ffn_down"), "rank_o": opts.rank_for("attn_output")}
    quant = {"method": method, "params": {"options": params}, "linears": {}}
    file_scheme = "w4a4" if scheme == "w4a4-mq" else scheme
    for i in range(c.num_hidden_layers):
        tensors[f"blk.{i}.attn_norm.weight"] = np.ones(D, np.float32)
        tensors[f"blk.{i}.ffn_norm.weight"] = np.ones(D, np.float32)
        layer = {}
        for short, (n, k) in linear_shapes(c).items():
            p = f"blk.{i}.{short}"
            quant["linears"][p] = file_scheme
            if scheme == "f16":
                tensors[f"{p}.weight"] = layer[short] = f16_linear(c, i, short)
                continue
            splittable = short != "attn_output"
            if scheme == "w4a4-mq" and splittable:
                budget = opts.budget_down if short == "ffn_down" and opts.budget_down is not None else opts.budget
                in_map = mergequant_in_map(p, k, budget)
                kp = in_map.shape[0]
            else:
                kp = pad_k(k)
                in_map = identity_in_map(kp, k)
            for suffix, (dtype, shape) in get_scheme(file_scheme).layout(n, kp if file_scheme == "w4a4" else k).items():
                tensors[f"{p}.{suffix}"] = random_tensor(f"{p}.{suffix}", dtype, shape)
            if file_scheme == "w4a4":
                if splittable:
                    tensors[f"{p}.in_map"] = in_map
                if short in ("attn_qkv", "ffn_gate_up"):
                    tensors[f"{p}.in_scale"] = np.ones(k, np.float32)
                if scheme == "w4a4-mq" and opts.rank_for(short) > 0:  # the converter's rank of this linear
                    tensors |= low_rank(p, n, kp, opts.rank_for(short))
        if keep is not None:
            keep["layers"].append(layer)
    write_mq(path, c, quant, tok_meta, tensors)
    return path


def bench_llamacpp(path: Path) -> dict:
    """llama-bench on the GPU (all layers offloaded, flash attention): prefill 512 / 2048 (empty context),
    decode 128 tokens at depth 512; the mean of 3 repetitions each."""
    r = llamacpp.bench("cuda", path, threads=min(16, os.cpu_count() or 1), n_prompt=PREFILLS, n_gen=DECODE,
                       depth=PROMPT, reps=3, extra=("-ngl", "99", "-fa", "1"))
    return {"decode_tok_s": r[f"tg{DECODE}"], **{f"prefill{n}_tok_s": r[f"pp{n}"] for n in PREFILLS},
            "build": r["build"]}


def stream_bandwidth() -> float:
    """Bytes/s of a streaming read (sum over 4 GiB of fp32), median of 20 after warm-up."""
    x = torch.ones(2 ** 30, device="cuda")
    return x.numel() * 4 / median_ms(lambda: x.sum()) * 1e3


def median_ms(fn, warmup: int = 3, reps: int = 20) -> float:
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(reps):
        a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        a.record()
        fn()
        b.record()
        b.synchronize()
        times.append(a.elapsed_time(b))
    return statistics.median(times)


def decode_weight_bytes(path: Path) -> int:
    """Bytes of every tensor a decode step reads once: all but the embedding table and the tokenizer."""
    f = read_mq(path)
    return sum(f.nbytes(n) for n in f.names() if not n.startswith("tokenizer.") and n != "token_embd.weight")


def kernel_times(prof) -> tuple[list[tuple[str, int, float]], float]:
    """(kernel name, calls, device us) of a torch.profiler run, longest first, and their total."""
    ev = [(e.key, e.count, getattr(e, "device_time_total", 0) or getattr(e, "cuda_time_total", 0))
          for e in prof.key_averages()]
    ev = sorted((e for e in ev if e[2] > 0), key=lambda e: -e[2])
    return ev, sum(e[2] for e in ev)


def profile_decode(llm: "LLM", prompt: list[int], n: int = 32, top: int = 12) -> None:
    """Device time per decode token by kernel (CUPTI through torch.profiler; graph-launched kernels are
    recorded too): the prompt is cached first, so the profiled call runs one-token steps only."""
    from torch.profiler import ProfilerActivity, profile

    llm.generate(prompt, max_tokens=1, temperature=0.0)
    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        llm.generate(prompt, max_tokens=n, temperature=0.0)
    steps = llm.last_timings["n_decode"] + 1
    ev, total = kernel_times(prof)
    print(f"  decode profile: {total / steps:.0f} us of kernels per token over {steps} steps", flush=True)
    for name, count, us in ev[:top]:
        print(f"    {us / steps:8.1f} us/token  {count / steps:5.1f} calls/token  {name[:90]}", flush=True)


def profile_prefill(llm: "LLM", prompt: list[int], top: int = 14) -> None:
    """Device time of one prefill of `prompt` by kernel (CUPTI through torch.profiler)."""
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        llm.generate(prompt, max_tokens=1, temperature=0.0)
    ev, total = kernel_times(prof)
    print(f"  prefill profile ({len(prompt)} tokens): {total / 1e3:.1f} ms of kernels", flush=True)
    for name, count, us in ev[:top]:
        print(f"    {us / 1e3:8.2f} ms  {100 * us / total:5.1f}%  {count:6d} calls  {name[:90]}", flush=True)


def greedy(llm: "LLM", ids: list[int], n: int) -> None:
    """n greedy tokens after `ids`, not stopped by the end-of-turn token (ignore_eos)."""
    s = llm._session
    sid = s.start(ids, n, 0.0, 0, 1.0, 0.0, 1.0, -1, [], [], True)
    while s.next(sid) is not None:
        pass


def bench_engine(path: Path, n_vocab_tok: int, rng: np.random.Generator, profile: bool = False,
                 n_batch: int | None = None) -> dict:
    from mergequant import LLM

    llm = LLM(str(path), device="cuda", n_ctx=4096, n_batch=n_batch)
    ids = lambda n: rng.integers(3, n_vocab_tok, n).tolist()  # noqa: E731  (fresh prompts: no cached prefix)
    llm.generate(ids(64), max_tokens=16, temperature=0.0)  # warm-up: module load, first capture
    if profile:
        try:
            profile_decode(llm, ids(PROMPT), top=16)
            profile_prefill(llm, ids(PREFILLS[-1]))
        except Exception as e:  # the profiler is a diagnostic: the benchmark goes on without it
            print(f"  decode profile failed: {e}", flush=True)
    decode = []
    for _ in range(2):
        greedy(llm, ids(PROMPT), DECODE)
        t = llm.last_timings
        decode.append(t["n_decode"] / t["decode_ms"] * 1e3)
    res = {"decode_tok_s": max(decode), "n_decode": t["n_decode"]}
    for n in PREFILLS:
        best = 0.0
        for _ in range(2):
            llm.generate(ids(n), max_tokens=1, temperature=0.0)
            t = llm.last_timings
            best = max(best, t["n_prefill"] / t["prefill_ms"] * 1e3)
        res[f"prefill{n}_tok_s"] = best
    del llm
    gc.collect()
    return res


class TorchLlama:
    """fp16 Llama forward with torch.matmul (cuBLAS) linears, fp32 RMSNorm, SDPA attention, KV cache."""

    def __init__(self, c: LlamaConfig, w: dict, n_ctx: int):
        self.c, self.w = c, w
        hd = c.head_dim
        inv = 1.0 / (c.rope_theta ** (torch.arange(0, hd, 2, device="cuda", dtype=torch.float64) / hd))
        ang = torch.arange(n_ctx, device="cuda", dtype=torch.float64)[:, None] * inv[None]
        self.cos = torch.cat([ang.cos(), ang.cos()], -1).half()
        self.sin = torch.cat([ang.sin(), ang.sin()], -1).half()
        shape = (c.num_hidden_layers, 1, c.num_key_value_heads, n_ctx, hd)
        self.k = torch.zeros(shape, device="cuda", dtype=torch.half)
        self.v = torch.zeros(shape, device="cuda", dtype=torch.half)

    def norm(self, x: "torch.Tensor") -> "torch.Tensor":
        xf = x.float()
        return (xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + self.c.rms_norm_eps)).half()

    def rope(self, x: "torch.Tensor", pos: slice) -> "torch.Tensor":
        half = x.shape[-1] // 2
        rot = torch.cat([-x[..., half:], x[..., :half]], -1)
        return x * self.cos[pos] + rot * self.sin[pos]

    def forward(self, ids: "torch.Tensor", pos0: int) -> "torch.Tensor":
        with torch.inference_mode():
            return self._forward(ids, pos0)

    def _forward(self, ids: "torch.Tensor", pos0: int) -> "torch.Tensor":
        c = self.c
        T, H, Hkv, hd = ids.shape[0], c.num_attention_heads, c.num_key_value_heads, c.head_dim
        pos = slice(pos0, pos0 + T)
        x = self.w["emb"][ids]
        for li, L in enumerate(self.w["layers"]):
            qkv = torch.matmul(self.norm(x), L["attn_qkv"].t())
            q, k, v = qkv.split([H * hd, Hkv * hd, Hkv * hd], -1)
            q = self.rope(q.view(T, H, hd).transpose(0, 1), pos)[None]
            self.k[li, 0, :, pos] = self.rope(k.view(T, Hkv, hd).transpose(0, 1), pos)
            self.v[li, 0, :, pos] = v.view(T, Hkv, hd).transpose(0, 1)
            kk, vv = self.k[li, :, :, :pos0 + T], self.v[li, :, :, :pos0 + T]
            o = torch.nn.functional.scaled_dot_product_attention(q, kk, vv, is_causal=T > 1)
            x = x + torch.matmul(o[0].transpose(0, 1).reshape(T, H * hd), L["attn_output"].t())
            gu = torch.matmul(self.norm(x), L["ffn_gate_up"].t())
            g, u = gu.chunk(2, -1)
            x = x + torch.matmul(torch.nn.functional.silu(g) * u, L["ffn_down"].t())
        return torch.matmul(self.norm(x[-1:]), self.w["out"].t()).float()


def bench_torch(c: LlamaConfig, host: dict, rng: np.random.Generator) -> dict:
    up = lambda a: torch.from_numpy(a).cuda()  # noqa: E731
    w = {"emb": up(host["emb"]), "out": up(host["out"]),
         "layers": [{k: up(v) for k, v in L.items()} for L in host["layers"]]}
    m = TorchLlama(c, w, PROMPT + DECODE + 16)
    ids = lambda n: torch.tensor(rng.integers(3, c.vocab_size, n), device="cuda")  # noqa: E731

    def generate() -> float:
        logits = m.forward(ids(PROMPT), 0)
        torch.cuda.synchronize()
        t0 = time.perf_counter()
        for i in range(DECODE):
            nxt = logits.argmax(-1)  # greedy, token read back on the host like the engine's sampler
            logits = m.forward(torch.tensor([int(nxt)], device="cuda"), PROMPT + i)
        torch.cuda.synchronize()
        return DECODE / (time.perf_counter() - t0)

    generate()
    res = {"decode_tok_s": max(generate() for _ in range(2))}
    for n in PREFILLS:
        mp = TorchLlama(c, w, n) if n > PROMPT + DECODE + 16 else m
        res[f"prefill{n}_tok_s"] = n / median_ms(lambda: mp.forward(ids(n), 0), warmup=1, reps=5) * 1e3
        del mp
    del m, w
    torch.cuda.empty_cache()
    return res


def check_files(work: Path, c: LlamaConfig, schemes: list[str], tok_meta: dict, tok_tensors: dict) -> None:
    """--build-only: write each file and run 4 greedy tokens through the CPU engine (which checks every
    tensor the config and schemes imply); report sizes and decode bytes."""
    from mergequant import LLM

    for scheme in schemes:
        path = build_model(work / f"llama2-{c.hidden_size}-{scheme}.mq", scheme, c, tok_meta, tok_tensors)
        llm = LLM(str(path), device="cpu", n_ctx=64)
        greedy(llm, list(range(3, 19)), 4)
        print(f"{scheme}: {path.stat().st_size / 1e6:.1f} MB, decode reads {decode_weight_bytes(path) / 1e6:.1f} MB, "
              f"CPU engine ran {llm.last_timings['n_decode']} decode steps", flush=True)
        del llm
        path.unlink()


def table(rows: list[dict], bw: float) -> list[str]:
    out = ["| model | engine | file | decode tok/s (bs 1) | decode GB/s | of read BW | prefill 512 tok/s | "
           "prefill 2048 tok/s |", "|---|---|---|---|---|---|---|---|"]
    for r in rows:
        gbs = r["weight_bytes"] * r["decode_tok_s"] / 1e9
        out.append(f"| {r['model']} | {r['engine']} | {r['scheme']} | {r['decode_tok_s']:.1f} | {gbs:.0f} | "
                   f"{gbs * 1e9 / bw:.0%} | {r['prefill512_tok_s']:.0f} | {r['prefill2048_tok_s']:.0f} |")
    return out


def ratios(rows: list[dict]) -> list[str]:
    """The issue's targets as measured ratios (only those whose two rows ran)."""
    by = {(r["engine"], r["scheme"]): r for r in rows if r["model"] == "Llama-2-7B shape"}
    mq = ("mergequant CUDA", SCHEME_LABEL["w4a4-mq"])
    pairs = [(mq, ("llama.cpp", "Q4_0"), "decode_tok_s", 2.0),
             (mq, ("PyTorch fp16 (cuBLAS)", "f16"), "prefill2048_tok_s", 1.3),
             (("mergequant CUDA", "f16"), ("llama.cpp", "F16"), "decode_tok_s", 1.0),
             (("mergequant CUDA", "f16"), ("PyTorch fp16 (cuBLAS)", "f16"), "prefill2048_tok_s", 0.9),
             (("mergequant CUDA", "w4a16g"), ("llama.cpp", "Q4_K_M"), "prefill2048_tok_s", 1.0),
             (mq, ("mergequant CUDA", SCHEME_LABEL["w4a4"]), "decode_tok_s", None),
             (("mergequant CUDA", SCHEME_LABEL["w4a8g"]), ("mergequant CUDA", SCHEME_LABEL["w4a4"]), "decode_tok_s", 0.9),
             (("mergequant CUDA", SCHEME_LABEL["w4a8"]), ("mergequant CUDA", SCHEME_LABEL["w4a4"]), "decode_tok_s", 0.9),
             (("mergequant CUDA", SCHEME_LABEL["w4a8g"]), ("PyTorch fp16 (cuBLAS)", "f16"), "prefill2048_tok_s", 1.2)]
    out = ["| ratio (7B shape) | measured | target |", "|---|---|---|"]
    for a, b, key, target in pairs:
        if a in by and b in by:
            what = key.replace("_tok_s", "").replace("prefill2048", "prefill 2048")
            out.append(f"| {a[0]} {a[1]} / {b[0]} {b[1]}, {what} | {by[a][key] / by[b][key]:.2f}x | "
                       f"{'≥ %.1fx' % target if target else ''} |")
    return out


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--tokenizer", required=True, help="tokenizer source (a directory or .gguf) for the files")
    ap.add_argument("--shape", choices=sorted(rw.SHAPES), default="7b")
    ap.add_argument("--extra", action="append", default=[], help="MODEL.mq=LABEL: also benchmark this file")
    ap.add_argument("--schemes", default=",".join(SCHEMES), help=f"subset of {','.join(SCHEMES)} (\"\": none, only the --extra files)")
    ap.add_argument("--gguf-dir", default=None, help="folder with llama2-SHAPE-{f16,q4_0,q4_k_m}.gguf for llama.cpp "
                    "(bench/peer/write_gguf.py + llama-quantize; bench/gpu_all.sh makes them); absent ones are skipped")
    ap.add_argument("--workdir", default=None, help="where the random-weight files go (default: a temp dir)")
    ap.add_argument("--out", default=None, help="write the results as JSON here")
    ap.add_argument("--md", default=None, help="write the markdown table here")
    ap.add_argument("--no-torch", action="store_true", help="skip the PyTorch fp16 baseline")
    ap.add_argument("--keep", action="store_true", help="keep the files in --workdir, and use a file already there "
                    "as it is (e.g. the same file under two settings of the engine, in two runs)")
    ap.add_argument("--build-only", action="store_true", help="write the files and check them on the CPU engine; no GPU")
    ap.add_argument("--n-batch", type=int, default=None, help="prompt tokens per engine forward pass (default: the CUDA "
                    "backend's, 2048: a 2048-token prefill in one pass, as llama-bench and PyTorch run it)")
    ap.add_argument("--profile", action="store_true", help="print each engine model's device time per decode token by kernel")
    args = ap.parse_args()
    c = llama_config(rw.SHAPES[args.shape])
    schemes = [x for x in args.schemes.split(",") if x]  # "" : the --extra files only
    bad = [x for x in schemes if x not in SCHEMES]
    if bad:
        ap.error(f"unknown scheme(s) {', '.join(bad)}; choose from {', '.join(SCHEMES)}")
    tok_meta, tok_tensors = export_source(args.tokenizer)
    n_tok = len(tok_tensors["tokenizer.token_offsets"]) - 1
    work = Path(args.workdir or tempfile.mkdtemp(prefix="bench_gpu_"))
    work.mkdir(parents=True, exist_ok=True)
    if args.build_only:
        check_files(work, c, schemes, tok_meta, tok_tensors)
        return 0
    global torch
    import torch
    if not torch.cuda.is_available():
        print("no CUDA device", file=sys.stderr)
        return 1
    rng = np.random.default_rng(0)
    bw = stream_bandwidth()
    gpu = torch.cuda.get_device_name()
    print(f"{gpu}: streaming read {bw / 1e9:.0f} GB/s", flush=True)
    model = "Llama-2-7B shape" if args.shape == "7b" else f"Llama {args.shape} shape"
    rows, build = [], None
    for kind, label in GGUF_TYPES if args.gguf_dir else ():
        g = gguf_path(Path(args.gguf_dir), args.shape, kind)
        if not g.is_file():
            print(f"llama.cpp {label}: {g} missing, skipped", flush=True)
            continue
        r = bench_llamacpp(g)
        build = r.pop("build")
        rows.append({"model": model, "engine": "llama.cpp", "scheme": label, "weight_bytes": llamacpp.decode_bytes(g), **r})
        print(rows[-1], flush=True)
    for scheme in schemes:
        t0 = time.time()
        keep = {} if scheme == "f16" and not args.no_torch else None
        path = work / f"llama2-{args.shape}-{scheme}.mq"
        if args.keep and path.is_file() and keep is None:
            print(f"{scheme}: {path} kept from an earlier run", flush=True)
        else:
            build_model(path, scheme, c, tok_meta, tok_tensors, keep)
            print(f"{scheme}: wrote {path.stat().st_size / 1e9:.2f} GB in {time.time() - t0:.0f} s", flush=True)
        wbytes = decode_weight_bytes(path)
        if keep is not None:
            r = bench_torch(c, keep, rng)
            rows.append({"model": model, "engine": "PyTorch fp16 (cuBLAS)", "scheme": "f16", "weight_bytes": wbytes, **r})
            print(rows[-1], flush=True)
            del keep
            gc.collect()
            torch.cuda.empty_cache()
        r = bench_engine(path, min(n_tok, c.vocab_size), rng, args.profile, args.n_batch)
        rows.append({"model": model, "engine": "mergequant CUDA", "scheme": SCHEME_LABEL[scheme],
                     "weight_bytes": wbytes, **r})
        print(rows[-1], flush=True)
        if not args.keep:
            path.unlink()
    for spec in args.extra:
        p, label = spec.split("=", 1)
        r = bench_engine(Path(p), read_mq(p).config.vocab_size, rng, args.profile, args.n_batch)
        rows.append({"model": label, "engine": "mergequant CUDA", "scheme": Path(p).name,
                     "weight_bytes": decode_weight_bytes(Path(p)), **r})
        print(rows[-1], flush=True)

    now = datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC")
    cmd = "python bench/bench_gpu.py " + " ".join(sys.argv[1:])
    md = [f"## GPU: mergequant vs llama.cpp and PyTorch, {model} ({now})", "",
          f"Command: `{cmd}`  ", f"GPU: {gpu}; streaming read {bw / 1e9:.0f} GB/s (torch sum over 4 GiB, same run)  ",
          f"llama.cpp: {build or 'not run'} (llama-bench -ngl 99 -fa 1; prefill pp512/pp2048, decode tg{DECODE} at "
          f"depth {PROMPT}); mergequant: {DECODE} greedy tokens after a {PROMPT}-token prompt, device sampling, "
          f"n_batch {args.n_batch or 'default (2048)'}.  ",
          "Decode GB/s: bytes one decode step reads (every tensor but the embedding table) x decode tok/s.", "",
          *table(rows, bw), "", *ratios(rows), ""]
    print("\n" + "\n".join(md))
    if args.md:
        Path(args.md).write_text("\n".join(md), encoding="utf-8")
    if args.out:
        Path(args.out).write_text(json.dumps({"gpu": gpu, "read_bw": bw, "llama_cpp": build, "rows": rows}, indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
