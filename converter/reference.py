"""The fp32 numpy reference of a Llama forward pass, written to be read top to bottom. It is the oracle
the engine is compared against and the model that calibration runs layer by layer, so its per-layer
pieces (rmsnorm, rope, attention, mlp, block_forward) are plain module functions.

Conventions: activations are [T, D] float32 (T tokens of one sequence); weights are W [N, K] with
y = x · Wᵀ; RoPE is the Hugging Face rotate_half layout (dimension i pairs with i + head_dim/2)."""
from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import NamedTuple

import numpy as np

from .config import LlamaConfig
from .mqfile import read_mq

# Short names of one block's tensors (Hugging Face names without "model.layers.{i}." and ".weight").
LAYER_KEYS = ("input_layernorm", "self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj",
              "self_attn.o_proj", "post_attention_layernorm", "mlp.gate_proj", "mlp.up_proj",
              "mlp.down_proj")


def layer_tensors(tensors: Mapping[str, np.ndarray], i: int) -> dict[str, np.ndarray]:
    """Block i's weights from a Hugging Face-named mapping, as float32, keyed by LAYER_KEYS."""
    return {k: np.asarray(tensors[f"model.layers.{i}.{k}.weight"], dtype=np.float32) for k in LAYER_KEYS}


def rmsnorm(x: np.ndarray, weight: np.ndarray, eps: float) -> np.ndarray:
    # y = x / sqrt(mean(x²) + eps) · γ
    return x / np.sqrt(np.mean(x * x, axis=-1, keepdims=True) + eps) * weight


def rope_inv_freq(config: LlamaConfig) -> np.ndarray:
    """θ_j = theta^(-2j/hd) for j < hd/2, with llama3 scaling applied when configured (float64)."""
    hd = config.head_dim
    inv_freq = config.rope_theta ** (-np.arange(0, hd, 2, dtype=np.float64) / hd)
    s = config.rope_scaling
    if s is None:
        return inv_freq
    # llama3: long wavelengths are slowed by `factor`, short ones kept, the band between interpolated.
    old_ctx = s["original_max_position_embeddings"]
    low, high, factor = s["low_freq_factor"], s["high_freq_factor"], s["factor"]
    wavelen = 2 * np.pi / inv_freq
    smooth = np.clip((old_ctx / wavelen - low) / (high - low), 0.0, 1.0)
    return (1 - smooth) * inv_freq / factor + smooth * inv_freq


def rope_cos_sin(config: LlamaConfig, positions: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """cos/sin tables [T, hd] for the given positions; angles in float64 so long positions stay exact."""
    angles = np.outer(positions.astype(np.float64), rope_inv_freq(config))
    angles = np.concatenate([angles, angles], axis=-1)
    return np.cos(angles).astype(np.float32), np.sin(angles).astype(np.float32)


def rope(x: np.ndarray, cos: np.ndarray, sin: np.ndarray) -> np.ndarray:
    """x [T, H, hd] → x·cos + rotate_half(x)·sin, rotate_half(x) = [-x2, x1]."""
    half = x.shape[-1] // 2
    rotated = np.concatenate([-x[..., half:], x[..., :half]], axis=-1)
    return x * cos[:, None, :] + rotated * sin[:, None, :]


def attention(q: np.ndarray, k: np.ndarray, v: np.ndarray, q_offset: int) -> np.ndarray:
    """Causal grouped-query attention. q [T, H, hd]; k, v [S, Hkv, hd] for key positions 0..S-1; query t
    sits at position q_offset + t and sees keys s ≤ q_offset + t. q head h uses kv head h // (H / Hkv).
    Returns [T, H·hd]."""
    t, h, hd = q.shape
    s, hkv, _ = k.shape
    g = h // hkv
    qg = q.reshape(t, hkv, g, hd).transpose(1, 2, 0, 3)             # [Hkv, G, T, hd]
    scores = qg @ k.transpose(1, 2, 0)[:, None] / math.sqrt(hd)        # [Hkv, G, T, S]
    visible = np.arange(s)[None, :] <= (q_offset + np.arange(t))[:, None]
    scores = np.where(visible, scores, -np.inf)
    p = np.exp(scores - scores.max(axis=-1, keepdims=True))
    p /= p.sum(axis=-1, keepdims=True)
    out = p @ v.transpose(1, 0, 2)[:, None]                          # [Hkv, G, T, hd]
    return out.transpose(2, 0, 1, 3).reshape(t, h * hd).astype(np.float32, copy=False)


def silu(x: np.ndarray) -> np.ndarray:
    return x / (1 + np.exp(-x))


def linear_input(x: np.ndarray, f16_inputs: bool) -> np.ndarray:
    """A linear's input as the product uses it: x, or fp16(x) widened back (an f16 .mq file's linears)."""
    return x.astype(np.float16).astype(np.float32) if f16_inputs else x


def mlp(x: np.ndarray, gate: np.ndarray, up: np.ndarray, down: np.ndarray,
        capture: dict[str, np.ndarray] | None = None, f16_inputs: bool = False) -> np.ndarray:
    """SwiGLU: down(silu(x·gateᵀ) ⊙ x·upᵀ)."""
    xi = linear_input(x, f16_inputs)
    h = silu(xi @ gate.T) * (xi @ up.T)
    if capture is not None:
        capture["ffn_down"] = h
    return linear_input(h, f16_inputs) @ down.T


@dataclass
class KVCache:
    """One layer's keys/values [capacity, Hkv, hd] (post-RoPE keys); the first `length` rows are valid."""
    k: np.ndarray
    v: np.ndarray
    length: int = 0

    @classmethod
    def empty(cls, config: LlamaConfig) -> KVCache:
        shape = (0, config.num_key_value_heads, config.head_dim)
        return cls(np.zeros(shape, np.float32), np.zeros(shape, np.float32))

    def append(self, k: np.ndarray, v: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        need = self.length + k.shape[0]
        if need > self.k.shape[0]:  # grow by doubling so decoding n tokens copies O(n) rows in total
            cap = max(need, 2 * self.k.shape[0], 64)
            for name in ("k", "v"):
                old = getattr(self, name)
                grown = np.zeros((cap, *old.shape[1:]), np.float32)
                grown[:self.length] = old[:self.length]
                setattr(self, name, grown)
        self.k[self.length:need] = k
        self.v[self.length:need] = v
        self.length = need
        return self.k[:need], self.v[:need]


def block_forward(x: np.ndarray, layer: Mapping[str, np.ndarray], config: LlamaConfig, start_pos: int = 0,
                  cache: KVCache | None = None, capture: dict[str, np.ndarray] | None = None,
                  f16_inputs: bool = False) -> np.ndarray:
    """One decoder block on x [T, D] at positions start_pos.. . With a cache, its first start_pos rows are
    the earlier tokens; without one, the T tokens attend only to each other. `capture`, when given,
    receives the input of each fused linear of the .mq file (attn_qkv, attn_output, ffn_gate_up, ffn_down),
    which is what calibration needs. `f16_inputs`: every linear's input rounded to fp16 first, and q, k, v
    before attention, as an f16 .mq file defines its block (docs/numerics.md)."""
    h, hkv, hd = config.num_attention_heads, config.num_key_value_heads, config.head_dim
    t = x.shape[0]
    a = rmsnorm(x, layer["input_layernorm"], config.rms_norm_eps)
    ai = linear_input(a, f16_inputs)
    q = (ai @ layer["self_attn.q_proj"].T).reshape(t, h, hd)
    k = (ai @ layer["self_attn.k_proj"].T).reshape(t, hkv, hd)
    v = (ai @ layer["self_attn.v_proj"].T).reshape(t, hkv, hd)
    cos, sin = rope_cos_sin(config, np.arange(start_pos, start_pos + t))
    q, k = rope(q, cos, sin), rope(k, cos, sin)
    if f16_inputs:  # the f16 file's attention takes fp16 q and its cache holds fp16 k and v
        q, k, v = (linear_input(z, True) for z in (q, k, v))
    if cache is None:
        o = attention(q, k, v, q_offset=0)
    else:
        if cache.length != start_pos:
            raise ValueError(f"KV cache holds {cache.length} positions, block_forward got start_pos={start_pos}")
        o = attention(q, *cache.append(k, v), q_offset=start_pos)
    x = x + linear_input(o, f16_inputs) @ layer["self_attn.o_proj"].T
    m = rmsnorm(x, layer["post_attention_layernorm"], config.rms_norm_eps)
    if capture is not None:
        capture["attn_qkv"], capture["attn_output"], capture["ffn_gate_up"] = a, o, m
    return x + mlp(m, layer["mlp.gate_proj"], layer["mlp.up_proj"], layer["mlp.down_proj"], capture, f16_inputs)


class Perplexity(NamedTuple):
    ppl: float
    nll_sum: float
    count: int


class ReferenceModel:
    """The whole model in fp32 with a KV cache. `tensors` maps Hugging Face names to arrays (a
    Checkpoint's lazy mapping works: every tensor is read once, here). `f16_inputs`: every linear's input
    (the head's too) and q, k, v rounded to fp16, as an f16 .mq file defines its model (docs/numerics.md)."""

    def __init__(self, config: LlamaConfig, tensors: Mapping[str, np.ndarray], f16_inputs: bool = False) -> None:
        self.config, self.f16_inputs = config, f16_inputs
        self.embed = np.asarray(tensors["model.embed_tokens.weight"], dtype=np.float32)
        self.norm = np.asarray(tensors["model.norm.weight"], dtype=np.float32)
        self.lm_head = (self.embed if config.tie_word_embeddings
                        else np.asarray(tensors["lm_head.weight"], dtype=np.float32))
        self.layers = [layer_tensors(tensors, i) for i in range(config.num_hidden_layers)]
        self.reset()

    def reset(self) -> None:
        self.caches = [KVCache.empty(self.config) for _ in self.layers]

    @property
    def position(self) -> int:
        return self.caches[0].length

    def forward(self, tokens: Sequence[int] | np.ndarray, start_pos: int | None = None) -> np.ndarray:
        """Logits [T, V] float32 for `tokens` at positions start_pos.. (default: after the cached ones).
        A start_pos below the cached length rewinds the cache to it."""
        pos = self.position if start_pos is None else start_pos
        if pos > self.position:
            raise ValueError(f"start_pos={pos} is past the {self.position} cached positions")
        for c in self.caches:
            c.length = pos
        ids = np.asarray(tokens, dtype=np.int64)
        if ids.ndim != 1 or ids.size == 0 or ids.min() < 0 or ids.max() >= self.config.vocab_size:
            raise ValueError(f"tokens must be a non-empty 1-D sequence of ids in [0, {self.config.vocab_size})")
        x = self.embed[ids]
        for layer, cache in zip(self.layers, self.caches):
            x = block_forward(x, layer, self.config, pos, cache, f16_inputs=self.f16_inputs)
        return linear_input(rmsnorm(x, self.norm, self.config.rms_norm_eps), self.f16_inputs) @ self.lm_head.T

    def greedy(self, prompt_ids: Sequence[int], n: int) -> list[int]:
        """The n tokens argmax decoding appends to the prompt (fresh context)."""
        self.reset()
        out: list[int] = []
        logits = self.forward(prompt_ids)[-1]
        for _ in range(n):
            out.append(int(np.argmax(logits)))
            if len(out) < n:
                logits = self.forward([out[-1]])[-1]
        return out

    def perplexity(self, ids: Sequence[int], window: int) -> Perplexity:
        """Non-overlapping windows of `window` tokens, each a fresh context; tokens 1..W-1 of each window
        are predicted. A trailing remainder shorter than a window is dropped."""
        ids = np.asarray(ids, dtype=np.int64)
        n_windows = len(ids) // window
        if window < 2 or n_windows == 0:
            raise ValueError(f"perplexity needs window >= 2 and at least one window; got window={window}, "
                             f"{len(ids)} tokens")
        nll, count = 0.0, 0
        for w in range(n_windows):
            chunk = ids[w * window:(w + 1) * window]
            self.reset()
            logits = self.forward(chunk)[:-1]
            shifted = logits - logits.max(axis=-1, keepdims=True)
            # -log_softmax[target] = log Σ exp(shifted) - shifted[target], the sum in float64
            log_z = np.log(np.exp(shifted).sum(axis=-1, dtype=np.float64))
            target = shifted[np.arange(window - 1), chunk[1:]]
            nll += float(np.sum(log_z - target))
            count += window - 1
        return Perplexity(float(np.exp(nll / count)), nll, count)


def reference_from_mq(path: str | Path) -> ReferenceModel:
    """A ReferenceModel on the weights of an f16 .mq file, fused rows split back into q/k/v and gate/up,
    with the file's fp16 linear inputs, so the engine and the reference can be compared on identical weights."""
    mq = read_mq(path)
    c = mq.config
    if c is None or mq.quant is None:
        raise ValueError(f"{path}: a tokenizer-only .mq file has no model to run")
    other = {p: s for p, s in mq.quant.get("linears", {}).items() if s != "f16"}
    if other:
        raise ValueError(f"{path}: reference_from_mq reads f16 linears only; found {other}")

    def f32(name: str) -> np.ndarray:
        return mq.tensor(name).astype(np.float32)

    tensors = {"model.embed_tokens.weight": f32("token_embd.weight"),
               "model.norm.weight": f32("output_norm.weight")}
    if not c.tie_word_embeddings:
        tensors["lm_head.weight"] = f32("output.weight")
    nq, nkv = c.num_attention_heads * c.head_dim, c.num_key_value_heads * c.head_dim
    for i in range(c.num_hidden_layers):
        p, b = f"model.layers.{i}.", f"blk.{i}."
        q, k, v = np.split(f32(b + "attn_qkv.weight"), [nq, nq + nkv])
        gate, up = np.split(f32(b + "ffn_gate_up.weight"), [c.intermediate_size])
        tensors |= {p + "input_layernorm.weight": f32(b + "attn_norm.weight"),
                    p + "self_attn.q_proj.weight": q, p + "self_attn.k_proj.weight": k,
                    p + "self_attn.v_proj.weight": v, p + "self_attn.o_proj.weight": f32(b + "attn_output.weight"),
                    p + "post_attention_layernorm.weight": f32(b + "ffn_norm.weight"),
                    p + "mlp.gate_proj.weight": gate, p + "mlp.up_proj.weight": up,
                    p + "mlp.down_proj.weight": f32(b + "ffn_down.weight")}
    return ReferenceModel(c, tensors, f16_inputs=True)
