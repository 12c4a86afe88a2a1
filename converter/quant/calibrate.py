"""Calibration: token windows from text that is never evaluation text, and the sequential driver that
quantizes a model layer by layer, feeding each layer the outputs of the already-quantized layers before
it (only one layer's activations are held)."""
from __future__ import annotations

import os
from collections.abc import Callable, Iterator, Mapping
from contextlib import contextmanager
from contextvars import ContextVar
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from ..config import LlamaConfig
from ..engine_tokenizer import checkpoint_tokenizer
from ..layers import fused_layer
from ..loaders import Checkpoint
from ..reference import rope_cos_sin
from .simulate import SimBlock, block_forward

# name → files under shared/data/eval (the WikiText-2 validation split and the C4 sample, never test text)
BUILTIN_SETS = {"wikitext2": ("wikitext2_valid_tokens.txt",), "c4": ("c4_sample.txt",),
                "wikitext2+c4": ("wikitext2_valid_tokens.txt", "c4_sample.txt")}


def shared_data_dir() -> Path:
    """The shared data folder holding eval/ (and tokenizers/): $MERGEQUANT_SHARED/data when set, else
    shared/data beside the working directory or beside the source checkout."""
    env = os.environ.get("MERGEQUANT_SHARED")
    if env:
        return Path(env) / "data"
    here = Path(__file__).resolve()
    for base in (Path.cwd(), Path.cwd().parent, here.parents[2].parent):
        if (base / "shared" / "data" / "eval").is_dir():
            return base / "shared" / "data"
    raise FileNotFoundError("calibration data (shared/data/eval) not found: pass a text file as the calibration "
                            "source (--calib FILE) or set MERGEQUANT_SHARED to the shared folder")


# the built-in sets' files in the installed package (copied from shared/data/eval at build time: CMakeLists.txt)
PACKAGED_DATA = Path(__file__).resolve().parents[1] / "data"


def builtin_set_files(name: str) -> list[Path]:
    """The files of the built-in calibration set `name`: in the shared data folder (shared_data_dir) when there is
    one, else the copies the build put into the installed package (PACKAGED_DATA)."""
    try:
        base = shared_data_dir() / "eval"
    except FileNotFoundError:
        base = PACKAGED_DATA
    files = [base / f for f in BUILTIN_SETS[name]]
    if not all(f.is_file() for f in files) and all((PACKAGED_DATA / f).is_file() for f in BUILTIN_SETS[name]):
        files = [PACKAGED_DATA / f for f in BUILTIN_SETS[name]]
    return files


def load_tokenizer(path: str | Path):  # -> tokenizers.Tokenizer
    from tokenizers import Tokenizer

    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"tokenizer {path} not found")
    return Tokenizer.from_file(str(path))


def tokenize_file(path: Path, tokenize: Callable[[str], list[int]]) -> np.ndarray:
    """The whole text of a file as one token stream (no special tokens added)."""
    return np.asarray(tokenize(path.read_text(encoding="utf-8")), np.int64)


@dataclass(frozen=True)
class CalibrationSpec:
    source: str = "wikitext2+c4"   # a BUILTIN_SETS name or a text file
    n: int = 32                    # sequences
    length: int = 512              # tokens per sequence
    seed: int = 0
    tokenizer: str | None = None   # a tokenizer.json to use instead of the checkpoint's own tokenizer


# a method's keyword arguments that set its calibration → the CalibrationSpec field each one sets
CALIBRATION_ARGS = {"calib": "source", "calib_n": "n", "calib_len": "length", "seed": "seed",
                    "tokenizer": "tokenizer"}


def calibration_spec(args: Mapping[str, Any], **defaults: Any) -> CalibrationSpec:
    """The spec of calibration keyword arguments (CALIBRATION_ARGS); `defaults` (spec field names) fill in
    what is not given, then CalibrationSpec's own defaults."""
    unknown = sorted(set(args) - set(CALIBRATION_ARGS))
    if unknown:
        raise TypeError(f"unknown calibration arguments {unknown}; known: {', '.join(CALIBRATION_ARGS)}")
    fields = dict(defaults) | {CALIBRATION_ARGS[k]: v for k, v in args.items() if v is not None}
    spec = CalibrationSpec(**fields)
    if spec.n < 1 or spec.length < 2:
        raise ValueError(f"calibration needs n >= 1 sequences of length >= 2 tokens, got n={spec.n}, "
                         f"length={spec.length}")
    return spec


def calibration_tokens(spec: CalibrationSpec, ck: Checkpoint) -> np.ndarray:
    """[n, length] token ids: windows at seeded random offsets, split evenly over the source files,
    tokenized with the checkpoint's own tokenizer (or spec.tokenizer)."""
    if spec.tokenizer:
        hf = load_tokenizer(spec.tokenizer)
        tokenize = lambda text: hf.encode(text, add_special_tokens=False).ids  # noqa: E731
    else:
        tokenize = checkpoint_tokenizer(ck)
    files = builtin_set_files(spec.source) if spec.source in BUILTIN_SETS else [Path(spec.source)]
    rng = np.random.default_rng(spec.seed)
    rows = []
    for i, path in enumerate(files):
        if not path.is_file():
            raise FileNotFoundError(f"calibration text {path} not found")
        stream = tokenize_file(path, tokenize)
        count = spec.n // len(files) + (i < spec.n % len(files))
        if len(stream) < spec.length + 1:
            raise ValueError(f"calibration text {path} has {len(stream)} tokens, fewer than length={spec.length}")
        for start in rng.integers(0, len(stream) - spec.length, size=count):
            rows.append(stream[start:start + spec.length])
    return np.stack(rows)


QuantizeLayer = Callable[[int, np.ndarray, dict[str, np.ndarray]],
                         "tuple[dict[str, np.ndarray], SimBlock] | tuple[dict[str, np.ndarray], SimBlock, np.ndarray | None]"]

# where a running conversion reports its stage ("layer 3: ffn_down"): convert() points it at its progress bar
_stage_sink: ContextVar[Callable[[str], None] | None] = ContextVar("stage_sink", default=None)


def stage(name: str) -> None:
    """Report the stage a conversion is in (shown beside the progress bar; nothing when none listens)."""
    sink = _stage_sink.get()
    if sink is not None:
        sink(name)


@contextmanager
def stage_sink(sink: Callable[[str], None] | None) -> Iterator[None]:
    """Send the stages reported inside the block to `sink`."""
    token = _stage_sink.set(sink)
    try:
        yield
    finally:
        _stage_sink.reset(token)


def run_sequential(ck: Checkpoint, ids: np.ndarray,
                   quantize_layer: QuantizeLayer) -> Iterator[dict[str, np.ndarray]]:
    """Yields each layer's file tensors. `quantize_layer(i, h, fused)` gets the residual stream h [B, T, D]
    entering layer i (computed through the already-quantized layers, with the engine's exact numerics) and
    the layer's fused float32 weights (layers.fused_layer); it returns the layer's tensors and the
    SimBlock that executes them, which then produces the stream for layer i + 1, or a third item: that stream,
    computed by the method itself with the engine's numerics (no second pass through the block)."""
    cfg: LlamaConfig = ck.config
    cos, sin = rope_cos_sin(cfg, np.arange(ids.shape[1]))
    h = ck.get("model.embed_tokens.weight")[ids].astype(np.float16).astype(np.float32)  # the rows, not an fp16 table
    for i in range(cfg.num_hidden_layers):
        stage(f"layer {i}: weights")
        fused = fused_layer(ck, i)
        tensors, blk, *out = quantize_layer(i, h, fused)
        if out and out[0] is not None:
            h = out[0]  # the method computed the block's output with the engine's numerics itself
        elif i + 1 < cfg.num_hidden_layers:  # the last layer's output feeds nothing
            stage(f"layer {i}: forward")
            h = block_forward(h, blk, cfg, cos, sin)
        del blk, fused, out
        yield tensors
        del tensors  # nothing of layer i is held while layer i + 1 is quantized
