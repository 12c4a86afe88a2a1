"""The model configuration stored in a .mq file (docs/format.md, `config`), read from a Hugging Face
config.json or from GGUF metadata. Only what the engine executes is accepted: a Llama block with
SwiGLU, RMSNorm, grouped-query attention, full-width rotate_half RoPE (optionally llama3-scaled)."""
from __future__ import annotations

import json
from dataclasses import asdict, dataclass, fields
from typing import Any


class UnsupportedModelError(ValueError):
    """The checkpoint describes a model the engine cannot execute."""


@dataclass
class LlamaConfig:
    architecture: str
    vocab_size: int
    hidden_size: int
    intermediate_size: int
    num_hidden_layers: int
    num_attention_heads: int
    num_key_value_heads: int
    head_dim: int
    max_position_embeddings: int
    rms_norm_eps: float
    rope_theta: float
    rope_scaling: dict[str, Any] | None
    tie_word_embeddings: bool

    def __post_init__(self) -> None:
        if self.architecture != "llama":
            raise UnsupportedModelError(f"config architecture {self.architecture!r}: expected 'llama'")
        if self.num_attention_heads % self.num_key_value_heads:
            raise UnsupportedModelError(
                f"num_attention_heads={self.num_attention_heads} is not a multiple of "
                f"num_key_value_heads={self.num_key_value_heads}")
        if self.head_dim % 2:
            raise UnsupportedModelError(f"head_dim={self.head_dim}: RoPE needs an even head_dim")

    def to_json(self) -> str:
        return json.dumps(asdict(self))

    @classmethod
    def from_json(cls, text: str) -> LlamaConfig:
        data = json.loads(text)
        names = {f.name for f in fields(cls)}
        missing = names - data.keys()
        if missing:
            raise ValueError(f"config JSON lacks {sorted(missing)}")
        return cls(**{k: data[k] for k in names})

    @classmethod
    def from_hf(cls, cfg: dict[str, Any]) -> LlamaConfig:
        archs = cfg.get("architectures") or [cfg.get("model_type", "?")]
        arch = archs[0]
        if arch not in ("LlamaForCausalLM", "MistralForCausalLM"):
            raise UnsupportedModelError(
                f"architecture {arch!r}: expected LlamaForCausalLM or MistralForCausalLM")
        max_pos = int(cfg.get("max_position_embeddings", 2048))
        window = cfg.get("sliding_window")
        if arch == "MistralForCausalLM" and window is not None and window < max_pos:
            # Sliding-window attention changes the mask; the engine only does full causal attention.
            raise UnsupportedModelError(
                f"MistralForCausalLM with sliding_window={window} < max_position_embeddings={max_pos}")
        for flag in ("attention_bias", "mlp_bias"):
            if cfg.get(flag):
                raise UnsupportedModelError(f"{arch} with {flag}=true: the engine has no linear biases")
        act = cfg.get("hidden_act", "silu")
        if act != "silu":
            raise UnsupportedModelError(f"{arch} with hidden_act={act!r}: expected 'silu'")
        heads = int(cfg["num_attention_heads"])
        hidden = int(cfg["hidden_size"])
        return cls(
            architecture="llama",
            vocab_size=int(cfg["vocab_size"]),
            hidden_size=hidden,
            intermediate_size=int(cfg["intermediate_size"]),
            num_hidden_layers=int(cfg["num_hidden_layers"]),
            num_attention_heads=heads,
            num_key_value_heads=int(cfg.get("num_key_value_heads") or heads),
            head_dim=int(cfg.get("head_dim") or hidden // heads),
            max_position_embeddings=max_pos,
            rms_norm_eps=float(cfg.get("rms_norm_eps", 1e-6)),
            rope_theta=float(cfg.get("rope_theta", 10000.0)),
            rope_scaling=normalize_rope_scaling(cfg.get("rope_scaling")),
            # transformers' LlamaConfig defaults to untied embeddings.
            tie_word_embeddings=bool(cfg.get("tie_word_embeddings", False)),
        )

    @classmethod
    def from_gguf(cls, reader: Any) -> LlamaConfig:
        """`reader` is a gguf.GGUFReader. Tied embeddings = no `output.weight` tensor."""
        def get(key: str, default: Any = None) -> Any:
            field = reader.fields.get(key)
            return default if field is None else field.contents()

        arch = get("general.architecture")
        if arch != "llama":
            raise UnsupportedModelError(f"GGUF architecture {arch!r}: expected 'llama'")
        scaling = get("llama.rope.scaling.type")
        if scaling not in (None, "none"):
            raise UnsupportedModelError(f"GGUF rope scaling type {scaling!r}: only unscaled RoPE is read "
                                        "from GGUF (convert llama3-scaled models from the HF checkpoint)")
        names = {t.name: t for t in reader.tensors}
        if "rope_freqs.weight" in names:
            # llama.cpp stores llama3 scaling only as per-frequency factors, without its parameters.
            raise UnsupportedModelError("GGUF tensor 'rope_freqs.weight' (llama3 rope scaling): "
                                        "convert this model from the HF checkpoint instead")
        if "token_embd.weight" not in names:
            raise UnsupportedModelError("GGUF has no 'token_embd.weight' tensor")
        hidden = int(get("llama.embedding_length"))
        heads = int(get("llama.attention.head_count"))
        head_dim = int(get("llama.attention.key_length", hidden // heads))
        rope_dims = int(get("llama.rope.dimension_count", head_dim))
        if rope_dims != head_dim:
            raise UnsupportedModelError(f"GGUF llama.rope.dimension_count={rope_dims}: partial RoPE "
                                        f"(head_dim {head_dim}) is not supported")
        return cls(
            architecture="llama",
            vocab_size=int(names["token_embd.weight"].shape[1]),  # GGUF shapes are [K, N]
            hidden_size=hidden,
            intermediate_size=int(get("llama.feed_forward_length")),
            num_hidden_layers=int(get("llama.block_count")),
            num_attention_heads=heads,
            num_key_value_heads=int(get("llama.attention.head_count_kv", heads)),
            head_dim=head_dim,
            max_position_embeddings=int(get("llama.context_length", 2048)),
            # GGUF stores eps as float32: round back to the decimal the HF config had (9.9999997e-06 → 1e-05).
            rms_norm_eps=float(f"{float(get('llama.attention.layer_norm_rms_epsilon', 1e-5)):.6g}"),
            rope_theta=float(get("llama.rope.freq_base", 10000.0)),
            rope_scaling=None,
            tie_word_embeddings="output.weight" not in names,
        )


def normalize_rope_scaling(scaling: dict[str, Any] | None) -> dict[str, Any] | None:
    """None (or type 'default') → None; llama3 → the canonical dict of docs/format.md; else refuse."""
    if scaling is None:
        return None
    kind = scaling.get("rope_type", scaling.get("type"))
    if kind == "default":
        return None
    if kind != "llama3":
        raise UnsupportedModelError(f"rope_scaling type {kind!r}: only null or 'llama3' is supported")
    return {
        "rope_type": "llama3",
        "factor": float(scaling["factor"]),
        "low_freq_factor": float(scaling["low_freq_factor"]),
        "high_freq_factor": float(scaling["high_freq_factor"]),
        "original_max_position_embeddings": int(scaling["original_max_position_embeddings"]),
    }
