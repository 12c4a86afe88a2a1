"""Write and read the .mq model file (docs/format.md): a safetensors container whose metadata holds the
format tag, its version, and the config / quant recipe / tokenizer settings as JSON strings."""
from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

import numpy as np
from safetensors.numpy import save_file

from .config import LlamaConfig
from .loaders import SafetensorsFile

FORMAT = "mergequant"
FORMAT_VERSION = 1


def write_mq(path: str | Path, config: LlamaConfig | None, quant: dict[str, Any] | None,
             tokenizer_meta: dict[str, Any], tensors: dict[str, np.ndarray]) -> Path:
    """config/quant may be None for a tokenizer-only file (the keys are then absent)."""
    metadata = {"format": FORMAT, "format_version": str(FORMAT_VERSION),
                "tokenizer": json.dumps(tokenizer_meta)}
    if config is not None:
        metadata["config"] = config.to_json()
    if quant is not None:
        metadata["quant"] = json.dumps(quant)
    path = Path(path)
    # written under a temporary name in the same directory and renamed when complete, so an interrupted or
    # failed write never leaves a half file under the final name
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    try:
        save_file({k: np.ascontiguousarray(v) for k, v in tensors.items()}, str(tmp), metadata=metadata)
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    return path


class MqFile:
    """A validated .mq file; tensors are memory-mapped and read on access."""

    def __init__(self, path: str | Path) -> None:
        self.path = Path(path)
        self._st = SafetensorsFile(self.path)
        self.metadata: dict[str, str] = self._st.metadata
        fmt = self.metadata.get("format")
        if fmt != FORMAT:
            raise ValueError(f"{self.path}: metadata 'format' is {fmt!r}, expected {FORMAT!r}")
        version = self.metadata.get("format_version", "")
        if not version.isdigit():
            raise ValueError(f"{self.path}: metadata 'format_version' is {version!r}, expected an integer")
        if int(version) > FORMAT_VERSION:
            raise ValueError(f"{self.path}: format_version {version} is newer than this reader "
                             f"(knows up to {FORMAT_VERSION})")
        self.config: LlamaConfig | None = (LlamaConfig.from_json(self.metadata["config"])
                                          if "config" in self.metadata else None)
        self.quant: dict[str, Any] | None = self._json("quant")
        self.tokenizer: dict[str, Any] | None = self._json("tokenizer")

    def _json(self, key: str) -> Any:
        if key not in self.metadata:
            return None
        try:
            return json.loads(self.metadata[key])
        except json.JSONDecodeError as e:
            raise ValueError(f"{self.path}: metadata {key!r} is not valid JSON: {e}") from None

    def names(self) -> list[str]:
        return list(self._st.entries)

    def dtype(self, name: str) -> str:
        return self._st.dtype(name)

    def shape(self, name: str) -> tuple[int, ...]:
        return self._st.shape(name)

    def nbytes(self, name: str) -> int:
        start, end = self._st.entries[name]["data_offsets"]
        return end - start

    def tensor(self, name: str) -> np.ndarray:
        if name not in self._st.entries:
            raise KeyError(f"{self.path}: no tensor {name!r}")
        return np.array(self._st.raw(name))


def read_mq(path: str | Path) -> MqFile:
    return MqFile(path)
