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
    llm = LLM(tiny_mq, device="cpu")
    assert llm.generate("the", max_tokens=4, temperature=0.0) is not None


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
    return bad_files(tiny_mq, tmp_path_factory.mktemp("badfiles"))


CASE_NAMES = ["truncated", "shorter than the length field", "huge header length", "corrupted header",
              "inconsistent offsets", "wrong format", "no format", "newer version", "missing tensor",
              "misshapen tensor", "unsupported architecture", "unknown scheme", "bad config value"]


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


@pytest.mark.parametrize("case", ["truncated", "corrupted header", "missing tensor", "unsupported architecture"])
def test_bad_file_chat_binary(cases, case):
    path, match = cases[case]
    r = subprocess.run([chat_binary(), "-m", str(path), "-p", "hi"], capture_output=True, text=True, timeout=60)
    assert r.returncode == 1
    assert "mergequant-chat: error:" in r.stderr
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
