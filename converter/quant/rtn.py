"""Conversions that need no calibration: every linear packed straight from the checkpoint weights by its
scheme's packer (`plain_blocks`: f16 when no method is named), and the round-to-nearest baselines built on
it: weight-only group-wise int4 (`rtn-w4a16`, scheme w4a16g) and W4A4 with per-token dynamic activations
(`rtn-w4a4-dynamic`, scheme w4a4d)."""
from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import numpy as np

from ..layers import fused_layer
from ..loaders import Checkpoint
from ..schemes import pack_linear


def plain_blocks(ck: Checkpoint, scheme: str, quant: dict[str, Any], **params: Any) -> Iterator[dict[str, np.ndarray]]:
    """Each layer's `blk.{i}.*` tensors with every linear packed by `scheme` (with the packer's `params`,
    e.g. bits=6 for w8a8), norms as float32."""
    for i in range(ck.config.num_hidden_layers):
        out: dict[str, np.ndarray] = {}
        fused = fused_layer(ck, i)
        for name in list(fused):
            w = fused.pop(name)  # each linear's float32 weights released once packed
            if name.endswith("norm.weight"):
                out[name] = w.astype(np.float32)
            else:
                out |= pack_linear(name, w, scheme, quant, **params)
            del w
        yield out


# The output linear (lm_head; a tied model's embedding too): the schemes it may be stored in (docs/format.md,
# "The output linear"). A tied model stores the matrix once: `token_embd.weight` when f16, else the output's
# packed tensors, whose rows the engine's embedding dequantizes.
OUTPUT_SCHEMES = ("f16", "w8a8", "w4a16g")


def default_output_scheme(method: str | None, scheme: str = "f16") -> str:
    """The output linear's scheme when none is asked for: f16 for an f16 model; the default chosen by measurement
    (bench/RESULTS.md, "Quantized output matrix") for every quantized file."""
    if method is None and scheme == "f16":
        return "f16"
    return DEFAULT_QUANT_OUTPUT_SCHEME


DEFAULT_QUANT_OUTPUT_SCHEME = "f16"


def output_tensors(ck: Checkpoint, output_scheme: str, quant: dict[str, Any]) -> dict[str, np.ndarray]:
    """The embedding and output tensors of the file: `token_embd.weight` (F16) unless the model is tied and its
    output is quantized, and the output linear (`output.weight` F16 when untied and f16, else the scheme's
    `output.*` tensors, recorded as quant["linears"]["output"]; f16 is recorded by its absence)."""
    if output_scheme not in OUTPUT_SCHEMES:
        raise ValueError(f"unknown output scheme {output_scheme!r}; known: {', '.join(OUTPUT_SCHEMES)}")
    tied = ck.config.tie_word_embeddings
    emb = ck.get("model.embed_tokens.weight")
    out: dict[str, np.ndarray] = {}
    if not tied or output_scheme == "f16":
        out["token_embd.weight"] = emb.astype(np.float16)
    if tied:
        head = emb
    else:
        del emb  # the float32 embedding and the float32 output matrix are not held together
        head = ck.get("lm_head.weight")
    if output_scheme == "f16":
        if not tied:
            out["output.weight"] = head.astype(np.float16)
    else:
        out |= pack_linear("output", np.asarray(head, np.float32), output_scheme, quant)
    return out


def check_scheme(method: str, own: str, scheme: str | None) -> None:
    """A method writes its own scheme; `scheme` may repeat it (or be convert's default, f16)."""
    if scheme not in (None, "f16", own):
        raise ValueError(f"method {method!r} writes scheme {own!r}; got scheme={scheme!r}")


def rtn_w4a16(ck: Checkpoint, scheme: str | None = None, quant: dict[str, Any] | None = None
              ) -> Iterator[dict[str, np.ndarray]]:
    check_scheme("rtn-w4a16", "w4a16g", scheme)
    quant = {} if quant is None else quant
    quant["params"] = {"weights": "int4 symmetric, fp16 scale per group of 128 along K (64 where K % 128 != 0)"}
    return plain_blocks(ck, "w4a16g", quant)


def rtn_w4a4_dynamic(ck: Checkpoint, scheme: str | None = None, quant: dict[str, Any] | None = None
                     ) -> Iterator[dict[str, np.ndarray]]:
    check_scheme("rtn-w4a4-dynamic", "w4a4d", scheme)
    quant = {} if quant is None else quant
    quant["params"] = {"weights": "int4 symmetric per row (absmax/7)",
                       "activations": "int4 symmetric per token, dynamic (absmax/7)"}
    return plain_blocks(ck, "w4a4d", quant)
