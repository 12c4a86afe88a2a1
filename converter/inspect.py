"""A readable dump of a .mq file: its metadata (config, quant recipe, tokenizer settings) and a table of
its tensors with dtype, shape and size."""
from __future__ import annotations

import json
import re
from pathlib import Path

from .mqfile import MqFile, read_mq
from .quant.simulate import kv_scale_names


def _size(n: int) -> str:
    for unit in ("B", "KiB", "MiB"):
        if n < 1024:
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return f"{n:.2f} GiB"


def kv_cache_line(mq: MqFile) -> str:
    """Which KV caches the file runs with: fp16 always, int8 where every layer has its scales."""
    names = set(mq.names())
    n = mq.config.num_hidden_layers
    have = sum(all(name in names for name in kv_scale_names(i)) for i in range(n))
    if have == 0:
        return "kv cache: fp16 only (no attn_k_scale/attn_v_scale; convert with --kv-int8 for int8)"
    return f"kv cache: fp16 or int8 (attn_k_scale/attn_v_scale in {have} of {n} layers)"


def recipe_lines(params: dict) -> list[str]:
    """The method's recipe (quant.params), one line per entry: its options and calibration as key=value
    lists (every ablation switch the method recorded), text entries as they are, other values as JSON."""
    out = []
    for key, value in params.items():
        if isinstance(value, dict) and all(not isinstance(v, (dict, list)) for v in value.values()):
            text = ", ".join(f"{k}={v}" for k, v in value.items()) or "-"
        elif isinstance(value, str):
            text = value
        else:
            text = json.dumps(value)
        out.append(f"  {key}: {text}")
    return out


def inspect_model(path: str | Path) -> str:
    mq = read_mq(path)
    lines = [f"{mq.path}: format {mq.metadata['format']} v{mq.metadata['format_version']}"]
    if mq.config is not None:
        lines.append(f"config: {mq.config.to_json()}")
    if mq.quant is not None:
        schemes: dict[str, int] = {}
        for s in mq.quant.get("linears", {}).values():
            schemes[s] = schemes.get(s, 0) + 1
        lines.append(f"quant: method {mq.quant.get('method')!r}, linears by scheme {schemes}")
        lines += recipe_lines(mq.quant.get("params", {}))
    if mq.config is not None:
        lines.append(kv_cache_line(mq))
    if mq.tokenizer is not None:
        tok = {k: v for k, v in mq.tokenizer.items() if k != "chat_template"}
        has_template = mq.tokenizer.get("chat_template") is not None
        lines.append(f"tokenizer: {json.dumps(tok)}, chat_template {'present' if has_template else 'absent'}")
    # Natural order, so blk.2 comes before blk.10.
    names = sorted(mq.names(), key=lambda n: [int(p) if p.isdigit() else p for p in re.split(r"(\d+)", n)])
    width = max((len(n) for n in names), default=4)
    lines.append(f"{len(names)} tensors:")
    lines.append(f"  {'name':<{width}}  {'dtype':<5}  {'shape':<16}  bytes")
    total = 0
    for name in names:
        nbytes = mq.nbytes(name)
        total += nbytes
        shape = "[" + ", ".join(str(s) for s in mq.shape(name)) + "]"
        lines.append(f"  {name:<{width}}  {mq.dtype(name):<5}  {shape:<16}  {nbytes}")
    lines.append(f"total tensor data: {total} bytes ({_size(total)}); file {_size(mq.path.stat().st_size)}")
    return "\n".join(lines)
