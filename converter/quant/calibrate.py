"""Calibration: token windows from text that is never evaluation text, and the sequential driver that
quantizes a model layer by layer, feeding each layer the outputs of the already-quantized layers before
it (only one layer's activations are held)."""
from __future__ import annotations

import os
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from ..config import LlamaConfig
from ..convert import fused_layer
from ..loaders import Checkpoint
from ..reference import rope_cos_sin
from .simulate import SimBlock, block_forward

# name → files under shared/data/eval (the WikiText-2 validation split and the C4 sample, never test text)
BUILTIN_SETS = {"wikitext2": ("wikitext2_valid_tokens.txt",), "c4": ("c4_sample.txt",),
                "wikitext2+c4": ("wikitext2_valid_tokens.txt", "c4_sample.txt")}
DEFAULT_TOKENIZER = "tokenizers/smollm2/tokenizer.json"


def shared_data_dir() -> Path:
    """$MERGEQUANT_SHARED, else the checkout's sibling shared/data."""
    env = os.environ.get("MERGEQUANT_SHARED")
    return Path(env) if env else Path(__file__).resolve().parents[2] / ".." / "shared" / "data"


def load_tokenizer(path: str | Path | None = None):  # -> tokenizers.Tokenizer
    from tokenizers import Tokenizer

    path = Path(path) if path else shared_data_dir() / DEFAULT_TOKENIZER
    if not path.is_file():
        raise FileNotFoundError(f"tokenizer {path} not found (set MERGEQUANT_SHARED to the shared data dir)")
    return Tokenizer.from_file(str(path))


def tokenize_file(path: Path, tokenizer_path: str | Path | None = None) -> np.ndarray:
    """The whole text of a file as one token stream (no special tokens added)."""
    tok = load_tokenizer(tokenizer_path)
    return np.asarray(tok.encode(path.read_text(encoding="utf-8"), add_special_tokens=False).ids, np.int64)


@dataclass(frozen=True)
class CalibrationSpec:
    source: str = "wikitext2+c4"   # a BUILTIN_SETS name or a text file
    n: int = 32                    # sequences
    length: int = 512              # tokens per sequence
    seed: int = 0
    tokenizer: str | None = None   # tokenizer.json; default: the shared smollm2 one


def calibration_tokens(spec: CalibrationSpec) -> np.ndarray:
    """[n, length] token ids: windows at seeded random offsets, split evenly over the source files."""
    files = ([shared_data_dir() / "eval" / f for f in BUILTIN_SETS[spec.source]]
             if spec.source in BUILTIN_SETS else [Path(spec.source)])
    rng = np.random.default_rng(spec.seed)
    rows = []
    for i, path in enumerate(files):
        if not path.is_file():
            raise FileNotFoundError(f"calibration text {path} not found")
        stream = tokenize_file(path, spec.tokenizer)
        count = spec.n // len(files) + (i < spec.n % len(files))
        if len(stream) < spec.length + 1:
            raise ValueError(f"calibration text {path} has {len(stream)} tokens, fewer than length={spec.length}")
        for start in rng.integers(0, len(stream) - spec.length, size=count):
            rows.append(stream[start:start + spec.length])
    return np.stack(rows)


QuantizeLayer = Callable[[int, np.ndarray, dict[str, np.ndarray]], tuple[dict[str, np.ndarray], SimBlock]]


def run_sequential(ck: Checkpoint, ids: np.ndarray,
                   quantize_layer: QuantizeLayer) -> Iterator[dict[str, np.ndarray]]:
    """Yields each layer's file tensors. `quantize_layer(i, h, fused)` gets the residual stream h [B, T, D]
    entering layer i (computed through the already-quantized layers, with the engine's exact numerics) and
    the layer's fused float32 weights (convert.fused_layer); it returns the layer's tensors and the
    SimBlock that executes them, which then produces the stream for layer i + 1."""
    cfg: LlamaConfig = ck.config
    cos, sin = rope_cos_sin(cfg, np.arange(ids.shape[1]))
    h = ck.get("model.embed_tokens.weight").astype(np.float16)[ids].astype(np.float32)
    for i in range(cfg.num_hidden_layers):
        tensors, blk = quantize_layer(i, h, fused_layer(ck, i))
        h = block_forward(h, blk, cfg, cos, sin)
        yield tensors
