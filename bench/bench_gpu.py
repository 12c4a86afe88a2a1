"""GPU end-to-end benchmark: a Llama-2-7B-shaped model with random weights, written straight into the .mq
format for each scheme (no calibration), run by the CUDA engine; a PyTorch fp16 forward (cuBLAS matmuls,
KV cache) on the same f16 weights as the baseline; the streaming-read bandwidth measured in the same run.

Reports per model: decode tokens/s at batch 1 (128 tokens after a 512-token prompt, greedy), prefill
tokens/s for 512 and 2048 tokens, and the weight bytes one decode step reads per token, as GB/s and as a
share of the measured read bandwidth. Extra model files (e.g. SmolLM2-135M) are benchmarked the same way.

    python bench/bench_gpu.py --tokenizer DIR [--extra MODEL.mq=LABEL ...] [--out results.json]

Random-weight files: f16 (normal, sd 0.02), w4a16g (random codes, fp16 group scales), w4a4 (random static
RTN codes, per-row scales, identity in_map and in_scale of ones: plain static RTN). The weights are drawn
with torch on the GPU (seeded per tensor) and copied back to be written with mergequant.convert.mqfile.
"""
from __future__ import annotations

import argparse
import datetime
import gc
import json
import statistics
import sys
import tempfile
import time
import zlib
from pathlib import Path

import numpy as np
import torch

from mergequant import LLM
from mergequant.convert.config import LlamaConfig
from mergequant.convert.mqfile import read_mq, write_mq
from mergequant.convert.schemes import get_scheme
from mergequant.convert.tokenizer import export_source

LLAMA2_7B = LlamaConfig(architecture="llama", vocab_size=32000, hidden_size=4096, intermediate_size=11008,
                        num_hidden_layers=32, num_attention_heads=32, num_key_value_heads=32, head_dim=128,
                        max_position_embeddings=4096, rms_norm_eps=1e-5, rope_theta=10000.0, rope_scaling=None,
                        tie_word_embeddings=False)
PROMPT, DECODE, PREFILLS = 512, 128, (512, 2048)


def linear_shapes(c: LlamaConfig) -> dict[str, tuple[int, int]]:
    """(N, K) of each linear of a block (docs/format.md: q/k/v and gate/up fused)."""
    hd = c.head_dim
    return {"attn_qkv": ((c.num_attention_heads + 2 * c.num_key_value_heads) * hd, c.hidden_size),
            "attn_output": (c.hidden_size, c.num_attention_heads * hd),
            "ffn_gate_up": (2 * c.intermediate_size, c.hidden_size),
            "ffn_down": (c.hidden_size, c.intermediate_size)}


def seeded(name: str) -> torch.Generator:
    g = torch.Generator(device="cuda")
    g.manual_seed(zlib.crc32(name.encode()))
    return g


def f16_weight(name: str, n: int, k: int) -> torch.Tensor:
    return (torch.randn(n, k, device="cuda", generator=seeded(name)) * 0.02).half()


def random_tensor(name: str, dtype: np.dtype, shape: tuple[int, ...]) -> np.ndarray:
    """Random contents of a packed tensor: any byte is a valid pair of int4 codes; scales positive."""
    g = seeded(name)
    if dtype == np.uint8:
        t = torch.randint(0, 256, shape, device="cuda", dtype=torch.uint8, generator=g)
    elif dtype == np.float16:
        t = (torch.rand(shape, device="cuda", generator=g) * 0.004 + 0.001).half()
    else:
        t = torch.rand(shape, device="cuda", generator=g) * 0.004 + 0.001
    return t.cpu().numpy()


def build_model(path: Path, scheme: str, c: LlamaConfig, tok_meta: dict, tok_tensors: dict,
                keep: dict | None = None) -> Path:
    """Writes the model; for f16 the GPU copies of the weights go into `keep` (the PyTorch baseline)."""
    tensors = dict(tok_tensors)
    D, V = c.hidden_size, c.vocab_size
    emb = f16_weight("token_embd", V, D)
    out = f16_weight("output", V, D)
    tensors["token_embd.weight"] = emb.cpu().numpy()
    tensors["output.weight"] = out.cpu().numpy()
    tensors["output_norm.weight"] = np.ones(D, np.float32)
    if keep is not None:
        keep.update(emb=emb, out=out, layers=[])
    quant = {"method": {"f16": "f16", "w4a16g": "rtn-w4a16", "w4a4": "rtn-w4a4-static"}[scheme],
             "params": {"options": {"random_weights": True}}, "linears": {}}
    for i in range(c.num_hidden_layers):
        tensors[f"blk.{i}.attn_norm.weight"] = np.ones(D, np.float32)
        tensors[f"blk.{i}.ffn_norm.weight"] = np.ones(D, np.float32)
        layer = {}
        for short, (n, k) in linear_shapes(c).items():
            p = f"blk.{i}.{short}"
            quant["linears"][p] = scheme
            if scheme == "f16":
                w = f16_weight(p, n, k)
                tensors[f"{p}.weight"] = w.cpu().numpy()
                layer[short] = w
                continue
            for suffix, (dtype, shape) in get_scheme(scheme).layout(n, k).items():
                tensors[f"{p}.{suffix}"] = random_tensor(f"{p}.{suffix}", dtype, shape)
            if scheme == "w4a4":  # plain static RTN: identity slots (K is a multiple of 64 here), in_scale 1
                kp = tensors[f"{p}.qweight"].shape[1] * 2
                if short != "attn_output":
                    in_map = np.tile(np.array([-1, 0, 1], np.int32), (kp, 1))
                    in_map[:k, 0] = np.arange(k)
                    tensors[f"{p}.in_map"] = in_map
                if short in ("attn_qkv", "ffn_gate_up"):
                    tensors[f"{p}.in_scale"] = np.ones(k, np.float32)
        if keep is not None:
            keep["layers"].append(layer)
    write_mq(path, c, quant, tok_meta, tensors)
    return path


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


def profile_decode(llm: LLM, prompt: list[int], n: int = 32, top: int = 12) -> None:
    """Device time per decode token by kernel (CUPTI through torch.profiler; graph-launched kernels are
    recorded too): the prompt is cached first, so the profiled call runs one-token steps only."""
    from torch.profiler import ProfilerActivity, profile

    llm.generate(prompt, max_tokens=1, temperature=0.0)
    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        llm.generate(prompt, max_tokens=n, temperature=0.0)
    steps = llm.last_timings["n_decode"] + 1
    ev = [(e.key, e.count, getattr(e, "device_time_total", 0) or getattr(e, "cuda_time_total", 0))
          for e in prof.key_averages()]
    ev = sorted((e for e in ev if e[2] > 0), key=lambda e: -e[2])
    total = sum(e[2] for e in ev)
    print(f"  decode profile: {total / steps:.0f} us of kernels per token over {steps} steps", flush=True)
    for name, count, us in ev[:top]:
        print(f"    {us / steps:8.1f} us/token  {count / steps:5.1f} calls/token  {name[:90]}", flush=True)


def bench_engine(path: Path, n_vocab_tok: int, rng: np.random.Generator, profile: bool = False) -> dict:
    llm = LLM(str(path), device="cuda", n_ctx=4096)
    ids = lambda n: rng.integers(3, n_vocab_tok, n).tolist()  # noqa: E731  (fresh prompts: no cached prefix)
    llm.generate(ids(64), max_tokens=16, temperature=0.0)  # warm-up: module load, first capture
    if profile:
        try:
            profile_decode(llm, ids(PROMPT))
        except Exception as e:  # the profiler is a diagnostic: the benchmark goes on without it
            print(f"  decode profile failed: {e}", flush=True)
    decode = []
    for _ in range(2):
        llm.generate(ids(PROMPT), max_tokens=DECODE, temperature=0.0)
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

    def norm(self, x: torch.Tensor) -> torch.Tensor:
        xf = x.float()
        return (xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + self.c.rms_norm_eps)).half()

    def rope(self, x: torch.Tensor, pos: slice) -> torch.Tensor:
        half = x.shape[-1] // 2
        rot = torch.cat([-x[..., half:], x[..., :half]], -1)
        return x * self.cos[pos] + rot * self.sin[pos]

    @torch.inference_mode()
    def forward(self, ids: torch.Tensor, pos0: int) -> torch.Tensor:
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


def bench_torch(c: LlamaConfig, w: dict, rng: np.random.Generator) -> dict:
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
    del m
    torch.cuda.empty_cache()
    return res


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--tokenizer", required=True, help="tokenizer source (a directory or .gguf) for the files")
    ap.add_argument("--extra", action="append", default=[], help="MODEL.mq=LABEL: also benchmark this file")
    ap.add_argument("--schemes", default="f16,w4a16g,w4a4")
    ap.add_argument("--workdir", default=None, help="where the random-weight files go (default: a temp dir)")
    ap.add_argument("--out", default=None, help="write the results as JSON here")
    ap.add_argument("--no-torch", action="store_true", help="skip the PyTorch fp16 baseline")
    ap.add_argument("--profile", action="store_true", help="print each engine model's device time per decode token by kernel")
    args = ap.parse_args()
    if not torch.cuda.is_available():
        print("no CUDA device", file=sys.stderr)
        return 1
    rng = np.random.default_rng(0)
    tok_meta, tok_tensors = export_source(args.tokenizer)
    n_tok = len(tok_tensors["tokenizer.token_offsets"]) - 1
    bw = stream_bandwidth()
    gpu = torch.cuda.get_device_name()
    print(f"{gpu}: streaming read {bw / 1e9:.0f} GB/s", flush=True)
    rows = []
    work = Path(args.workdir or tempfile.mkdtemp(prefix="bench_gpu_"))
    work.mkdir(parents=True, exist_ok=True)
    c = LLAMA2_7B
    for scheme in args.schemes.split(","):
        t0 = time.time()
        keep = {} if scheme == "f16" and not args.no_torch else None
        path = build_model(work / f"llama2-7b-{scheme}.mq", scheme, c, tok_meta, tok_tensors, keep)
        wbytes = decode_weight_bytes(path)
        print(f"{scheme}: wrote {path.stat().st_size / 1e9:.1f} GB in {time.time() - t0:.0f} s", flush=True)
        if keep is not None:
            r = bench_torch(c, keep, rng)
            rows.append({"model": "Llama-2-7B shape", "engine": "PyTorch fp16 (cuBLAS)", "scheme": "f16",
                         "weight_bytes": wbytes, **r})
            print(rows[-1], flush=True)
            del keep
            gc.collect()
            torch.cuda.empty_cache()
        r = bench_engine(path, min(n_tok, c.vocab_size), rng, args.profile)
        rows.append({"model": "Llama-2-7B shape", "engine": "mergequant CUDA", "scheme": scheme,
                     "weight_bytes": wbytes, **r})
        print(rows[-1], flush=True)
        path.unlink()
    for spec in args.extra:
        p, label = spec.split("=", 1)
        r = bench_engine(Path(p), read_mq(p).config.vocab_size, rng, args.profile)
        rows.append({"model": label, "engine": "mergequant CUDA", "scheme": label.split()[-1],
                     "weight_bytes": decode_weight_bytes(Path(p)), **r})
        print(rows[-1], flush=True)

    print(f"\n{gpu}, streaming read {bw / 1e9:.0f} GB/s (torch sum over 4 GiB), {datetime.date(2026, 11, 22)}")
    print("| model | engine | scheme | decode tok/s | weight GB/s | of read BW | prefill 512 tok/s | prefill 2048 tok/s |")
    print("|---|---|---|---|---|---|---|---|")
    for r in rows:
        gbs = r["weight_bytes"] * r["decode_tok_s"] / 1e9
        print(f"| {r['model']} | {r['engine']} | {r['scheme']} | {r['decode_tok_s']:.1f} | {gbs:.0f} | "
              f"{gbs * 1e9 / bw:.0%} | {r['prefill512_tok_s']:.0f} | {r['prefill2048_tok_s']:.0f} |")
    if args.out:
        Path(args.out).write_text(json.dumps({"gpu": gpu, "read_bw": bw, "rows": rows}, indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
