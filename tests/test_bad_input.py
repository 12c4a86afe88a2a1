"""Bad model files and bad arguments give clear errors (Python exceptions and chat-binary messages),
never a crash."""
from __future__ import annotations

import json
import re
import shutil
import subprocess
import sys
import sysconfig
from pathlib import Path

import numpy as np
import pytest
from safetensors import safe_open
from safetensors.numpy import load_file, save_file

from mergequant import LLM, EngineError
from mergequant.convert.convert import convert


@pytest.fixture(scope="module")
def tiny_mq(tiny_hf_checkpoint, tmp_path_factory) -> Path:
    ck = tiny_hf_checkpoint()
    return convert(ck.path, tmp_path_factory.mktemp("bad") / "tiny.mq", progress=False)


def _rewrite(src: Path, dst: Path, tensors=None, metadata=None) -> Path:
    """Copy a .mq with edited tensors/metadata (written through safetensors, so the container is valid)."""
    t = load_file(str(src))
    with safe_open(str(src), "np") as f:
        meta = dict(f.metadata())
    if tensors:
        tensors(t)
    if metadata:
        metadata(meta)
    save_file(t, str(dst), metadata=meta)
    return dst


def _edit_json(meta: dict, key: str, fn) -> None:
    j = json.loads(meta[key])
    fn(j)
    meta[key] = json.dumps(j)


def test_tiny_model_loads(tiny_mq):
    """The unedited file loads and generates exactly the tokens asked for (the bad files below differ
    from it by one edit each)."""
    llm = LLM(tiny_mq, device="cpu")
    text = llm.generate("the", max_tokens=4, temperature=0.0)
    assert llm.last_finish_reason in ("stop", "length")
    assert len(llm._session.output_tokens) == 4 or llm.last_finish_reason == "stop"
    assert text == llm.detokenize(llm._session.output_tokens)


def _split(raw: bytes) -> tuple[dict, bytes]:
    n = int.from_bytes(raw[:8], "little")
    return json.loads(raw[8:8 + n]), raw[8 + n:]


def _join(header: dict | bytes, data: bytes, pad: bool = True) -> bytes:
    text = header if isinstance(header, bytes) else json.dumps(header).encode()
    if pad:
        text += b" " * (-len(text) % 8)
    return len(text).to_bytes(8, "little") + text + data


def _raw_edit(src: Path, dst: Path, fn) -> Path:
    """Copy a .mq with its header edited as JSON (fn(header)) and the data bytes kept."""
    hdr, data = _split(src.read_bytes())
    out = fn(hdr)
    dst.write_bytes(_join(hdr if out is None else out, data))
    return dst


def _set_meta(key: str, value: str):
    def fn(h):
        h["__metadata__"][key] = value
    return fn


def _config_edit(**changes):
    def fn(h):
        c = json.loads(h["__metadata__"]["config"])
        for k, v in changes.items():
            if isinstance(v, dict) and isinstance(c.get(k), dict):
                c[k].update(v)
            else:
                c[k] = v
        h["__metadata__"]["config"] = json.dumps(c)
    return fn


LLAMA3_SCALING = {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
                  "original_max_position_embeddings": 64}


def reader_cases(tiny_mq: Path, d: Path) -> dict[str, tuple[Path, str]]:
    """Files docs/format.md calls invalid, one rule each (issue 13's failure classes)."""
    cases: dict[str, tuple[Path, str]] = {}
    hdr, data = _split(tiny_mq.read_bytes())

    def shape_overflow(h):
        h["token_embd.weight"]["shape"] = [2**40, 2**24, 7]  # product 0 mod 2^64
    cases["shape overflow"] = (_raw_edit(tiny_mq, d / "overflow.mq", shape_overflow), "overflows 64 bits")

    def offsets_jump(h):
        # token_offsets[5] far past the blob, dropping back at [6]: must be refused before any copy
        name = "tokenizer.token_offsets"
        b = h[name]["data_offsets"][0]
        off = np.frombuffer(data, dtype="<i4", count=h[name]["shape"][0], offset=b).copy()
        off[5] = 2**30
        return _patch(h, data, b, off.tobytes())
    cases["offset table jumps"] = (_raw_patch(tiny_mq, d / "jump.mq", offsets_jump), "decreases at entry 6")

    big = b'{"__metadata__":{"format":"mergequant","format_version":"1"},"junk":[' + b"0," * 1_500_000 + b"0]}"
    (d / "bigarray.mq").write_bytes(_join(big, b""))
    cases["huge array in header"] = (d / "bigarray.mq", "more than 1048576 values")

    raw_hdr = json.dumps(hdr).encode().replace(b'"mergequant"', b'"merge\xffquant"')
    (d / "utf8.mq").write_bytes(_join(raw_hdr, data))
    cases["invalid UTF-8 in a header string"] = (d / "utf8.mq", "invalid UTF-8")

    raw_hdr = json.dumps(hdr).encode()
    marker = rb'chat_template\": \"'  # inside the tokenizer JSON, itself a JSON string in the header
    assert marker in raw_hdr
    (d / "template.mq").write_bytes(_join(raw_hdr.replace(marker, marker + b"\xc0\x80"), data))  # overlong NUL
    cases["invalid UTF-8 in the chat template"] = (d / "template.mq", "invalid UTF-8")

    cases["format_version with NUL"] = (_raw_edit(tiny_mq, d / "nul.mq", _set_meta("format_version", "1\x00junk")),
                                        "invalid format_version")
    cases["format_version 01"] = (_raw_edit(tiny_mq, d / "v01.mq", _set_meta("format_version", "01")),
                                  "invalid format_version '01'")

    text = json.dumps(hdr).encode()
    text += b" " * ((1 - len(text)) % 8)  # one byte past a multiple of 8
    (d / "unpadded.mq").write_bytes(_join(text, data, pad=False))
    cases["data area not 8-aligned"] = (d / "unpadded.mq", "not a multiple of 8")

    # an F32 tensor right after 2 bytes of U8: in bounds, but not 4-aligned
    tiny = {"__metadata__": {"format": "mergequant", "format_version": "1"},
            "a": {"dtype": "U8", "shape": [2], "data_offsets": [0, 2]},
            "b": {"dtype": "F32", "shape": [1], "data_offsets": [2, 6]}}
    (d / "align.mq").write_bytes(_join(tiny, bytes(6)))
    cases["misaligned tensor"] = (d / "align.mq", "tensor 'b': data offset 2 is not a multiple of 4")

    def unknown_field(h):
        h["output_norm.weight"]["extra"] = 1
    cases["unknown tensor field"] = (_raw_edit(tiny_mq, d / "field.mq", unknown_field), "unknown field 'extra'")

    for name, change, match in [
        ("rms_norm_eps negative", {"rms_norm_eps": -1e-5}, "rms_norm_eps"),
        ("rms_norm_eps inf", {"rms_norm_eps": 1e999}, "rms_norm_eps"),
        ("rope_theta zero", {"rope_theta": 0.0}, "rope_theta"),
        ("rope_theta inf", {"rope_theta": 1e999}, "rope_theta"),
        ("rope factor zero", {"rope_scaling": LLAMA3_SCALING | {"factor": 0.0}}, "factor"),
        ("rope factor inf", {"rope_scaling": LLAMA3_SCALING | {"factor": 1e999}}, "factor"),
        ("rope equal freq factors", {"rope_scaling": LLAMA3_SCALING | {"high_freq_factor": 1.0}},
         "high_freq_factor .* must be greater than low_freq_factor"),
        ("original_max_position_embeddings 2^31", {"rope_scaling": LLAMA3_SCALING | {
            "original_max_position_embeddings": 2**31 + 1}}, "original_max_position_embeddings"),
        ("max_position_embeddings too large", {"max_position_embeddings": 2**25}, "max_position_embeddings"),
        ("vocab_size above the tokens", {"vocab_size": 265}, "tokenizer has 264 tokens but config.vocab_size is 265"),
    ]:
        def fn(h, change=change):
            c = json.loads(h["__metadata__"]["config"])
            c.update(change)
            h["__metadata__"]["config"] = json.dumps(c).replace("Infinity", "1e999")
        cases[name] = (_raw_edit(tiny_mq, d / (name.replace(" ", "_").replace("^", "") + ".mq"), fn), match)
    return cases


def _patch(h: dict, data: bytes, at: int, new: bytes) -> tuple[dict, bytes]:
    return h, data[:at] + new + data[at + len(new):]


def _raw_patch(src: Path, dst: Path, fn) -> Path:
    hdr, data = _split(src.read_bytes())
    hdr, data = fn(hdr)
    dst.write_bytes(_join(hdr, data))
    return dst


def bad_files(tiny_mq: Path, d: Path) -> dict[str, tuple[Path, str]]:
    raw = tiny_mq.read_bytes()
    cases: dict[str, tuple[Path, str]] = {}

    p = d / "truncated.mq"
    p.write_bytes(raw[: len(raw) // 2])
    cases["truncated"] = (p, "outside the data area|truncated")

    p = d / "tiny.mq"
    p.write_bytes(raw[:5])
    cases["shorter than the length field"] = (p, "truncated")

    p = d / "header_len.mq"
    p.write_bytes((10**12).to_bytes(8, "little") + raw[8:])
    cases["huge header length"] = (p, "header length")

    p = d / "header_json.mq"
    n = int.from_bytes(raw[:8], "little")
    header = bytearray(raw[8:8 + n])
    header[0:1] = b"["
    header[n // 2] = ord("\x01")
    p.write_bytes(raw[:8] + bytes(header) + raw[8 + n:])
    cases["corrupted header"] = (p, "corrupted header|malformed JSON")

    p = d / "hole.mq"
    hdr = json.loads(raw[8:8 + n])
    first = min((k for k in hdr if k != "__metadata__"), key=lambda k: hdr[k]["data_offsets"][0])
    hdr[first]["data_offsets"][0] += 2
    text = json.dumps(hdr).encode()
    p.write_bytes(len(text).to_bytes(8, "little") + text + raw[8 + n:])
    cases["inconsistent offsets"] = (p, "bytes of data for shape|hole")

    cases["wrong format"] = (_rewrite(tiny_mq, d / "fmt.mq", metadata=lambda m: m.update(format="gguf")),
                             "wrong format 'gguf'")
    cases["no format"] = (_rewrite(tiny_mq, d / "nofmt.mq", metadata=lambda m: m.pop("format")),
                          "not a mergequant model")
    cases["newer version"] = (_rewrite(tiny_mq, d / "ver.mq", metadata=lambda m: m.update(format_version="2")),
                              "format_version 2 is newer")
    cases["missing tensor"] = (_rewrite(tiny_mq, d / "missing.mq", tensors=lambda t: t.pop("blk.1.ffn_down.weight")),
                               "missing tensor 'blk.1.ffn_down.weight'")

    def misshape(t):
        w = t["blk.0.attn_qkv.weight"]
        t["blk.0.attn_qkv.weight"] = np.ascontiguousarray(w[:-1])

    cases["misshapen tensor"] = (_rewrite(tiny_mq, d / "shape.mq", tensors=misshape),
                                 "blk.0.attn_qkv.weight.*expected F16")
    cases["unsupported architecture"] = (
        _rewrite(tiny_mq, d / "arch.mq",
                 metadata=lambda m: _edit_json(m, "config", lambda c: c.update(architecture="gpt2"))),
        "unsupported architecture 'gpt2'")
    cases["unknown scheme"] = (
        _rewrite(tiny_mq, d / "scheme.mq",
                 metadata=lambda m: _edit_json(m, "quant", lambda q: q["linears"].update({"blk.0.ffn_down": "w3a3"}))),
        "scheme 'w3a3'")
    cases["bad config value"] = (
        _rewrite(tiny_mq, d / "cfg.mq",
                 metadata=lambda m: _edit_json(m, "config", lambda c: c.update(num_key_value_heads=3))),
        "num_key_value_heads")
    return cases


@pytest.fixture(scope="module")
def cases(tiny_mq, tmp_path_factory):
    return bad_files(tiny_mq, tmp_path_factory.mktemp("badfiles")) | reader_cases(tiny_mq, tmp_path_factory.mktemp("reader"))


CASE_NAMES = ["truncated", "shorter than the length field", "huge header length", "corrupted header",
              "inconsistent offsets", "wrong format", "no format", "newer version", "missing tensor",
              "misshapen tensor", "unsupported architecture", "unknown scheme", "bad config value",
              "shape overflow", "offset table jumps", "huge array in header", "invalid UTF-8 in a header string",
              "invalid UTF-8 in the chat template", "format_version with NUL", "format_version 01",
              "data area not 8-aligned", "misaligned tensor", "unknown tensor field", "rms_norm_eps negative",
              "rms_norm_eps inf", "rope_theta zero", "rope_theta inf", "rope factor zero", "rope factor inf",
              "rope equal freq factors", "original_max_position_embeddings 2^31", "max_position_embeddings too large",
              "vocab_size above the tokens"]


@pytest.mark.parametrize("case", CASE_NAMES)
def test_bad_file_python_error(cases, case):
    path, match = cases[case]
    with pytest.raises(EngineError, match=match) as e:
        LLM(path, device="cpu")
    assert str(path) in str(e.value)  # the error names the file


def test_missing_file():
    with pytest.raises(FileNotFoundError, match="no-such.mq"):
        LLM("no-such.mq")


def test_bad_device(tiny_mq):
    with pytest.raises(ValueError, match="invalid device 'tpu'"):
        LLM(tiny_mq, device="tpu")


def test_bad_token_ids(tiny_mq):
    llm = LLM(tiny_mq, device="cpu")
    with pytest.raises(ValueError, match="outside the vocabulary"):
        llm.generate([1, 99999], max_tokens=2)
    with pytest.raises(ValueError, match="outside the vocabulary"):
        llm.detokenize([-1])


def chat_binary() -> str:
    # the binary installed beside this interpreter (the install under test), else the first on PATH
    exe = Path(sysconfig.get_path("scripts")) / "mergequant-chat"
    if not exe.exists():
        exe = Path(shutil.which("mergequant-chat") or exe)
    if not exe.exists():
        pytest.skip("mergequant-chat is not installed")
    return str(exe)


@pytest.mark.parametrize("case", ["truncated", "corrupted header", "missing tensor", "unsupported architecture",
                                  "huge array in header", "invalid UTF-8 in the chat template", "shape overflow",
                                  "offset table jumps", "rope equal freq factors"])
def test_bad_file_chat_binary(cases, case):
    path, match = cases[case]
    r = subprocess.run([chat_binary(), "-m", str(path), "-p", "hi"], capture_output=True, text=True, timeout=60)
    assert r.returncode == 1
    assert r.stderr.startswith("mergequant-chat: error:") and len(r.stderr.strip().splitlines()) == 1, r.stderr
    assert re.search(match, r.stderr), r.stderr


@pytest.mark.parametrize("args, match", [
    (["--temp", "-1"], "temperature"),
    (["--top-p", "0"], "top_p"),
    (["-n", "0"], "-n"),
    (["--top-k", "x"], "expected an integer"),
    (["-p", ""], "empty prompt"),
    (["--bogus"], "unknown option"),
])
def test_chat_binary_bad_args(tiny_mq, args, match):
    cmd = [chat_binary(), "-m", str(tiny_mq)] + (args if "-p" in args else args + ["-p", "hi"])
    r = subprocess.run(cmd, capture_output=True, text=True, timeout=60)
    assert r.returncode == 1, r.stderr
    assert match in r.stderr


def test_chat_binary_missing_model_arg():
    r = subprocess.run([chat_binary()], capture_output=True, text=True, timeout=60)
    assert r.returncode == 1 and "no model given" in r.stderr


def test_cuda_requested_without_gpu(tiny_mq):
    """device="cuda" on a machine without a usable GPU (or a build without CUDA) is a clear error;
    device="auto" falls back to the CPU."""
    from mergequant import _engine
    try:
        llm = LLM(tiny_mq, device="cuda")
    except EngineError as e:
        assert "device 'cuda' requested but unavailable" in str(e)
        assert LLM(tiny_mq, device="auto").device == "cpu"
    else:
        assert _engine.cuda_built() and llm.device.startswith("cuda")


def _spm_tokenizer_mq(shared_data: Path, d: Path) -> Path:
    from mergequant.convert.tokenizer import write_tokenizer_mq
    src = shared_data / "tokenizers" / "stories260K" / "tok512.model"
    if not src.is_file():
        pytest.skip(f"{src} is absent")
    (d / "tokenizer.model").symlink_to(src)
    write_tokenizer_mq(d, d / "spm.mq")
    return d / "spm.mq"


@pytest.mark.parametrize("text", [b"<0x-1>", b"<0x1G>", b"<0X41>", b"<0x41 "])
def test_spm_byte_token_parsed_strictly(shared_data, tmp_path, text):
    """A byte-type token must read exactly <0xNN>: "<0x-1>" once went through a signed sscanf into index
    0xFFFFFFFF of the byte table. The error names the token; the message writes byte names in hex."""
    from mergequant import _engine
    mq = _spm_tokenizer_mq(shared_data, tmp_path)
    raw = mq.read_bytes()
    assert raw.count(b"<0x41>") == 1
    bad = tmp_path / "bad.mq"
    bad.write_bytes(raw.replace(b"<0x41>", text))
    with pytest.raises(EngineError, match=r"tokenizer token \d+ has the byte type but its text is not <0xNN>"):
        _engine.Tokenizer(str(bad))


def test_missing_byte_token_named_in_hex(shared_data, tmp_path):
    """byte_fallback without one of the 256 byte tokens: the message names it as <0x41>, not <0x65>."""
    from mergequant import _engine
    mq = _spm_tokenizer_mq(shared_data, tmp_path)
    raw = mq.read_bytes()
    hdr_len = int.from_bytes(raw[:8], "little")
    hdr = json.loads(raw[8:8 + hdr_len])
    # turn the byte token <0x41> into a normal token (its type in tokenizer.token_types set to 1)
    tok = raw[8 + hdr_len:]
    b0, b1 = hdr["tokenizer.tokens"]["data_offsets"]
    offs = np.frombuffer(tok, "<i4", hdr["tokenizer.token_offsets"]["shape"][0],
                         hdr["tokenizer.token_offsets"]["data_offsets"][0])
    blob = tok[b0:b1]
    idx = next(i for i in range(len(offs) - 1) if blob[offs[i]:offs[i + 1]] == b"<0x41>")
    t0 = hdr["tokenizer.token_types"]["data_offsets"][0] + 4 * idx
    tok = tok[:t0] + (1).to_bytes(4, "little") + tok[t0 + 4:]
    bad = tmp_path / "nobyte.mq"
    bad.write_bytes(raw[:8 + hdr_len] + tok)
    meta = json.loads(hdr["__metadata__"]["tokenizer"])
    if not meta.get("byte_fallback"):
        pytest.skip("this tokenizer has no byte fallback")
    with pytest.raises(EngineError, match=r"lacks the <0x41> byte token"):
        _engine.Tokenizer(str(bad))


def test_context_too_large_for_memory(tiny_mq):
    """A context whose KV cache cannot fit is refused before allocating, naming the sizes and the n_ctx that
    fits; the default context is min(trained context, 4096)."""
    llm = LLM(tiny_mq, device="cpu")
    assert llm.n_ctx == min(128, 4096)
    plan = llm.memory()
    per_token = plan["kv_cache_bytes"] // plan["n_ctx"]
    assert per_token == 2 * 2 * (2 * 16) * 2  # K and V, 2 layers, kv_dim = 2 kv heads x head_dim 16, fp16
    assert plan["total"] == plan["weights"] + plan["kv_cache_bytes"] + plan["scratch"]
    n_ctx = 2**31 - 1  # a KV cache of 512 GiB
    with pytest.raises(EngineError, match=r"not enough host memory for a context of n_ctx = 2147483647 with "
                                          r"kv_cache = fp16: the KV cache needs [\d.]+ GiB .* available; "
                                          r"n_ctx <= 128 fits"):
        LLM(tiny_mq, device="cpu", n_ctx=n_ctx)


def test_n_batch(tiny_mq):
    """n_batch: None takes the backend's default (256 on the CPU, capped by n_ctx), a positive value is used as
    given, anything else is refused naming it; the prefill chunking does not change the greedy tokens."""
    llm = LLM(tiny_mq, device="cpu")
    assert llm.memory()["n_batch"] == min(256, llm.n_ctx)
    small = LLM(tiny_mq, device="cpu", n_batch=3)
    assert small.memory()["n_batch"] == 3
    assert small.memory()["scratch"] < llm.memory()["scratch"]
    prompt = list(range(5, 40))
    a = llm.generate(prompt, max_tokens=8, temperature=0.0)
    b = small.generate(prompt, max_tokens=8, temperature=0.0)
    assert a == b and llm.last_timings["n_prefill"] == len(prompt)
    for bad in (0, -4, 2.5, True, "64"):
        with pytest.raises(ValueError, match=r"invalid n_batch"):
            LLM(tiny_mq, device="cpu", n_batch=bad)
    from mergequant import _engine
    with pytest.raises(ValueError, match=r"invalid n_batch -1: must be >= 1 \(or 0 for the backend's default, 256 on cpu\)"):
        _engine.Session(llm._model, n_batch=-1)
