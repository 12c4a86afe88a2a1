"""The converter's one seam to the compiled engine: a checkpoint's tokenizer as the engine runs it, for
calibration text.

Why the engine and not a Python tokenizer library: a checkpoint can be a GGUF file (the default model is
one), whose vocabulary is only `tokenizer.ggml.*` metadata, with no tokenizer.json or tokenizer.model for
`tokenizers` or `sentencepiece` to load; the engine's C++ tokenizer reads the vocabulary the converter
exports (tokenizer.py) for every checkpoint kind, and it is the tokenizer the converted model runs with, so
calibration sees exactly the ids the model will (tests/test_tokenizer.py checks it equals the reference
libraries). The extension is imported when called, so the rest of the converter works without it."""
from __future__ import annotations

import tempfile
from collections.abc import Callable
from pathlib import Path

from .loaders import Checkpoint
from .mqfile import write_mq
from .tokenizer import export_tokenizer


def checkpoint_tokenizer(ck: Checkpoint) -> Callable[[str], list[int]]:
    """text → ids (no special tokens added) with the checkpoint's own tokenizer: exported into a
    tokenizer-only model file and loaded through the extension."""
    from mergequant._engine import Tokenizer

    meta, tensors = export_tokenizer(ck)
    with tempfile.TemporaryDirectory() as d:
        path = Path(d) / "tokenizer.mq"
        write_mq(path, None, None, meta, tensors)
        tok = Tokenizer(str(path))
    return lambda text: tok.encode(text, add_special=False)
