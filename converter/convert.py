"""Checkpoint → .mq conversion, one decoder layer at a time: at most one layer of float32 weights is held
while the packed outputs accumulate (the .mq tensor names and fusions are those of docs/format.md).

A quantization method plugs in as a function of `quant.METHODS` with the same shape as `plain_blocks`:
`method(checkpoint, scheme=..., quant=..., **method_args)` yields, for each layer in order, the dict of that
layer's `blk.{i}.*` tensors (norms included, since methods fold steps into them); it records its recipe in
`quant["params"]` and each linear's scheme through `schemes.pack_linear`."""
from __future__ import annotations

from collections.abc import Iterator
from dataclasses import asdict
from pathlib import Path
from typing import Any

import numpy as np
from tqdm import tqdm

from .loaders import Checkpoint, load_checkpoint
from .mqfile import write_mq
from .schemes import get_scheme, pack_linear


def fused_layer(ck: Checkpoint, i: int) -> dict[str, np.ndarray]:
    """Layer i as the .mq file groups it: {prefix: W [N, K] float32} for the four linears (q/k/v rows and
    gate/up rows concatenated) and {name: γ} for the two norms."""
    def get(key: str) -> np.ndarray:
        return ck.get(f"model.layers.{i}.{key}.weight")

    b = f"blk.{i}."
    return {
        b + "attn_norm.weight": get("input_layernorm"),
        b + "attn_qkv": np.concatenate([get("self_attn.q_proj"), get("self_attn.k_proj"), get("self_attn.v_proj")]),
        b + "attn_output": get("self_attn.o_proj"),
        b + "ffn_norm.weight": get("post_attention_layernorm"),
        b + "ffn_gate_up": np.concatenate([get("mlp.gate_proj"), get("mlp.up_proj")]),
        b + "ffn_down": get("mlp.down_proj"),
    }


def plain_blocks(ck: Checkpoint, scheme: str, quant: dict[str, Any]) -> Iterator[dict[str, np.ndarray]]:
    """No method: every linear packed straight from the checkpoint weights with `scheme`."""
    for i in range(ck.config.num_hidden_layers):
        out: dict[str, np.ndarray] = {}
        for name, w in fused_layer(ck, i).items():
            if name.endswith("norm.weight"):
                out[name] = w.astype(np.float32)
            else:
                out |= pack_linear(name, w, scheme, quant)
        yield out


def convert(src: str | Path, out: str | Path, scheme: str = "f16", method: str | None = None,
            progress: bool = True, kv_int8: bool = False, **method_args: Any) -> Path:
    """Convert a HF directory or GGUF file into the .mq file `out`; returns its path. With `kv_int8`, the
    finished model's int8 KV-cache steps are calibrated too (quant/kv_cache.py) on the calibration options
    among `method_args` (calib, calib_n, calib_len, seed, tokenizer; default 8 x 512 tokens), which a
    method that takes calibration options gets as well."""
    from .quant import METHODS
    from .tokenizer import export_tokenizer

    get_scheme(scheme)  # refuse an unknown scheme and method before any work
    if method is not None and method not in METHODS:
        raise ValueError(f"unknown method {method!r}; known: {', '.join(METHODS)}")
    kv_spec = None
    if kv_int8:
        from .quant.kv_cache import kv_calibration_args

        kv_spec, method_args = kv_calibration_args(METHODS.get(method), method_args)
    ck = load_checkpoint(src)
    tok_meta, tensors = export_tokenizer(ck)
    quant: dict[str, Any] = {"method": method or scheme, "params": {}, "linears": {}}
    if method is None:
        if method_args:
            raise TypeError(f"arguments {sorted(method_args)} need a method (method=None)")
        blocks = plain_blocks(ck, scheme, quant)
    else:
        blocks = METHODS[method](ck, scheme=scheme, quant=quant, **method_args)
    cfg = ck.config
    for block in tqdm(blocks, total=cfg.num_hidden_layers, desc=f"convert {Path(src).name}",
                      unit="layer", disable=not progress):
        tensors |= block
    tensors["token_embd.weight"] = ck.get("model.embed_tokens.weight").astype(np.float16)
    tensors["output_norm.weight"] = ck.get("model.norm.weight").astype(np.float32)
    if not cfg.tie_word_embeddings:
        tensors["output.weight"] = ck.get("lm_head.weight").astype(np.float16)
    if kv_spec is not None:
        from .quant.calibrate import calibration_tokens
        from .quant.kv_cache import kv_scale_tensors
        from .quant.simulate import SimModel

        sim = SimModel(cfg, tensors, quant)
        tensors |= kv_scale_tensors(sim, calibration_tokens(kv_spec, ck), progress)
        quant["params"]["kv_cache"] = {"dtype": "int8", "calibration": asdict(kv_spec)}
    return write_mq(out, cfg, quant, tok_meta, tensors)
