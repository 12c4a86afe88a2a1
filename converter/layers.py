"""A checkpoint's decoder layer as the .mq file groups it (docs/format.md): q/k/v rows and gate/up rows
concatenated, so one GEMV reads their shared input once. Every method and the calibration driver take a
layer's float32 weights from here."""
from __future__ import annotations

import numpy as np

from .loaders import Checkpoint


def fused_layer(ck: Checkpoint, i: int) -> dict[str, np.ndarray]:
    """Layer i: {prefix: W [N, K] float32} for the four linears (q/k/v rows and gate/up rows concatenated)
    and {name: γ} for the two norms."""
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
