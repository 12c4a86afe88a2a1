"""The random-weight Llama models of the benchmarks, drawn the same way for every engine's file: each
tensor (named in the Hugging Face layout: q, k, v, o, gate, up, down per block, plus the embedding and the
output matrix) is uniform on [-a, a] with a = 0.02·√3 (standard deviation 0.02), drawn in blocks of rows
from numpy's PCG64 seeded by (crc32 of the tensor's name, block index). So the values do not depend on
the number of threads that draw them, and the GGUF file of llama.cpp (bench/peer/write_gguf.py) and the
.mq files of this engine (bench/bench_gpu.py) hold the same model.

Norm weights are ones. The q/k rows here are in the Hugging Face order (rotary pairs (i, i + hd/2));
the GGUF writer permutes them to llama.cpp's interleaved pairs, as llama.cpp's own converter does.
"""
from __future__ import annotations

import os
import zlib
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass

import numpy as np


@dataclass(frozen=True)
class Shape:
    """A Llama's hyperparameters, named as mergequant.convert.config.LlamaConfig names them (this module
    does not import mergequant, whose package needs the built engine: the GGUF writer runs before it is)."""
    vocab_size: int
    hidden_size: int
    intermediate_size: int
    num_hidden_layers: int
    num_attention_heads: int
    num_key_value_heads: int
    head_dim: int
    max_position_embeddings: int = 4096
    rms_norm_eps: float = 1e-5
    rope_theta: float = 10000.0


LLAMA2_7B = Shape(vocab_size=32000, hidden_size=4096, intermediate_size=11008, num_hidden_layers=32,
                  num_attention_heads=32, num_key_value_heads=32, head_dim=128)
# the same structure at a size that the tests and this 2-core machine handle in seconds
TINY = Shape(vocab_size=32000, hidden_size=256, intermediate_size=704, num_hidden_layers=2,
             num_attention_heads=4, num_key_value_heads=4, head_dim=64)
SHAPES = {"7b": LLAMA2_7B, "tiny": TINY}

SD = 0.02
ROWS_PER_BLOCK = 256


def block_tensors(c: Shape) -> dict[str, tuple[int, int]]:
    """(N, K) of each linear of a block, by its short name (HF order of rows)."""
    q, kv = c.num_attention_heads * c.head_dim, c.num_key_value_heads * c.head_dim
    d, f = c.hidden_size, c.intermediate_size
    return {"q": (q, d), "k": (kv, d), "v": (kv, d), "o": (d, q), "gate": (f, d), "up": (f, d), "down": (d, f)}


def _draw(name: str, block: int, rows: int, cols: int) -> np.ndarray:
    rng = np.random.Generator(np.random.PCG64([zlib.crc32(name.encode()), block]))
    a = np.float32(SD * np.sqrt(3.0))
    x = rng.random((rows, cols), dtype=np.float32)
    x *= 2 * a
    x -= a
    return x.astype(np.float16)


_POOL: ThreadPoolExecutor | None = None


def weight(name: str, n: int, k: int) -> np.ndarray:
    """fp16 [n, k]: the tensor `name` (e.g. "blk.3.q", "token_embd", "output"), drawn in parallel blocks."""
    global _POOL
    if _POOL is None:
        _POOL = ThreadPoolExecutor(max(1, min(16, os.cpu_count() or 1)))
    out = np.empty((n, k), np.float16)

    def fill(b: int) -> None:
        r0 = b * ROWS_PER_BLOCK
        r1 = min(n, r0 + ROWS_PER_BLOCK)
        out[r0:r1] = _draw(name, b, r1 - r0, k)

    list(_POOL.map(fill, range((n + ROWS_PER_BLOCK - 1) // ROWS_PER_BLOCK)))
    return out


def embedding(c: Shape) -> np.ndarray:
    return weight("token_embd", c.vocab_size, c.hidden_size)


def output(c: Shape) -> np.ndarray:
    return weight("output", c.vocab_size, c.hidden_size)


def linear(c: Shape, layer: int, short: str) -> np.ndarray:
    n, k = block_tensors(c)[short]
    return weight(f"blk.{layer}.{short}", n, k)


def rope_rows_to_interleaved(w: np.ndarray, n_head: int) -> np.ndarray:
    """q/k rows from the half-split rotary order (pair (i, i + hd/2)) to the interleaved one (pair (2i, 2i+1))
    that llama.cpp's "llama" architecture rotates: interleaved row 2i + j of a head = half-split row j·hd/2 + i."""
    n, k = w.shape
    hd = n // n_head
    return w.reshape(n_head, 2, hd // 2, k).swapaxes(1, 2).reshape(n, k)
