"""Quantization methods, selectable by name (convert(..., method=name)) and recorded in the file's quant
recipe. Each is `method(checkpoint, scheme=None, quant=dict, **args)` yielding each layer's `blk.{i}.*`
tensors in order (norms included, since methods fold steps into them); it records its recipe in
`quant["params"]` and each linear's scheme through `schemes.pack_linear`. `quantize` runs one in memory and
returns its simulated model."""
from __future__ import annotations

from typing import Any

import numpy as np
from tqdm import tqdm

from ..loaders import Checkpoint
from .fptq import fptq
from .gptq_w4a16 import gptq_w4a16
from .mergequant import mergequant, rtn_w4a4_static
from .outliertune import outliertune
from .qqq import qqq
from .rtn import default_output_scheme, output_tensors, plain_blocks, rtn_w4a4_dynamic, rtn_w4a16
from .simulate import SimModel
from .smoothquant import smoothquant

METHODS = {
    "rtn-w4a16": rtn_w4a16,
    "rtn-w4a4-dynamic": rtn_w4a4_dynamic,
    "rtn-w4a4-static": rtn_w4a4_static,
    "mergequant": mergequant,
    "gptq-w4a16": gptq_w4a16,
    "smoothquant": smoothquant,
    "qqq": qqq,
    "fptq": fptq,
    "outliertune": outliertune,
}


def quantize(ck: Checkpoint, method: str | None, progress: bool = False, output_scheme: str | None = None,
             **args: Any) -> SimModel:
    """The simulated model of the file `convert(src, out, method=method, output_scheme=..., **args)` would write
    (None: f16), built in memory."""
    quant: dict[str, Any] = {"method": method or "f16", "params": {}, "linears": {}}
    blocks = plain_blocks(ck, "f16", quant) if method is None else METHODS[method](ck, quant=quant, **args)
    tensors: dict[str, np.ndarray] = {}
    for block in tqdm(blocks, total=ck.config.num_hidden_layers, desc=method or "f16", disable=not progress):
        tensors |= block
    tensors |= output_tensors(ck, output_scheme or default_output_scheme(method), quant)
    tensors["output_norm.weight"] = ck.get("model.norm.weight")
    return SimModel(ck.config, tensors, quant)
