"""gptq-w4a16: GPTQ weights on the w4a16g scheme (int4, an fp16 scale per group of 128 along K, 64 where
K % 128 != 0; fp32 activations), the weight-only recipe of GPTQ checkpoints. Static groups (every group's
scale is fixed from the checkpoint weight before GPTQ runs, so act-order keeps contiguous groups), act-order,
damping 0.01, blocks of 128 columns; each linear's Hessian is XᵀX of its fp32 input computed through the
already-quantized linears (blockwise.py)."""
from __future__ import annotations

from collections.abc import Iterator
from dataclasses import asdict
from typing import Any

import numpy as np

from ..loaders import Checkpoint
from .blockwise import GPTQOptions, blockwise_blocks, weight_params
from .calibrate import calibration_spec
from .rtn import check_scheme


class _GPTQW4A16:
    def __init__(self, opts: GPTQOptions) -> None:
        self.opts = opts

    def smooth(self, layer: int, site: str, x: np.ndarray, w: np.ndarray, tie: Any) -> None:
        return None

    def weights(self, layer: int, site: str, x: np.ndarray, w: np.ndarray) -> tuple[str, dict[str, Any]]:
        return "w4a16g", weight_params("w4a16g", w, x, self.opts)


def gptq_w4a16(ck: Checkpoint, scheme: str | None = None, quant: dict[str, Any] | None = None, *,
               gptq: bool = True, act_order: bool = True, damp: float = 0.01, block: int = 128,
               calib: str | None = None, calib_n: int | None = None, calib_len: int | None = None,
               seed: int | None = None, tokenizer: str | None = None) -> Iterator[dict[str, np.ndarray]]:
    """Switches: gptq=False (RTN on the same grid: the rtn-w4a16 weights), act_order, damp, block."""
    check_scheme("gptq-w4a16", "w4a16g", scheme)
    quant = {} if quant is None else quant
    opts = GPTQOptions(gptq, act_order, damp, block)
    spec = calibration_spec(dict(calib=calib, calib_n=calib_n, calib_len=calib_len, seed=seed, tokenizer=tokenizer))
    quant["params"] = {"weights": "int4 symmetric, fp16 scale per group of 128 along K (64 where K % 128 != 0), "
                                  "static groups" + (", GPTQ codes" if gptq else ", RTN codes"),
                       "activations": "fp32", "options": asdict(opts), "calibration": asdict(spec)}
    return blockwise_blocks(ck, quant, _GPTQW4A16(opts), spec)
