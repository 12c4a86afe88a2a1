"""Checkpoint loading: a Hugging Face directory (config.json + safetensors, possibly sharded) or a GGUF
file, presented the same way: a LlamaConfig and a lazy mapping from Hugging Face tensor names to float32
arrays. Tensors are read (and dequantized) only when asked for, so a converter working layer by layer
holds one layer in memory. GGUF q/k rows are returned in the Hugging Face rotate_half layout."""
from __future__ import annotations

import json
import struct
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from .config import LlamaConfig, UnsupportedModelError

# safetensors dtype → numpy dtype of the stored bytes (BF16 is read as raw 16-bit words).
_ST_DTYPES = {"F32": np.float32, "F16": np.float16, "BF16": np.uint16, "F64": np.float64,
              "I64": np.int64, "I32": np.int32, "I16": np.int16, "I8": np.int8,
              "U64": np.uint64, "U32": np.uint32, "U16": np.uint16, "U8": np.uint8, "BOOL": np.bool_}
_FLOAT_DTYPES = ("F32", "F16", "BF16")
_MAX_HEADER_BYTES = 100_000_000  # safetensors' own limit


def expected_shapes(config: LlamaConfig) -> dict[str, tuple[int, ...]]:
    """Every tensor a checkpoint of this config must provide, by Hugging Face name."""
    d, f, hd = config.hidden_size, config.intermediate_size, config.head_dim
    shapes = {"model.embed_tokens.weight": (config.vocab_size, d), "model.norm.weight": (d,)}
    if not config.tie_word_embeddings:
        shapes["lm_head.weight"] = (config.vocab_size, d)
    for i in range(config.num_hidden_layers):
        p = f"model.layers.{i}."
        shapes |= {
            p + "input_layernorm.weight": (d,),
            p + "self_attn.q_proj.weight": (config.num_attention_heads * hd, d),
            p + "self_attn.k_proj.weight": (config.num_key_value_heads * hd, d),
            p + "self_attn.v_proj.weight": (config.num_key_value_heads * hd, d),
            p + "self_attn.o_proj.weight": (d, config.num_attention_heads * hd),
            p + "post_attention_layernorm.weight": (d,),
            p + "mlp.gate_proj.weight": (f, d),
            p + "mlp.up_proj.weight": (f, d),
            p + "mlp.down_proj.weight": (d, f),
        }
    return shapes


class SafetensorsFile:
    """A memory-mapped safetensors file: header parsed eagerly, tensor bytes read on access."""

    def __init__(self, path: str | Path) -> None:
        self.path = Path(path)
        with open(self.path, "rb") as fh:
            head = fh.read(8)
            if len(head) < 8:
                raise ValueError(f"{self.path}: shorter than the 8-byte safetensors header length")
            (n,) = struct.unpack("<Q", head)
            size = self.path.stat().st_size
            if n > _MAX_HEADER_BYTES:
                raise ValueError(f"{self.path}: header length {n} exceeds the safetensors limit of {_MAX_HEADER_BYTES} "
                                 "bytes (corrupt, or not a safetensors file)")
            if 8 + n > size:
                raise ValueError(f"{self.path}: header length {n} runs past the end of the file ({size} bytes): "
                                 "truncated?")
            try:
                header = json.loads(fh.read(n))
            except (UnicodeDecodeError, json.JSONDecodeError) as e:
                raise ValueError(f"{self.path}: safetensors header is not valid JSON ({e})") from None
        if not isinstance(header, dict):
            raise ValueError(f"{self.path}: safetensors header is not a JSON object")
        self.metadata: dict[str, str] = header.pop("__metadata__", None) or {}
        self.entries: dict[str, dict[str, Any]] = header
        self._data_start = 8 + n
        self._map: np.memmap | None = None
        data_size = size - self._data_start
        for name, entry in header.items():
            self._check_entry(name, entry, data_size)

    def _check_entry(self, name: str, entry: Any, data_size: int) -> None:
        """Every entry described exactly and inside the file, so a truncated shard fails here, before any
        conversion work or output file, instead of as a short read later."""
        where = f"{self.path}: tensor {name!r}"
        if not isinstance(entry, dict) or not {"dtype", "shape", "data_offsets"} <= entry.keys():
            raise ValueError(f"{where}: header entry must have dtype, shape and data_offsets")
        if entry["dtype"] not in _ST_DTYPES:
            raise ValueError(f"{where} has unknown dtype {entry['dtype']!r}")
        shape, offs = entry["shape"], entry["data_offsets"]
        if not isinstance(shape, list) or not all(isinstance(d, int) and d >= 0 for d in shape):
            raise ValueError(f"{where}: shape {shape!r} is not a list of non-negative integers")
        if (not isinstance(offs, list) or len(offs) != 2 or not all(isinstance(o, int) for o in offs)
                or not 0 <= offs[0] <= offs[1]):
            raise ValueError(f"{where}: data_offsets {offs!r} are not [begin, end] with 0 <= begin <= end")
        if offs[1] > data_size:
            raise ValueError(f"{where}: data_offsets {offs} run past the end of the data ({data_size} bytes): "
                             "the file is truncated")
        want = int(np.prod(shape, dtype=object)) * np.dtype(_ST_DTYPES[entry["dtype"]]).itemsize
        if offs[1] - offs[0] != want:
            raise ValueError(f"{where}: {offs[1] - offs[0]} bytes of data for shape {shape} of {entry['dtype']} "
                             f"(expected {want})")

    def dtype(self, name: str) -> str:
        return self.entries[name]["dtype"]

    def shape(self, name: str) -> tuple[int, ...]:
        return tuple(self.entries[name]["shape"])

    def raw(self, name: str) -> np.ndarray:
        """The stored array (a read-only view into the mapping); BF16 comes back as uint16 words."""
        entry = self.entries[name]
        if self._map is None:
            self._map = np.memmap(self.path, dtype=np.uint8, mode="r", offset=self._data_start)
        start, end = entry["data_offsets"]
        return self._map[start:end].view(_ST_DTYPES[entry["dtype"]]).reshape(entry["shape"])

    def check_float(self, name: str) -> None:
        if self.dtype(name) not in _FLOAT_DTYPES:
            raise UnsupportedModelError(f"{self.path}: tensor {name!r} has dtype {self.dtype(name)}; "
                                        f"expected one of {', '.join(_FLOAT_DTYPES)}")

    def _window(self, name: str) -> np.ndarray:
        """The stored array through a mapping of its own bytes only, unmapped when the array is released: the
        pages a conversion reads leave this process's resident set with the tensor (a mapping of the whole file
        kept open would keep every page read so far resident)."""
        entry = self.entries[name]
        start, end = entry["data_offsets"]
        dtype = _ST_DTYPES[entry["dtype"]]
        if end == start or not entry["shape"]:
            return np.array(self.raw(name))
        return np.memmap(self.path, dtype=dtype, mode="r", offset=self._data_start + start, shape=tuple(entry["shape"]))

    def float32(self, name: str) -> np.ndarray:
        self.check_float(name)
        raw = self._window(name)
        if self.dtype(name) == "BF16":
            # bfloat16 is the top half of a float32 (shifted in place: one array of the float32's size)
            bits = raw.astype(np.uint32)
            bits <<= 16
            return bits.view(np.float32)
        return raw.astype(np.float32)

    def read_into(self, name: str, out: np.ndarray) -> None:
        """float32(name) written into `out` (a C-contiguous float32 array of the tensor's shape, e.g. rows of a
        larger matrix), without a float32 temporary."""
        self.check_float(name)
        if out.shape != self.shape(name) or out.dtype != np.float32 or not out.flags.c_contiguous:
            raise ValueError(f"{self.path}: read_into {name!r} needs a C-contiguous float32 array of shape "
                             f"{self.shape(name)}, got {out.dtype} {out.shape}")
        raw = self._window(name)
        if self.dtype(name) == "BF16":
            bits = out.view(np.uint32)
            bits[...] = raw
            bits <<= 16
        else:
            out[...] = raw


class LazyTensors(Mapping[str, np.ndarray]):
    """Hugging Face name → float32 array, produced by a loader function on each access (not cached)."""

    def __init__(self, loaders: dict[str, Callable[[], np.ndarray]]) -> None:
        self._loaders = loaders

    def __getitem__(self, name: str) -> np.ndarray:
        return self._loaders[name]()

    def __iter__(self) -> Iterator[str]:
        return iter(self._loaders)

    def __len__(self) -> int:
        return len(self._loaders)

    def names(self) -> list[str]:
        return list(self._loaders)


@dataclass
class Checkpoint:
    config: LlamaConfig
    tensors: LazyTensors
    source: Path
    hf_dir: Path | None = None
    gguf_reader: Any = None  # gguf.GGUFReader for GGUF sources
    shapes: dict[str, tuple[int, ...]] = field(default_factory=dict)  # HF name → shape, known without loading

    readers: dict[str, Callable[[np.ndarray], None]] = field(default_factory=dict)  # HF name → fill a float32 array

    def get(self, name: str) -> np.ndarray:
        return self.tensors[name]

    def get_into(self, name: str, out: np.ndarray) -> None:
        """get(name) written into `out` (its shape, float32, C-contiguous): straight from the file where the
        loader can (Hugging Face safetensors), else through get()."""
        if name in self.readers:
            self.readers[name](out)
        else:
            out[...] = self.get(name)

    def names(self) -> list[str]:
        return self.tensors.names()


def load_checkpoint(src: str | Path) -> Checkpoint:
    """A HF directory (config.json + *.safetensors) or a .gguf file."""
    src = Path(src)
    if src.is_dir():
        return _load_hf(src)
    if src.suffix == ".gguf" and src.is_file():
        return _load_gguf(src)
    raise FileNotFoundError(f"{src}: expected a Hugging Face checkpoint directory or a .gguf file")


def _check_shapes(src: Path, config: LlamaConfig, shapes: Mapping[str, tuple[int, ...]]) -> None:
    for name, want in expected_shapes(config).items():
        if name not in shapes:
            raise ValueError(f"{src}: tensor {name!r} is missing")
        if tuple(shapes[name]) != want:
            raise ValueError(f"{src}: tensor {name!r} has shape {tuple(shapes[name])}, expected {want}")


def _load_hf(src: Path) -> Checkpoint:
    cfg_path = src / "config.json"
    if not cfg_path.is_file():
        raise FileNotFoundError(f"{src}: no config.json")
    config = LlamaConfig.from_hf(json.loads(cfg_path.read_text()))
    index = src / "model.safetensors.index.json"
    if index.is_file():
        weight_map: dict[str, str] = json.loads(index.read_text())["weight_map"]
        files = {f: SafetensorsFile(src / f) for f in sorted(set(weight_map.values()))}
        owner = {name: files[f] for name, f in weight_map.items()}
    elif (src / "model.safetensors").is_file():
        single = SafetensorsFile(src / "model.safetensors")
        owner = {name: single for name in single.entries}
    else:
        raise FileNotFoundError(f"{src}: neither model.safetensors nor model.safetensors.index.json")
    expected = expected_shapes(config)
    shapes = {name: f.shape(name) for name, f in owner.items() if name in expected}
    _check_shapes(src, config, shapes)
    # Only the tensors the model uses are exposed (this drops e.g. a redundant lm_head of a tied model).
    loaders = {name: (lambda n=name: owner[n].float32(n)) for name in expected}
    for name in expected:  # refuse an unusable dtype now rather than halfway through a conversion
        owner[name].check_float(name)
    readers = {name: (lambda out, n=name: owner[n].read_into(n, out)) for name in expected}
    return Checkpoint(config, LazyTensors(loaders), src, hf_dir=src, shapes=shapes, readers=readers)


_GGUF_TYPES = ("F32", "F16", "BF16", "Q8_0", "Q4_0", "Q4_1", "Q4_K", "Q6_K")
_GGUF_GLOBAL = {"token_embd.weight": "model.embed_tokens.weight", "output_norm.weight": "model.norm.weight",
                "output.weight": "lm_head.weight"}
_GGUF_BLOCK = {"attn_norm": "input_layernorm", "attn_q": "self_attn.q_proj", "attn_k": "self_attn.k_proj",
               "attn_v": "self_attn.v_proj", "attn_output": "self_attn.o_proj",
               "ffn_norm": "post_attention_layernorm", "ffn_gate": "mlp.gate_proj",
               "ffn_up": "mlp.up_proj", "ffn_down": "mlp.down_proj"}


def gguf_to_hf_name(name: str) -> str | None:
    """`blk.3.attn_q.weight` → `model.layers.3.self_attn.q_proj.weight`; None for tensors we do not use."""
    if name in _GGUF_GLOBAL:
        return _GGUF_GLOBAL[name]
    parts = name.split(".")
    if len(parts) == 4 and parts[0] == "blk" and parts[2] in _GGUF_BLOCK and parts[3] == "weight":
        return f"model.layers.{parts[1]}.{_GGUF_BLOCK[parts[2]]}.weight"
    return None


def unpermute_rope_rows(w: np.ndarray, n_head: int) -> np.ndarray:
    """Undo convert_hf_to_gguf.py's q/k permutation. llama.cpp rotates adjacent pairs (2j, 2j+1), so the
    converter reorders each head's rows as reshape(n_head, 2, hd/2, K).swapaxes(1, 2); the inverse brings
    back the rotate_half layout where row j pairs with row j + hd/2."""
    n, k = w.shape
    return w.reshape(n_head, n // n_head // 2, 2, k).swapaxes(1, 2).reshape(n, k)


def _load_gguf(src: Path) -> Checkpoint:
    import gguf

    reader = gguf.GGUFReader(src)
    config = LlamaConfig.from_gguf(reader)
    by_hf: dict[str, Any] = {}
    for t in reader.tensors:
        hf = gguf_to_hf_name(t.name)
        if hf is not None:
            by_hf[hf] = t
    shapes = {hf: tuple(int(s) for s in reversed(t.shape)) for hf, t in by_hf.items()}
    _check_shapes(src, config, shapes)
    for t in by_hf.values():
        if t.tensor_type.name not in _GGUF_TYPES:
            raise UnsupportedModelError(f"{src}: tensor {t.name!r} has GGUF type {t.tensor_type.name}; "
                                        f"expected one of {', '.join(_GGUF_TYPES)}")
    heads = {"self_attn.q_proj": config.num_attention_heads, "self_attn.k_proj": config.num_key_value_heads}

    def load(hf: str) -> np.ndarray:
        t = by_hf[hf]
        w = gguf.quants.dequantize(t.data, t.tensor_type).astype(np.float32, copy=False)
        w = w.reshape(shapes[hf])
        for key, n_head in heads.items():
            if f".{key}." in hf:
                w = unpermute_rope_rows(w, n_head)
        return np.ascontiguousarray(w)

    loaders = {hf: (lambda n=hf: load(n)) for hf in expected_shapes(config)}
    return Checkpoint(config, LazyTensors(loaders), src, gguf_reader=reader, shapes=shapes)
