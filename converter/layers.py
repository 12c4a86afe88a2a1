"""A checkpoint's decoder layer as the .mq file groups it (docs/format.md): q/k/v rows and gate/up rows
concatenated, so one GEMV reads their shared input once. Every method and the calibration driver take a
layer's float32 weights from here."""
from __future__ import annotations

import numpy as np

from .loaders import Checkpoint


def fused_layer(ck: Checkpoint, i: int) -> dict[str, np.ndarray]:
    """Layer i: {prefix: W [N, K] float32} for the four linears (q/k/v rows and gate/up rows concatenated)
    and {name: γ} for the two norms. The concatenated matrices are filled in place, one source tensor at a time
    (no float32 copy of the parts beside the whole): the layer's float32 weights and one source tensor's
    stored bytes are what this holds at most."""
    def get(key: str) -> np.ndarray:
        return ck.get(f"model.layers.{i}.{key}.weight")

    def stacked(keys: tuple[str, ...]) -> np.ndarray:
        names = [f"model.layers.{i}.{key}.weight" for key in keys]
        if not all(n in ck.shapes for n in names):
            return np.concatenate([ck.get(n) for n in names])
        rows = [ck.shapes[n][0] for n in names]
        out = np.empty((sum(rows), ck.shapes[names[0]][1]), np.float32)
        r = 0
        for n, count in zip(names, rows):
            ck.get_into(n, out[r:r + count])
            r += count
        return out

    b = f"blk.{i}."
    return {
        b + "attn_norm.weight": get("input_layernorm"),
        b + "attn_qkv": stacked(("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj")),
        b + "attn_output": get("self_attn.o_proj"),
        b + "ffn_norm.weight": get("post_attention_layernorm"),
        b + "ffn_gate_up": stacked(("mlp.gate_proj", "mlp.up_proj")),
        b + "ffn_down": get("mlp.down_proj"),
    }
