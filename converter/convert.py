"""Checkpoint → .mq conversion, one decoder layer at a time: at most one layer of float32 weights is held, and
each layer's packed tensors are streamed to disk as they come (mqfile.MqWriter), so the conversion's memory does
not grow with the model (docs/architecture.md, "Memory of a conversion"; the .mq tensor names and fusions are
those of docs/format.md).

A quantization method plugs in as a function of `quant.methods.METHODS` (that file gives its shape); with no
method every linear is packed by `scheme` (quant/rtn.py, `plain_blocks`). This is the top of the converter:
it imports the layers below and nothing imports it but the package façade (docs/architecture.md)."""
from __future__ import annotations

from dataclasses import asdict
from pathlib import Path
from typing import Any

import numpy as np
from tqdm import tqdm

from .loaders import load_checkpoint
from .mqfile import MqWriter, mq_metadata
from .quant.calibrate import calibration_tokens, stage_sink
from .quant.kv_cache import kv_calibration_args, kv_scale_tensors
from .quant.methods import METHODS
from .quant.rtn import OUTPUT_SCHEMES, default_output_scheme, output_tensors, plain_blocks
from .quant.simulate import SimModel
from .schemes import get_scheme
from .tokenizer import export_tokenizer


def convert(src: str | Path, out: str | Path, scheme: str = "f16", method: str | None = None,
            progress: bool = True, kv_int8: bool = False, scheme_params: dict[str, Any] | None = None,
            output_scheme: str | None = None, **method_args: Any) -> Path:
    """Convert a HF directory or GGUF file into the .mq file `out`; returns its path. With `kv_int8`, the
    finished model's int8 KV-cache steps are calibrated too (quant/kv_cache.py) on the calibration options
    among `method_args` (calib, calib_n, calib_len, seed, tokenizer; default 8 x 512 tokens), which a
    method that takes calibration options gets as well. With no method, `scheme_params` go to the scheme's
    packer (converter/schemes.py; e.g. {"bits": 6} for W6A6 in scheme w8a8). `output_scheme` stores the output
    linear (and a tied model's embedding, read from its rows) as f16, w8a8 or w4a16g (quant/rtn.py
    OUTPUT_SCHEMES; None: `default_output_scheme`)."""
    get_scheme(scheme)  # refuse an unknown scheme, output scheme and method before any work
    if output_scheme is None:
        output_scheme = default_output_scheme(method, scheme)
    if output_scheme not in OUTPUT_SCHEMES:
        raise ValueError(f"unknown output scheme {output_scheme!r}; known: {', '.join(OUTPUT_SCHEMES)}")
    if method is not None and method not in METHODS:
        raise ValueError(f"unknown method {method!r}; known: {', '.join(METHODS)}")
    kv_spec = None
    if kv_int8:
        kv_spec, method_args = kv_calibration_args(METHODS.get(method), method_args)
    ck = load_checkpoint(src)
    tok_meta, tok_tensors = export_tokenizer(ck)
    quant: dict[str, Any] = {"method": method or scheme, "params": {}, "linears": {}}
    if method is None:
        if method_args:
            raise TypeError(f"arguments {sorted(method_args)} need a method (method=None)")
        blocks = plain_blocks(ck, scheme, quant, **(scheme_params or {}))
        if scheme_params:
            quant["params"]["scheme_params"] = dict(scheme_params)
    else:
        if scheme_params:
            raise TypeError("scheme_params apply only without a method (a method packs its own linears)")
        blocks = METHODS[method](ck, scheme=scheme, quant=quant, **method_args)
    cfg = ck.config
    # Each layer's packed tensors go to the writer's scratch file as they come (MqWriter), so the conversion holds
    # one layer; only the int8 KV-cache calibration, which runs the finished model, keeps them all in memory.
    kept: dict[str, np.ndarray] | None = {} if kv_spec is not None else None
    with MqWriter(out) as writer:
        def put(tensors: dict[str, np.ndarray]) -> None:
            writer.add_all(tensors)
            if kept is not None:
                kept.update(tensors)

        put(tok_tensors)
        del tok_tensors
        bar = tqdm(total=cfg.num_hidden_layers, desc=f"convert {Path(src).name}", unit="layer", disable=not progress)
        with stage_sink(bar.set_postfix_str if progress else None):  # the method's stages beside the bar
            for block in blocks:  # (not through tqdm's iterator, which would hold the last block while the next is made)
                put(block)
                del block
                bar.update()
        bar.close()
        put(output_tensors(ck, output_scheme, quant))
        put({"output_norm.weight": ck.get("model.norm.weight").astype(np.float32)})
        if kv_spec is not None:
            sim = SimModel(cfg, kept, quant)
            put(kv_scale_tensors(sim, calibration_tokens(kv_spec, ck), progress))
            quant["params"]["kv_cache"] = {"dtype": "int8", "calibration": asdict(kv_spec)}
        return writer.finish(mq_metadata(cfg, quant, tok_meta))
