"""The `mergequant` command line: convert, generate, chat, inspect, eval, bench.

Run `mergequant COMMAND --help` for each command's options.
"""
from __future__ import annotations

import argparse
import math
import os
import sys
import time
from typing import Optional, Sequence

from .llm import KV_CACHE_TYPES

EPILOG = """examples:
  mergequant generate -p "The capital of France is" -n 32          # built-in SmolLM2, MergeQuant W4A4 (converted once)
  mergequant generate -p "The capital of France is" --scheme f16   # ... its unquantized f16 file
  mergequant convert ./Llama-3.2-1B -o llama.mq                     # HF checkpoint directory -> f16 model file
  mergequant convert model.gguf -o model.mq --method mergequant     # GGUF -> W4A4 static (MergeQuant)
  mergequant convert model.gguf -o model.mq --method qqq --group-size 128   # W4A8 (QQQ), group-wise
  mergequant convert model.gguf -o model.mq --kv-int8               # + scales for the int8 KV cache
  mergequant generate model.mq -p "Hello" --kv-cache int8           # run with the int8 KV cache
  mergequant chat llama.mq
  mergequant eval llama.mq --ppl ../shared/data/eval/wiki.test.raw --ctx 512
  mergequant inspect llama.mq
  mergequant bench llama.mq -p 512 -n 128
"""


def _add_model_args(p: argparse.ArgumentParser, optional: bool) -> None:
    if optional:
        p.add_argument("model", nargs="?", default=None,
                       help="a .mq model file (default: the built-in SmolLM2-135M-Instruct, converted on first use "
                            "into the cache with --method mergequant: W4A4, a few minutes once)")
        p.add_argument("--scheme", default=None, choices=("w4a4", "f16"),
                       help="without MODEL: the default model's file, w4a4 (MergeQuant, the default) or f16 "
                            "(unquantized)")
    else:
        p.add_argument("model", help="a .mq model file")
    p.add_argument("--device", default="auto", help="auto | cpu | cuda | cuda:N (default: auto)")
    p.add_argument("-t", "--threads", type=int, default=None, help="CPU threads (default: one per core)")
    p.add_argument("-c", "--ctx", type=int, default=None, help="context length in tokens (default: min(the model's, 4096))")
    p.add_argument("-b", "--n-batch", type=int, default=None,
                   help="prompt tokens per forward pass (default: the device's, 256 on the CPU, 2048 on CUDA; larger "
                        "reads the weights fewer times and takes more scratch memory)")
    p.add_argument("--kv-cache", default="fp16", choices=KV_CACHE_TYPES,
                   help="KV cache type: fp16 (default) or int8 (needs a model converted with --kv-int8)")


def _add_sampling_args(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("sampling")
    g.add_argument("-n", "--max-tokens", type=int, default=128, help="tokens to generate at most (default 128)")
    g.add_argument("--temp", "--temperature", dest="temperature", type=float, default=0.8,
                   help="temperature; 0 = greedy (default 0.8)")
    g.add_argument("--top-k", type=int, default=40, help="keep the k most likely tokens; 0 = off (default 40)")
    g.add_argument("--top-p", type=float, default=0.95, help="nucleus sampling mass; 1 = off (default 0.95)")
    g.add_argument("--min-p", type=float, default=0.05, help="drop tokens below min_p x the top probability (default 0.05)")
    g.add_argument("--repeat-penalty", dest="repetition_penalty", type=float, default=1.0,
                   help="penalty for tokens already in the sequence; 1 = off (default 1.0)")
    g.add_argument("-s", "--seed", type=int, default=None, help="random seed for reproducible sampling")
    g.add_argument("--stop", action="append", default=None, help="stop string (repeatable)")


def _sampling(a: argparse.Namespace) -> dict:
    return dict(max_tokens=a.max_tokens, temperature=a.temperature, top_k=a.top_k, top_p=a.top_p, min_p=a.min_p,
                repetition_penalty=a.repetition_penalty, seed=a.seed, stop=a.stop)


def _load(a: argparse.Namespace):
    from .llm import LLM
    scheme = getattr(a, "scheme", None)
    if scheme is not None and a.model is not None:
        raise SystemExit(f"{a.command}: --scheme selects the default model's file; a MODEL file has its scheme already")
    return LLM(a.model, device=a.device, n_ctx=a.ctx, threads=a.threads, kv_cache=a.kv_cache, scheme=scheme,
               n_batch=a.n_batch)


def cmd_convert(a: argparse.Namespace) -> int:
    from .convert.convert import convert
    gptq = False if a.no_gptq else (True if a.gptq else None)
    method_args = {k: v for k, v in (("no_clip", a.no_clip or None), ("no_split", a.no_split or None),
                                      ("rank", a.rank), ("gptq", gptq), ("budget", a.budget),
                                      ("budget_down", a.budget_down), ("alloc_down", False if a.no_alloc_down else None),
                                      ("down_a8", a.down_a8 or None),
                                      ("act_order", a.act_order), ("damp", a.damp), ("block", a.gptq_block),
                                      ("alpha", a.alpha), ("bits", a.bits), ("no_smooth", a.no_smooth or None),
                                      ("o_smooth", a.o_smooth), ("down_smooth", a.down_smooth),
                                      ("group_size", a.group_size), ("smooth_steps", a.smooth_steps),
                                      ("smooth_rows", a.smooth_rows), ("grid", a.grid), ("smooth_grid", a.smooth_grid),
                                      ("no_lae", a.no_lae or None),
                                      ("no_policy", a.no_policy or None), ("v0", a.v0), ("v1", a.v1),
                                      ("calib", a.calib), ("calib_n", a.calib_n), ("calib_len", a.calib_len),
                                      ("seed", a.seed), ("report", a.report)) if v is not None}
    calib_only = a.kv_int8 and all(k in ("calib", "calib_n", "calib_len", "seed") for k in method_args)
    if method_args and not a.method and not calib_only:
        raise SystemExit("convert: method options need --method (calibration options need --method or --kv-int8)")
    for kv in a.opt or []:
        if "=" not in kv:
            raise SystemExit(f"--opt expects KEY=VALUE, got {kv!r}")
        k, v = kv.split("=", 1)
        method_args[k] = _parse_value(v)
    if a.method:
        import inspect

        from .convert.quant.methods import METHODS
        if a.method not in METHODS:
            raise SystemExit(f"convert: unknown method {a.method!r}; known: {', '.join(METHODS)}")
        takes = inspect.signature(METHODS[a.method]).parameters
        foreign = [k for k in method_args if k not in takes]
        if foreign:
            flags = ", ".join("--" + k.replace("_", "-") for k in foreign)
            raise SystemExit(f"convert: {flags} do(es) not apply to --method {a.method}")
    t0 = time.time()
    convert(a.src, a.output, scheme=a.scheme, method=a.method, progress=not a.quiet, kv_int8=a.kv_int8,
            output_scheme=a.output_scheme, **method_args)
    size = os.path.getsize(a.output)
    print(f"wrote {a.output} ({size / 1e6:.1f} MB) in {time.time() - t0:.1f} s", file=sys.stderr)
    return 0


def _parse_value(v: str):
    for cast in (int, float):
        try:
            return cast(v)
        except ValueError:
            pass
    if v.lower() in ("true", "false"):
        return v.lower() == "true"
    return v


def cmd_generate(a: argparse.Namespace) -> int:
    llm = _load(a)
    for piece in llm.stream(a.prompt, **_sampling(a)):
        sys.stdout.write(piece)
        sys.stdout.flush()
    sys.stdout.write("\n")
    if a.timings:
        _print_timings(llm.last_timings)
    return 0


def _print_timings(t: dict) -> None:
    pf = t["n_prefill"] / (t["prefill_ms"] / 1e3) if t["prefill_ms"] > 0 else float("nan")
    dc = t["n_decode"] / (t["decode_ms"] / 1e3) if t["decode_ms"] > 0 else float("nan")
    print(f"prefill: {t['n_prefill']} tokens, {pf:.1f} tok/s; decode: {t['n_decode']} tokens, {dc:.1f} tok/s",
          file=sys.stderr)


def cmd_chat(a: argparse.Namespace) -> int:
    llm = _load(a)
    messages: list[dict] = []
    if a.system:
        messages.append({"role": "system", "content": a.system})
    print("chat: /exit to quit, /clear to start over; Ctrl-C stops a reply", file=sys.stderr)
    while True:
        try:
            line = input("> ")
        except (EOFError, KeyboardInterrupt):
            print()
            return 0
        if line.strip() == "/exit":
            return 0
        if line.strip() == "/clear":
            messages = messages[:1] if a.system else []
            continue
        if not line.strip():
            continue
        messages.append({"role": "user", "content": line})
        reply = []
        try:
            for piece in llm.chat(messages, stream=True, **_sampling(a)):
                reply.append(piece)
                sys.stdout.write(piece)
                sys.stdout.flush()
        except KeyboardInterrupt:
            pass
        print()
        messages.append({"role": "assistant", "content": "".join(reply)})
        if a.timings:
            _print_timings(llm.last_timings)


def cmd_inspect(a: argparse.Namespace) -> int:
    from .convert.inspect import inspect_model
    print(inspect_model(a.model))
    # the memory plan at the default context (or --ctx), as the engine computes it before allocating
    from . import _engine

    if a.n_batch is not None and a.n_batch <= 0:
        raise SystemExit(f"inspect: invalid n_batch {a.n_batch}: must be a positive integer")
    plan = _engine.Model(a.model, device=a.device, n_threads=1).memory_plan(a.ctx or 0, a.n_batch or 0, a.kv_cache)
    mib = 1 << 20
    avail = "unknown" if plan["available"] is None else f"{plan['available'] / mib:.1f} MiB"
    print(f"memory on {plan['device']} at n_ctx {plan['n_ctx']} (kv_cache {plan['kv_cache']}, n_batch "
          f"{plan['n_batch']}): weights {plan['weights'] / mib:.1f} MiB + KV cache {plan['kv_cache_bytes'] / mib:.1f} "
          f"MiB + scratch {plan['scratch'] / mib:.1f} MiB = {plan['total'] / mib:.1f} MiB; available {avail}")
    return 0


def cmd_eval(a: argparse.Namespace) -> int:
    if not a.ppl:
        raise SystemExit("eval: nothing to do; give --ppl FILE (and --kld BASE_MODEL for KL divergence)")
    import numpy as np
    from tqdm import tqdm

    from .llm import LLM
    llm = _load(a)
    base = LLM(a.kld, device=a.device, n_ctx=a.ctx, threads=a.threads, n_batch=a.n_batch) if a.kld else None
    with open(a.ppl, encoding="utf-8") as f:
        text = f.read()
    ids = llm.tokenize(text, add_special=False)
    window = a.window or min(llm.n_ctx, 2048)
    if base is not None:
        window = min(window, base.n_ctx)
        if base.tokenize(text[:2000], add_special=False) != llm.tokenize(text[:2000], add_special=False):
            raise SystemExit("eval: --kld model tokenizes differently: compare models of the same tokenizer")
    n_windows = len(ids) // window
    if a.max_windows:
        n_windows = min(n_windows, a.max_windows)
    if n_windows == 0:
        raise SystemExit(f"eval: {a.ppl} has {len(ids)} tokens, fewer than one window of {window}")
    nll, count, kld, same_top = 0.0, 0, 0.0, 0
    for w in tqdm(range(n_windows), desc="evaluate", unit="window", disable=a.quiet):
        win = ids[w * window:(w + 1) * window]
        if base is None:
            lp = llm.token_logprobs(win)
            nll -= float(lp.sum())
            count += len(lp)
            continue
        # KL(base || model) of every next-token distribution in the window: Σ p_base (log p_base - log p)
        lq = llm.log_probs(win)[:-1]
        lp = base.log_probs(win)[:-1]
        nll -= float(lq[np.arange(len(lq)), win[1:]].sum())
        kld += float((np.exp(lp) * (lp - lq)).sum())
        same_top += int((lp.argmax(axis=1) == lq.argmax(axis=1)).sum())
        count += len(lq)
    ppl = math.exp(nll / count)
    print(f"perplexity {ppl:.4f} over {n_windows} windows of {window} tokens ({count} predictions), "
          f"model {llm.path}, device {llm.device}, kv cache {llm.kv_cache}")
    if base is not None:
        print(f"KL divergence vs {a.kld}: mean {kld / count:.6f} nats/token; same top token {same_top / count:.2%}")
    return 0


def cmd_bench(a: argparse.Namespace) -> int:
    """Prefill and decode speed, llama-bench style: a prompt of random tokens, then greedy decode."""
    import random
    llm = _load(a)
    rng = random.Random(0)
    ids = [rng.randrange(llm.n_vocab) for _ in range(a.prompt)]
    if a.prompt + a.gen > llm.n_ctx:
        raise SystemExit(f"bench: {a.prompt} + {a.gen} tokens exceed the context of {llm.n_ctx}")
    llm.generate(ids[:8], max_tokens=2, temperature=0.0)  # warm-up: page the weights in
    rows = []
    for _ in range(a.repeat):
        llm._session.reset()
        llm.generate(ids, max_tokens=a.gen, temperature=0.0, stop_token_ids=None)
        rows.append(llm.last_timings)
    pf = max(t["n_prefill"] / (t["prefill_ms"] / 1e3) for t in rows)
    decoded = [t for t in rows if t["n_decode"]]
    dc = max(t["n_decode"] / (t["decode_ms"] / 1e3) for t in decoded) if decoded else float("nan")
    print(f"model {llm.path} on {llm.device} ({llm._model.n_threads} threads, {llm.kv_cache} KV cache): "
          f"prefill {a.prompt} tokens {pf:.1f} tok/s, decode {dc:.1f} tok/s (best of {a.repeat})")
    return 0


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="mergequant", description="Static 4-bit LLM inference: convert, run, evaluate.",
                                formatter_class=argparse.RawDescriptionHelpFormatter, epilog=EPILOG)
    sub = p.add_subparsers(dest="command", metavar="COMMAND")

    c = sub.add_parser("convert", help="convert a HF checkpoint or GGUF file into a .mq model file",
                       description="Convert a Hugging Face Llama checkpoint directory or a GGUF file into one .mq "
                                   "model file, quantizing with the chosen method.")
    c.add_argument("src", help="HF checkpoint directory (config.json + *.safetensors) or a .gguf file")
    c.add_argument("-o", "--output", required=True, help="output .mq file")
    c.add_argument("--scheme", default="f16", help="linear scheme when no --method is given (default f16)")
    c.add_argument("--output-scheme", default=None, choices=("f16", "w8a8", "w4a16g"),
                   help="scheme of the output matrix (lm_head; with tied embeddings also the embedding, which then "
                        "reads its rows): f16, w8a8 (int8 per row, per-token int8 activations) or w4a16g (int4 "
                        "groups of 128, fp16 scales); default: f16 for an f16 file, else the measured default "
                        "(docs/format.md)")
    c.add_argument("--method", default=None,
                   help="quantization method: mergequant (W4A4 static), rtn-w4a4-static, rtn-w4a4-dynamic, rtn-w4a16, "
                        "gptq-w4a16 (GPTQ, w4a16g), smoothquant (W8A8), qqq (W4A8), fptq (W4A8), outliertune (W8A8 / W6A6 "
                        "with --bits, static per-channel inputs); none: plain --scheme")
    m = c.add_argument_group("mergequant options (defaults: every component on)")
    m.add_argument("--no-clip", action="store_true", help="no adaptive clipping of activation ranges / weight steps")
    m.add_argument("--no-split", action="store_true", help="no dimensional reconstruction (channel splitting)")
    m.add_argument("--rank", type=int, default=None,
                   help="rank of the low-rank compensation (default 16; ffn_down and attn_output take 32, "
                        "--opt rank_down=R / rank_o=R); 0 = off everywhere")
    m.add_argument("--no-gptq", action="store_true",
                   help="round-to-nearest weight codes instead of GPTQ (the low-rank branch then fits RTN's error)")
    m.add_argument("--budget", type=float, default=None, help="channel-split budget as a share of K (default 0.03)")
    m.add_argument("--budget-down", type=float, default=None,
                   help="ffn_down's own channel-split budget (default 0.35: its SwiGLU input carries the most error)")
    m.add_argument("--no-alloc-down", action="store_true",
                   help="ffn_down's split budget in every layer alike, instead of shared by the layers under the same "
                        "total (the default: each layer's share from a float probe of 8 calibration sequences; "
                        "--opt alloc_probe=N, alloc_cap=X)")
    m.add_argument("--down-a8", action="store_true",
                   help="mixed precision: ffn_down as w4a8 (per-token int8 inputs, smoothing folded into the up rows) "
                        "instead of static W4A4")
    m.add_argument("--report", metavar="FILE", default=None,
                   help="write a per-linear error report (JSON): output error from the weights alone, the input "
                        "quantization alone and both, on 4 held-out calibration windows")
    g = c.add_argument_group("gptq-w4a16 / smoothquant / qqq / fptq / outliertune options (docs/methods.md; defaults: the published "
                             "recipes)")
    g.add_argument("--gptq", action="store_true", help="GPTQ weight codes where the method defaults to RTN (smoothquant, fptq)")
    g.add_argument("--act-order", dest="act_order", action="store_true", default=None,
                   help="GPTQ columns in decreasing input energy (default on for mergequant, gptq-w4a16 and qqq)")
    g.add_argument("--no-act-order", dest="act_order", action="store_false", help="GPTQ columns in natural order")
    g.add_argument("--damp", type=float, default=None, help="GPTQ damping, a fraction of mean(diag H) (default 0.01)")
    g.add_argument("--gptq-block", type=int, default=None, help="GPTQ lazy-update block in columns (default 128)")
    g.add_argument("--alpha", type=float, default=None, help="smoothquant migration strength (default 0.5)")
    g.add_argument("--bits", type=int, default=None, choices=(8, 6), help="smoothquant / outliertune: W8A8 (8, default) or W6A6 (6)")
    g.add_argument("--no-smooth", action="store_true", help="smoothquant / qqq: no smoothing (plain RTN or GPTQ)")
    g.add_argument("--o-smooth", default=None, choices=("tie", "skip"),
                   help="o_proj input smoothing: tie (into the v rows, tied per KV group; default) or skip")
    g.add_argument("--down-smooth", default=None, choices=("up", "skip"),
                   help="smoothquant: down_proj input smoothing into the up rows (default) or skip")
    g.add_argument("--group-size", type=int, default=None, choices=(0, 128),
                   help="qqq / fptq: 0 = per-channel int4 (w4a8; qqq's default), 128 = group-wise (w4a8g; fptq's default)")
    g.add_argument("--smooth-steps", type=int, default=None,
                   help="qqq: thresholds searched per point (default 40, the setting bench/RESULTS.md measures; "
                        "100 took about twice the conversion time)")
    g.add_argument("--smooth-rows", type=int, default=None, help="qqq: tokens the smoothing loss uses (default 512)")
    g.add_argument("--grid", default=None, choices=("mse", "ceil"),
                   help="qqq --group-size 128: how the w4a8g grid (a channel scale s per row times an integer group "
                        "scale g in [1, 16] per group) is chosen before GPTQ and in the smoothing search. mse "
                        "(default): per row, s = c·max|W|/112 for c in 0.6..1 and each group's g minimizing its "
                        "squared rounding error, the row's best kept (SmolLM2, 40 thresholds, bench/RESULTS.md: "
                        "perplexity 1.21x f16's, KL 0.22, against ceil's 1.32x, KL 0.29); ceil: s = max|W|/112, "
                        "g = the smallest integer keeping the group within 7 steps (no clipping; cheaper to convert)")
    g.add_argument("--smooth-grid", default=None, choices=("same", "ceil"),
                   help="qqq --group-size 128: the grid the smoothing search rounds its trial weights on: ceil "
                        "(default, whatever --grid is) or same (the --grid of the written weights). SmolLM2, "
                        "40 thresholds, --grid mse (bench/RESULTS.md): ceil 1.21x f16 perplexity, KL 0.22; "
                        "same 1.26x, KL 0.25 and 3-5x the convert time")
    g.add_argument("--no-lae", action="store_true", help="fptq: no logarithmic activation equalization")
    g.add_argument("--no-policy", action="store_true", help="fptq: LAE at every norm-fed point (no v0/v1 policy)")
    g.add_argument("--v0", type=float, default=None, help="fptq: LAE only from this activation range up (default 15)")
    g.add_argument("--v1", type=float, default=None, help="fptq: ... and up to this range (default 150)")
    c.add_argument("--kv-int8", action="store_true",
                   help="also calibrate static per-channel scales for the int8 KV cache (--kv-cache int8 at run "
                        "time), on the finished model (any --method); default calibration 8 x 512 tokens")
    cal = c.add_argument_group("calibration (static methods and --kv-int8; given options apply to both)")
    cal.add_argument("--calib", default=None, help="calibration text file, or wikitext2 | c4 | wikitext2+c4 (default)")
    cal.add_argument("--calib-n", type=int, default=None,
                     help="calibration sequences (default: methods 32, --kv-int8 8)")
    cal.add_argument("--calib-len", type=int, default=None, help="tokens per calibration sequence (default 512)")
    cal.add_argument("--seed", type=int, default=None, help="calibration sampling seed")
    c.add_argument("--opt", action="append", metavar="KEY=VALUE", help="any other method option (repeatable)")
    c.add_argument("-q", "--quiet", action="store_true", help="no progress bars")
    c.set_defaults(func=cmd_convert)

    g = sub.add_parser("generate", help="complete a prompt", description="Complete a prompt and stream the text.")
    _add_model_args(g, optional=True)
    g.add_argument("-p", "--prompt", required=True, help="the prompt text")
    g.add_argument("--timings", action="store_true", help="print prefill and decode tokens/s")
    _add_sampling_args(g)
    g.set_defaults(func=cmd_generate)

    ch = sub.add_parser("chat", help="interactive chat with the model's chat template",
                        description="Chat in the terminal; /exit quits, /clear forgets the conversation.")
    _add_model_args(ch, optional=True)
    ch.add_argument("-sys", "--system", default=None, help="system message")
    ch.add_argument("--timings", action="store_true", help="print prefill and decode tokens/s after each reply")
    _add_sampling_args(ch)
    ch.set_defaults(func=cmd_chat)

    i = sub.add_parser("inspect", help="print a model file's metadata and tensor table")
    i.add_argument("model", help="a .mq model file")
    i.add_argument("--device", default="cpu", help="device the memory plan is for (default cpu)")
    i.add_argument("-c", "--ctx", type=int, default=None, help="context length of the plan (default min(trained, 4096))")
    i.add_argument("--kv-cache", default="fp16", choices=KV_CACHE_TYPES, help="KV cache type of the plan")
    i.add_argument("-b", "--n-batch", type=int, default=None,
                   help="prompt tokens per pass of the plan (default: the device's, 256 on the CPU, 2048 on CUDA)")
    i.set_defaults(func=cmd_inspect)

    e = sub.add_parser("eval", help="perplexity (and KL divergence vs a base model) on a text file",
                       description="Perplexity over non-overlapping windows of the file's tokens (each window a fresh "
                                   "context; every token after the first of a window is predicted); with --kld, "
                                   "the KL divergence from a base model's distributions on the same windows.")
    _add_model_args(e, optional=False)
    e.add_argument("--ppl", metavar="FILE", help="text file (e.g. wiki.test.raw)")
    e.add_argument("--kld", metavar="BASE_MODEL",
                   help="also the mean KL divergence of MODEL's next-token distributions from BASE_MODEL's "
                        "(e.g. the f16 conversion of the same checkpoint) on the same windows")
    e.add_argument("--window", type=int, default=None, help="window length in tokens (default min(n_ctx, 2048))")
    e.add_argument("--max-windows", type=int, default=None, help="evaluate at most this many windows")
    e.add_argument("-q", "--quiet", action="store_true", help="no progress bar")
    e.set_defaults(func=cmd_eval)

    b = sub.add_parser("bench", help="prefill and decode tokens/s of a model",
                       description="Time the prefill of a prompt of random tokens and the greedy decode after it.")
    _add_model_args(b, optional=True)
    b.add_argument("-p", "--prompt", type=int, default=256, help="prompt tokens (default 256)")
    b.add_argument("-n", "--gen", type=int, default=64, help="tokens to decode (default 64)")
    b.add_argument("-r", "--repeat", type=int, default=2, help="runs; the best is reported (default 2)")
    b.set_defaults(func=cmd_bench)
    return p


def main(argv: Optional[Sequence[str]] = None) -> int:
    parser = build_parser()
    a = parser.parse_args(argv)
    if not a.command:
        parser.print_help()
        return 2
    from . import _engine
    try:
        return a.func(a)
    except (FileNotFoundError, ValueError, _engine.EngineError) as e:
        print(f"mergequant {a.command}: error: {e}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        return 130


if __name__ == "__main__":
    sys.exit(main())
