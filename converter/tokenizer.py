"""Tokenizer export: read the vocabulary of a checkpoint (GGUF `tokenizer.ggml.*`, Hugging Face
tokenizer.json, vocab.json + merges.txt, SentencePiece tokenizer.model, or Llama-3's tiktoken rank file)
and turn it into the model file's `tokenizer` metadata plus `tokenizer.*` tensors (docs/format.md).

Everything the engine needs to reproduce the reference tokenizer is embedded: pieces, scores, token types,
merges in rank order, special ids, add_bos/add_eos, the pre-tokenizer id and the chat template. A
pre-tokenizer the engine does not implement is refused here, at conversion, rather than tokenizing wrongly.
"""
from __future__ import annotations

import base64
import json
from pathlib import Path
from typing import Any

import numpy as np

# GGUF token types (llama.cpp's numbering), also used in the model file
TOKEN_NORMAL, TOKEN_UNKNOWN, TOKEN_CONTROL, TOKEN_USER_DEFINED, TOKEN_UNUSED, TOKEN_BYTE = 1, 2, 3, 4, 5, 6

# pre-tokenizers the engine implements (engine/src/mq-unicode.cpp)
SUPPORTED_PRE = ("gpt2", "smollm", "llama3", "qwen2", "default")

# llama.cpp's `tokenizer.ggml.pre` names → ours
_GGUF_PRE = {"gpt2": "gpt2", "gpt-2": "gpt2", "smollm": "smollm", "llama-bpe": "llama3", "llama3": "llama3",
             "qwen2": "qwen2", "default": "default"}

# the split regexes of the Hugging Face / tiktoken tokenizers we recognise
LLAMA3_PATTERN = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*"
                  r"|\s*[\r\n]+|\s+(?!\S)|\s+")
QWEN2_PATTERN = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*"
                 r"|\s*[\r\n]+|\s+(?!\S)|\s+")
_SPLIT_PATTERNS = {LLAMA3_PATTERN: "llama3", QWEN2_PATTERN: "qwen2"}

# texts of tokens that end a turn in the chat formats we know; a control token with one of these texts is
# an end-of-generation id besides eos
_EOT_TEXTS = ("<|eot_id|>", "<|eom_id|>", "<|end_of_text|>", "<|im_end|>", "<|endoftext|>", "<|end|>",
              "<end_of_turn>", "</s>")


class TokenizerExportError(ValueError):
    pass


def bytes_to_unicode() -> dict[int, str]:
    """GPT-2's reversible byte → printable character map used by byte-level BPE vocabularies."""
    bs = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + list(range(ord("®"), ord("ÿ") + 1))
    cs = bs[:]
    n = 0
    for b in range(256):
        if b not in bs:
            bs.append(b)
            cs.append(256 + n)
            n += 1
    return {b: chr(c) for b, c in zip(bs, cs)}


def _blob(strings: list[str]) -> tuple[np.ndarray, np.ndarray]:
    """Concatenated UTF-8 bytes and int32 offsets (len + 1) of a list of strings."""
    encoded = [s.encode("utf-8") for s in strings]
    offsets = np.zeros(len(encoded) + 1, dtype=np.int32)
    lengths = np.fromiter((len(e) for e in encoded), dtype=np.int64, count=len(encoded))
    total = int(lengths.sum())
    if total >= 2**31:
        raise TokenizerExportError(f"tokenizer text blob of {total} bytes does not fit int32 offsets")
    offsets[1:] = np.cumsum(lengths)
    return np.frombuffer(b"".join(encoded), dtype=np.uint8).copy(), offsets


def _build(tokens: list[str], types: list[int], scores: list[float] | None, merges: list[str] | None,
           meta: dict[str, Any]) -> tuple[dict[str, Any], dict[str, np.ndarray]]:
    """Validate ids against the vocabulary and pack the tensors."""
    n = len(tokens)
    if len(types) != n:
        raise TokenizerExportError(f"{n} tokens but {len(types)} token types")
    for key in ("bos_token_id", "eos_token_id", "unk_token_id", "pad_token_id"):
        v = meta.get(key, -1)
        if v is None:
            v = -1
        if not -1 <= v < n:
            raise TokenizerExportError(f"tokenizer {key} = {v} is outside the vocabulary of {n} tokens")
        meta[key] = int(v)
    eot = [meta["eos_token_id"]] if meta["eos_token_id"] >= 0 else []
    for i, (t, ty) in enumerate(zip(tokens, types)):
        if ty == TOKEN_CONTROL and t in _EOT_TEXTS and i not in eot:
            eot.append(i)
    meta["eot_token_ids"] = eot
    if meta["pre"] not in SUPPORTED_PRE:
        raise TokenizerExportError(f"unsupported pre-tokenizer {meta['pre']!r}; supported: {', '.join(SUPPORTED_PRE)}")
    tok_blob, tok_off = _blob(tokens)
    tensors = {
        "tokenizer.tokens": tok_blob,
        "tokenizer.token_offsets": tok_off,
        "tokenizer.token_types": np.asarray(types, dtype=np.int32),
        "tokenizer.scores": np.asarray(scores if scores is not None else np.zeros(n), dtype=np.float32),
    }
    if meta["model"] == "bpe":
        if not merges:
            raise TokenizerExportError("a BPE tokenizer needs merges")
        m_blob, m_off = _blob(merges)
        tensors["tokenizer.merges"] = m_blob
        tensors["tokenizer.merge_offsets"] = m_off
    return meta, tensors


# ---------------------------------------------------------------------------------------------- GGUF

def _gguf_value(reader: Any, key: str, default: Any = None) -> Any:
    field = reader.fields.get(key)
    if field is None:
        return default
    value = field.contents()
    return value


def export_gguf(reader: Any) -> tuple[dict[str, Any], dict[str, np.ndarray]]:
    src = getattr(reader, "path", "GGUF file")
    kind = _gguf_value(reader, "tokenizer.ggml.model")
    if kind == "gpt2":
        model = "bpe"
    elif kind == "llama":
        model = "spm"
    else:
        raise TokenizerExportError(f"{src}: tokenizer.ggml.model = {kind!r}; supported: 'gpt2' (byte-level BPE), 'llama' (SentencePiece BPE)")
    tokens = list(_gguf_value(reader, "tokenizer.ggml.tokens") or [])
    if not tokens:
        raise TokenizerExportError(f"{src}: tokenizer.ggml.tokens is missing or empty")
    types = [int(t) for t in (_gguf_value(reader, "tokenizer.ggml.token_type") or [TOKEN_NORMAL] * len(tokens))]
    scores = _gguf_value(reader, "tokenizer.ggml.scores")
    merges = _gguf_value(reader, "tokenizer.ggml.merges")
    if model == "bpe":
        gguf_pre = _gguf_value(reader, "tokenizer.ggml.pre", "default")
        if gguf_pre not in _GGUF_PRE:
            raise TokenizerExportError(f"{src}: unsupported pre-tokenizer tokenizer.ggml.pre = {gguf_pre!r}; supported: {', '.join(_GGUF_PRE)}")
        pre = _GGUF_PRE[gguf_pre]
        if pre == "default":
            pre = "gpt2"  # llama.cpp's default BPE split is the GPT-2 regex
    else:
        pre = "default"
    meta = {
        "model": model,
        "pre": pre,
        "bos_token_id": _gguf_value(reader, "tokenizer.ggml.bos_token_id", -1),
        "eos_token_id": _gguf_value(reader, "tokenizer.ggml.eos_token_id", -1),
        "unk_token_id": _gguf_value(reader, "tokenizer.ggml.unknown_token_id", -1),
        "pad_token_id": _gguf_value(reader, "tokenizer.ggml.padding_token_id", -1),
        "add_bos": bool(_gguf_value(reader, "tokenizer.ggml.add_bos_token", model == "spm")),
        "add_eos": bool(_gguf_value(reader, "tokenizer.ggml.add_eos_token", False)),
        "add_space_prefix": bool(_gguf_value(reader, "tokenizer.ggml.add_space_prefix", model == "spm")),
        "ignore_merges": pre == "llama3",
        "byte_fallback": model == "spm" and TOKEN_BYTE in types,
        "chat_template": _gguf_value(reader, "tokenizer.chat_template"),
    }
    return _build(tokens, types, list(scores) if scores is not None else None,
                  list(merges) if merges is not None else None, meta)


# ------------------------------------------------------------------------------------ Hugging Face dir

def _read_json(path: Path) -> Any:
    with open(path, encoding="utf-8") as fh:
        return json.load(fh)


def _token_text(value: Any) -> str | None:
    """tokenizer_config's bos_token/eos_token: a string or an AddedToken dict."""
    if isinstance(value, dict):
        return value.get("content")
    return value


def _chat_template(hf_dir: Path, config: dict[str, Any]) -> str | None:
    tmpl = config.get("chat_template")
    if isinstance(tmpl, list):  # named templates: the default one is what chat uses
        named = {t["name"]: t["template"] for t in tmpl}
        tmpl = named.get("default")
    if tmpl is None and (hf_dir / "chat_template.jinja").is_file():
        tmpl = (hf_dir / "chat_template.jinja").read_text(encoding="utf-8")
    if tmpl is None and (hf_dir / "chat_template.json").is_file():
        tmpl = _read_json(hf_dir / "chat_template.json").get("chat_template")
    return tmpl


def _bpe_pre_from_json(pre: Any, path: Path) -> str:
    """Map a tokenizer.json pre_tokenizer to one of the engine's pre-tokenizer ids, or refuse it."""
    steps = pre.get("pretokenizers", []) if pre and pre.get("type") == "Sequence" else ([pre] if pre else [])
    kinds = [s.get("type") for s in steps]
    if kinds == ["ByteLevel"] and steps[0].get("use_regex", True):
        return "gpt2"
    if kinds == ["Digits", "ByteLevel"] and steps[0].get("individual_digits") and steps[1].get("use_regex", True):
        return "smollm"
    if kinds == ["Split", "ByteLevel"] and not steps[1].get("use_regex", True):
        pattern = steps[0].get("pattern", {}).get("Regex")
        if pattern in _SPLIT_PATTERNS and steps[0].get("behavior") == "Isolated":
            return _SPLIT_PATTERNS[pattern]
    raise TokenizerExportError(f"{path}: unsupported pre_tokenizer {json.dumps(pre)}; the engine implements "
                               "ByteLevel (GPT-2), Digits+ByteLevel (SmolLM2) and the Llama-3 / Qwen2 Split patterns")


def _added_tokens(tokens: list[str], types: list[int], added: list[tuple[int, str, bool]]) -> None:
    """Place added tokens at their ids (growing the vocabulary; holes become unused tokens)."""
    for tid, text, special in added:
        while len(tokens) <= tid:
            tokens.append(f"[PAD{len(tokens)}]")
            types.append(TOKEN_UNUSED)
        tokens[tid] = text
        types[tid] = TOKEN_CONTROL if special else TOKEN_USER_DEFINED


def _special_ids(tokens: list[str], config: dict[str, Any], meta: dict[str, Any], model_cfg: dict[str, Any]) -> None:
    index = {t: i for i, t in enumerate(tokens)}
    for key in ("bos", "eos", "unk", "pad"):
        text = _token_text(config.get(f"{key}_token"))
        if text is not None and text in index:
            meta[f"{key}_token_id"] = index[text]
        elif meta.get(f"{key}_token_id", -1) < 0 and isinstance(model_cfg.get(f"{key}_token_id"), int):
            meta[f"{key}_token_id"] = model_cfg[f"{key}_token_id"]
        meta.setdefault(f"{key}_token_id", -1)


def _export_tokenizer_json(hf_dir: Path, config: dict[str, Any], model_cfg: dict[str, Any]):
    path = hf_dir / "tokenizer.json"
    import tokenizers  # validates the file the way the reference library reads it
    tokenizers.Tokenizer.from_file(str(path))
    tj = _read_json(path)
    model = tj["model"]
    if model.get("type") != "BPE":
        raise TokenizerExportError(f"{path}: tokenizer model {model.get('type')!r} is not supported here (BPE only)")
    pre = _bpe_pre_from_json(tj.get("pre_tokenizer"), path)
    normalizer = tj.get("normalizer")
    if normalizer is not None and normalizer.get("type") != "NFC":
        raise TokenizerExportError(f"{path}: unsupported normalizer {json.dumps(normalizer)}")
    vocab: dict[str, int] = model["vocab"]
    tokens = [""] * len(vocab)
    for text, tid in vocab.items():
        tokens[tid] = text
    types = [TOKEN_NORMAL] * len(tokens)
    _added_tokens(tokens, types, [(a["id"], a["content"], a["special"]) for a in tj.get("added_tokens", [])])
    merges = [m if isinstance(m, str) else " ".join(m) for m in model["merges"]]
    post = tj.get("post_processor") or {}
    single = post.get("single", []) if post.get("type") == "TemplateProcessing" else []
    meta: dict[str, Any] = {
        "model": "bpe", "pre": pre,
        "add_bos": bool(single) and "SpecialToken" in single[0],
        "add_eos": bool(single) and "SpecialToken" in single[-1],
        "add_space_prefix": False, "ignore_merges": bool(model.get("ignore_merges", False)),
        "byte_fallback": bool(model.get("byte_fallback", False)),
    }
    if meta["byte_fallback"]:
        raise TokenizerExportError(f"{path}: byte-level BPE with byte_fallback is not supported")
    if single:  # the post-processor names the BOS it adds
        meta["bos_token_id"] = tokens.index(single[0]["SpecialToken"]["id"]) if meta["add_bos"] else -1
    return tokens, types, None, merges, meta


def _export_vocab_merges(hf_dir: Path, model_cfg: dict[str, Any]):
    vocab: dict[str, int] = _read_json(hf_dir / "vocab.json")
    tokens = [""] * len(vocab)
    for text, tid in vocab.items():
        tokens[tid] = text
    types = [TOKEN_NORMAL] * len(tokens)
    lines = (hf_dir / "merges.txt").read_text(encoding="utf-8").split("\n")
    merges = [ln for ln in lines if ln and not ln.startswith("#version")]
    arch = model_cfg.get("model_type")
    pre = {"qwen2": "qwen2", "gpt2": "gpt2"}.get(arch)
    if pre is None:
        raise TokenizerExportError(f"{hf_dir}: vocab.json + merges.txt without tokenizer.json; the pre-tokenizer of "
                                   f"model_type {arch!r} is unknown (known: qwen2, gpt2)")
    added = []
    if (hf_dir / "added_tokens.json").is_file():
        added = [(tid, text, True) for text, tid in _read_json(hf_dir / "added_tokens.json").items()]
    _added_tokens(tokens, types, added)
    meta = {"model": "bpe", "pre": pre, "add_bos": False, "add_eos": False, "add_space_prefix": False,
            "ignore_merges": False, "byte_fallback": False}
    return tokens, types, None, merges, meta


def _proto_fields(buf: bytes) -> list[tuple[int, int, Any]]:
    """(field number, wire type, value) of one protobuf message level: enough to read the few
    SentencePiece settings the processor API does not expose, without a protobuf dependency."""
    out, i = [], 0

    def varint() -> int:
        nonlocal i
        v, shift = 0, 0
        while True:
            b = buf[i]
            i += 1
            v |= (b & 0x7F) << shift
            if b < 0x80:
                return v
            shift += 7

    while i < len(buf):
        key = varint()
        num, wt = key >> 3, key & 7
        if wt == 0:
            out.append((num, wt, varint()))
        elif wt == 1:
            out.append((num, wt, buf[i:i + 8])); i += 8
        elif wt == 2:
            n = varint(); out.append((num, wt, buf[i:i + n])); i += n
        elif wt == 5:
            out.append((num, wt, buf[i:i + 4])); i += 4
        else:
            raise TokenizerExportError(f"SentencePiece model: unexpected protobuf wire type {wt}")
    return out


def _export_sentencepiece(path: Path):
    import sentencepiece as spm
    sp = spm.SentencePieceProcessor(model_file=str(path))
    data = path.read_bytes()
    # ModelProto: 2 trainer_spec, 3 normalizer_spec. TrainerSpec: 3 model_type (2 = BPE), 35 byte_fallback.
    # NormalizerSpec: 1 name, 3 add_dummy_prefix, 4 remove_extra_whitespaces (proto defaults: true, true).
    top = _proto_fields(data)
    trainer = next((_proto_fields(v) for n, _, v in top if n == 2), [])
    norm = next((_proto_fields(v) for n, _, v in top if n == 3), [])
    model_type = next((v for n, _, v in trainer if n == 3), 1)
    byte_fallback = bool(next((v for n, _, v in trainer if n == 35), 0))
    norm_name = next((v.decode() for n, _, v in norm if n == 1), "")
    add_dummy_prefix = bool(next((v for n, _, v in norm if n == 3), 1))
    remove_extra_ws = bool(next((v for n, _, v in norm if n == 4), 1))
    if model_type != 2:
        raise TokenizerExportError(f"{path}: SentencePiece model_type {model_type} is not supported (BPE = 2 only)")
    if norm_name not in ("identity", ""):
        raise TokenizerExportError(f"{path}: SentencePiece normalizer {norm_name!r} is not supported; the engine "
                                   "implements 'identity' only")
    n = sp.get_piece_size()
    tokens = [sp.id_to_piece(i) for i in range(n)]
    scores = [sp.get_score(i) for i in range(n)]
    types = []
    for i in range(n):
        if sp.is_unknown(i):
            types.append(TOKEN_UNKNOWN)
        elif sp.is_control(i):
            types.append(TOKEN_CONTROL)
        elif sp.is_unused(i):
            types.append(TOKEN_UNUSED)
        elif sp.is_byte(i):
            types.append(TOKEN_BYTE)
        else:
            types.append(TOKEN_NORMAL)
    # user-defined pieces: the API has no predicate; the proto's piece type 4 marks them
    for k, (num, _, v) in enumerate([f for f in top if f[0] == 1]):
        ptype = next((t for pn, _, t in _proto_fields(v) if pn == 3), 1)
        if ptype == 4:
            types[k] = TOKEN_USER_DEFINED
    meta = {"model": "spm", "pre": "default", "bos_token_id": sp.bos_id(), "eos_token_id": sp.eos_id(),
            "unk_token_id": sp.unk_id(), "pad_token_id": sp.pad_id(), "add_bos": True, "add_eos": False,
            "add_space_prefix": add_dummy_prefix, "ignore_merges": False, "byte_fallback": byte_fallback,
            "remove_extra_whitespaces": remove_extra_ws}
    return tokens, types, scores, None, meta


def _is_tiktoken(path: Path) -> bool:
    with open(path, "rb") as fh:
        first = fh.readline().split()
    try:
        return len(first) == 2 and int(first[1]) >= 0 and len(base64.b64decode(first[0], validate=True)) > 0
    except ValueError:
        return False


def _export_tiktoken(path: Path, config: dict[str, Any]):
    """Llama-3's rank file: ranks become byte-level BPE tokens and merges (the Hugging Face conversion:
    each token's splits into two tokens, ordered by the merged token's rank)."""
    ranks: dict[bytes, int] = {}
    for line in path.read_bytes().splitlines():
        if line:
            tok, rank = line.split()
            ranks[base64.b64decode(tok)] = int(rank)
    b2u = bytes_to_unicode()

    def enc(b: bytes) -> str:
        return "".join(b2u[x] for x in b)

    tokens = [""] * len(ranks)
    for tok, rank in ranks.items():
        tokens[rank] = enc(tok)
    merges: list[tuple[int, int, int, str]] = []
    for tok, rank in ranks.items():
        local = []
        for k in range(1, len(tok)):
            left, right = tok[:k], tok[k:]
            if left in ranks and right in ranks:
                local.append((rank, ranks[left], ranks[right], enc(left) + " " + enc(right)))
        merges.extend(local)
    merges.sort()
    types = [TOKEN_NORMAL] * len(tokens)
    added = config.get("added_tokens_decoder", {})
    _added_tokens(tokens, types, [(int(k), v["content"], v.get("special", True)) for k, v in added.items()])
    meta = {"model": "bpe", "pre": "llama3", "add_bos": True, "add_eos": False, "add_space_prefix": False,
            "ignore_merges": True, "byte_fallback": False}
    return tokens, types, None, [m[3] for m in merges], meta


def export_hf_dir(hf_dir: Path) -> tuple[dict[str, Any], dict[str, np.ndarray]]:
    hf_dir = Path(hf_dir)
    config = _read_json(hf_dir / "tokenizer_config.json") if (hf_dir / "tokenizer_config.json").is_file() else {}
    model_cfg = _read_json(hf_dir / "config.json") if (hf_dir / "config.json").is_file() else {}
    tj = hf_dir / "tokenizer.json"
    tm = hf_dir / "tokenizer.model"
    byte_level_json = tj.is_file() and "ByteLevel" in json.dumps(_read_json(tj).get("pre_tokenizer"))
    if byte_level_json:
        tokens, types, scores, merges, meta = _export_tokenizer_json(hf_dir, config, model_cfg)
    elif tm.is_file() and _is_tiktoken(tm):
        tokens, types, scores, merges, meta = _export_tiktoken(tm, config)
    elif tm.is_file():
        tokens, types, scores, merges, meta = _export_sentencepiece(tm)
    elif (hf_dir / "vocab.json").is_file() and (hf_dir / "merges.txt").is_file():
        tokens, types, scores, merges, meta = _export_vocab_merges(hf_dir, model_cfg)
    elif tj.is_file():
        raise TokenizerExportError(f"{tj}: a non-byte-level tokenizer.json needs its tokenizer.model beside it")
    else:
        raise TokenizerExportError(f"{hf_dir}: no tokenizer found (tokenizer.json, tokenizer.model or vocab.json + merges.txt)")
    # added tokens listed in tokenizer_config (Llama-2/Mistral HF dirs mark <unk>, <s>, </s> there too)
    for k, v in config.get("added_tokens_decoder", {}).items():
        tid = int(k)
        if tid < len(tokens) and tokens[tid] == v["content"] and types[tid] == TOKEN_NORMAL:
            types[tid] = TOKEN_CONTROL if v.get("special", True) else TOKEN_USER_DEFINED
    _special_ids(tokens, config, meta, model_cfg)
    if "add_bos_token" in config and "add_bos" in meta and not byte_level_json:
        meta["add_bos"] = bool(config["add_bos_token"])
    if "add_eos_token" in config and not byte_level_json:
        meta["add_eos"] = bool(config["add_eos_token"])
    meta["chat_template"] = _chat_template(hf_dir, config)
    return _build(tokens, types, scores, merges, meta)


def export_tokenizer(checkpoint: Any) -> tuple[dict[str, Any], dict[str, np.ndarray]]:
    """(tokenizer metadata, tokenizer tensors) of a loaded checkpoint (GGUF reader or Hugging Face dir)."""
    if getattr(checkpoint, "gguf_reader", None) is not None:
        return export_gguf(checkpoint.gguf_reader)
    if getattr(checkpoint, "hf_dir", None) is not None:
        return export_hf_dir(checkpoint.hf_dir)
    raise TokenizerExportError("checkpoint has neither a GGUF reader nor a Hugging Face directory")


def export_source(src: str | Path) -> tuple[dict[str, Any], dict[str, np.ndarray]]:
    """Export from a path: a .gguf file or a directory of tokenizer files."""
    src = Path(src)
    if src.is_file() and src.suffix == ".gguf":
        import gguf
        return export_gguf(gguf.GGUFReader(str(src)))
    if src.is_dir():
        return export_hf_dir(src)
    raise TokenizerExportError(f"{src}: expected a .gguf file or a directory of tokenizer files")


def write_tokenizer_mq(src: str | Path, out_path: str | Path) -> None:
    """A tokenizer-only model file (no config, no weights): what the tokenizer tests load."""
    from .mqfile import write_mq
    meta, tensors = export_source(src)
    write_mq(out_path, None, None, meta, tensors)
