"""Write and read the .mq model file (docs/format.md): a safetensors container whose metadata holds the
format tag, its version, and the config / quant recipe / tokenizer settings as JSON strings."""
from __future__ import annotations

import json
import os
import struct
from pathlib import Path
from types import TracebackType
from typing import Any

import numpy as np

from .config import LlamaConfig
from .loaders import SafetensorsFile

FORMAT = "mergequant"
FORMAT_VERSION = 1

# numpy dtype → safetensors dtype name, and the order safetensors writes tensors in (its Dtype enum, largest
# first, then by name): kept so the files this writer makes lay out like `safetensors.numpy.save_file`'s, every
# tensor aligned to its element size (tests/test_mqfile.py compares the two byte for byte)
_ST_NAMES = {np.dtype(np.bool_): "BOOL", np.dtype(np.uint8): "U8", np.dtype(np.int8): "I8",
             np.dtype(np.int16): "I16", np.dtype(np.uint16): "U16", np.dtype(np.float16): "F16",
             np.dtype(np.int32): "I32", np.dtype(np.uint32): "U32", np.dtype(np.float32): "F32",
             np.dtype(np.float64): "F64", np.dtype(np.int64): "I64", np.dtype(np.uint64): "U64"}
_ST_RANK = {"BOOL": 0, "U8": 1, "I8": 2, "I16": 3, "U16": 4, "F16": 5, "BF16": 6, "I32": 7, "U32": 8, "F32": 9,
            "F64": 10, "I64": 11, "U64": 12}
_COPY_CHUNK = 1 << 26


def mq_metadata(config: LlamaConfig | None, quant: dict[str, Any] | None,
                tokenizer_meta: dict[str, Any]) -> dict[str, str]:
    """The file's metadata (config/quant may be None for a tokenizer-only file: the keys are then absent)."""
    metadata = {"format": FORMAT, "format_version": str(FORMAT_VERSION), "tokenizer": json.dumps(tokenizer_meta)}
    if config is not None:
        metadata["config"] = config.to_json()
    if quant is not None:
        metadata["quant"] = json.dumps(quant)
    return metadata


class MqWriter:
    """Writes a .mq file (a safetensors container) one tensor at a time: `add` appends the tensor's bytes to a
    scratch file beside the output and keeps only its name, dtype and shape, so a conversion never holds the
    whole model; `finish(metadata)` writes the header (known only at the end: the quant recipe fills in as the
    layers are packed), copies the tensors from the scratch file in safetensors' order (in the kernel, with
    copy_file_range where there is one) and renames the file into place. The file is written under a temporary
    name in the same directory, so an interrupted or failed write never leaves a half file under the final name;
    the scratch file is removed either way. Adding a name again replaces the tensor (as a dict update would)."""

    def __init__(self, path: str | Path) -> None:
        self.path = Path(path)
        self._tmp = self.path.with_name(f".{self.path.name}.{os.getpid()}.tmp")
        self._scratch_path = self.path.with_name(f".{self.path.name}.{os.getpid()}.scratch")
        self._scratch = open(self._scratch_path, "w+b")
        self._entries: dict[str, tuple[str, tuple[int, ...], int, int]] = {}  # name → (dtype, shape, offset, bytes)
        self._size = 0

    def add(self, name: str, array: np.ndarray) -> None:
        a = np.ascontiguousarray(array)
        if a.dtype not in _ST_NAMES:
            raise TypeError(f"tensor {name!r}: dtype {a.dtype} has no safetensors name")
        flat = a.reshape(-1).view(np.uint8)
        self._scratch.write(memoryview(flat))
        self._entries[name] = (_ST_NAMES[a.dtype], tuple(int(d) for d in a.shape), self._size, flat.size)
        self._size += flat.size

    def add_all(self, tensors: dict[str, np.ndarray]) -> None:
        for name, array in tensors.items():
            self.add(name, array)

    def finish(self, metadata: dict[str, str]) -> Path:
        order = sorted(self._entries, key=lambda n: (-_ST_RANK[self._entries[n][0]], n))
        header: dict[str, Any] = {"__metadata__": dict(sorted(metadata.items()))}
        offset = 0
        for name in order:
            dtype, shape, _, nbytes = self._entries[name]
            header[name] = {"dtype": dtype, "shape": list(shape), "data_offsets": [offset, offset + nbytes]}
            offset += nbytes
        raw = json.dumps(header, separators=(",", ":"), ensure_ascii=False).encode("utf-8")
        raw += b" " * (-len(raw) % 8)
        self._scratch.flush()
        src = self._scratch.fileno()
        with open(self._tmp, "wb") as out:
            out.write(struct.pack("<Q", len(raw)) + raw)
            out.flush()
            dst = out.fileno()
            pos = out.tell()
            for name in order:
                _, _, start, nbytes = self._entries[name]
                _copy_range(src, start, dst, pos, nbytes)
                pos += nbytes
        os.replace(self._tmp, self.path)
        self.close()
        return self.path

    def close(self) -> None:
        """Removes the scratch file and any unfinished output (finish calls it; so does leaving a `with`)."""
        if not self._scratch.closed:
            self._scratch.close()
        self._scratch_path.unlink(missing_ok=True)
        self._tmp.unlink(missing_ok=True)

    def __enter__(self) -> "MqWriter":
        return self

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                 tb: TracebackType | None) -> None:
        self.close()


def _copy_range(src: int, src_off: int, dst: int, dst_off: int, count: int) -> None:
    """count bytes from src at src_off to dst at dst_off (file descriptors), through a bounded buffer at most."""
    while count > 0:
        n = 0
        if hasattr(os, "copy_file_range"):
            try:
                n = os.copy_file_range(src, dst, min(count, 1 << 30), src_off, dst_off)
            except OSError:
                n = 0
        if n <= 0:
            chunk = os.pread(src, min(count, _COPY_CHUNK), src_off)
            if not chunk:
                raise OSError("mq writer: the scratch file ended early")
            n = os.pwrite(dst, chunk, dst_off)
        src_off, dst_off, count = src_off + n, dst_off + n, count - n


def write_mq(path: str | Path, config: LlamaConfig | None, quant: dict[str, Any] | None,
             tokenizer_meta: dict[str, Any], tensors: dict[str, np.ndarray]) -> Path:
    """config/quant may be None for a tokenizer-only file (the keys are then absent)."""
    with MqWriter(path) as w:
        w.add_all(tensors)
        return w.finish(mq_metadata(config, quant, tokenizer_meta))


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
