"""The .mq writer/reader, the f16 conversion of HF and GGUF checkpoints (names, dtypes, shapes and fusions
of docs/format.md), the scheme table and the inspector."""
from __future__ import annotations

import json
import re

import numpy as np
import pytest
from safetensors.numpy import save_file

from mergequant.convert import (LlamaConfig, convert, inspect_model, load_checkpoint, pack_linear, read_mq,
                                write_mq)

CONFIG = LlamaConfig("llama", 264, 64, 128, 2, 4, 2, 16, 128, 1e-5, 10000.0, None, True)


def test_round_trip(tmp_path):
    rng = np.random.default_rng(0)
    tensors = {"a.weight": rng.standard_normal((3, 5)).astype(np.float16),
               "b": rng.standard_normal(7).astype(np.float32),
               "tokenizer.token_offsets": np.arange(4, dtype=np.int32),
               "tokenizer.tokens": np.frombuffer(b"abc", np.uint8)}
    quant = {"method": "f16", "params": {"x": 1}, "linears": {"a": "f16"}}
    tok = {"model": "bpe", "chat_template": "{{ x }}"}
    mq = read_mq(write_mq(tmp_path / "m.mq", CONFIG, quant, tok, tensors))
    assert mq.metadata["format"] == "mergequant" and mq.metadata["format_version"] == "1"
    assert mq.config == CONFIG and mq.quant == quant and mq.tokenizer == tok
    assert sorted(mq.names()) == sorted(tensors)
    for name, want in tensors.items():
        got = mq.tensor(name)
        assert got.dtype == want.dtype and got.shape == want.shape
        np.testing.assert_array_equal(got, want)
        assert mq.nbytes(name) == want.nbytes


def test_tokenizer_only_file(tmp_path):
    mq = read_mq(write_mq(tmp_path / "t.mq", None, None, {"model": "spm"}, {"x": np.zeros(2, np.int32)}))
    assert mq.config is None and mq.quant is None and mq.tokenizer == {"model": "spm"}
    assert "config" not in mq.metadata and "quant" not in mq.metadata


@pytest.mark.parametrize("metadata,needle", [
    ({"format_version": "1"}, "'format' is None"),
    ({"format": "gguf", "format_version": "1"}, "'format' is 'gguf'"),
    ({"format": "mergequant", "format_version": "2"}, "format_version 2 is newer"),
    ({"format": "mergequant", "format_version": "one"}, "'format_version' is 'one'"),
    ({"format": "mergequant", "format_version": "1", "quant": "{"}, "'quant' is not valid JSON"),
])
def test_bad_metadata_refused(tmp_path, metadata, needle):
    save_file({"x": np.zeros(1, np.float32)}, str(tmp_path / "bad.mq"), metadata=metadata)
    with pytest.raises(ValueError, match=needle):
        read_mq(tmp_path / "bad.mq")


def test_pack_linear_records_scheme_and_checks_input():
    quant: dict = {}
    w = np.arange(12, dtype=np.float32).reshape(3, 4)
    out = pack_linear("blk.0.attn_output", w, "f16", quant)
    assert quant == {"linears": {"blk.0.attn_output": "f16"}}
    assert list(out) == ["blk.0.attn_output.weight"] and out["blk.0.attn_output.weight"].dtype == np.float16
    with pytest.raises(ValueError, match="unknown linear scheme 'w3'"):
        pack_linear("p", w, "w3", quant)
    with pytest.raises(ValueError, match="'p'.*2-D"):
        pack_linear("p", w[0], "f16", quant)


def expected_layout(c: LlamaConfig) -> dict[str, tuple[str, tuple[int, ...]]]:
    """docs/format.md's model tensors for an f16 conversion, written out independently."""
    d, f, hd = c.hidden_size, c.intermediate_size, c.head_dim
    out = {"token_embd.weight": ("F16", (c.vocab_size, d)), "output_norm.weight": ("F32", (d,))}
    if not c.tie_word_embeddings:
        out["output.weight"] = ("F16", (c.vocab_size, d))
    for i in range(c.num_hidden_layers):
        out |= {f"blk.{i}.attn_norm.weight": ("F32", (d,)), f"blk.{i}.ffn_norm.weight": ("F32", (d,)),
                f"blk.{i}.attn_qkv.weight": ("F16", ((c.num_attention_heads + 2 * c.num_key_value_heads) * hd, d)),
                f"blk.{i}.attn_output.weight": ("F16", (d, c.num_attention_heads * hd)),
                f"blk.{i}.ffn_gate_up.weight": ("F16", (2 * f, d)),
                f"blk.{i}.ffn_down.weight": ("F16", (d, f))}
    return out


@pytest.mark.parametrize("tied", [True, False])
def test_convert_hf_layout_and_values(tiny_hf_checkpoint, tmp_path, tied):
    tiny = tiny_hf_checkpoint(tied=tied)
    mq = read_mq(convert(tiny.path, tmp_path / "tiny.mq", progress=False))
    c = mq.config
    assert c == load_checkpoint(tiny.path).config
    layout = expected_layout(c)
    model_names = [n for n in mq.names() if not n.startswith("tokenizer.")]
    assert sorted(model_names) == sorted(layout)
    for name, (dtype, shape) in layout.items():
        assert (mq.dtype(name), mq.shape(name)) == (dtype, shape), name
    assert mq.quant == {"method": "f16", "params": {},
                        "linears": {f"blk.{i}.{p}": "f16" for i in range(2)
                                    for p in ("attn_qkv", "attn_output", "ffn_gate_up", "ffn_down")}}
    assert mq.tokenizer["model"] == "bpe" and "tokenizer.tokens" in mq.names()
    t = tiny.tensors
    f16 = lambda a: a.astype(np.float16)  # noqa: E731
    for i in range(2):
        p = f"model.layers.{i}."
        qkv = np.concatenate([t[p + f"self_attn.{x}_proj.weight"] for x in "qkv"])
        np.testing.assert_array_equal(mq.tensor(f"blk.{i}.attn_qkv.weight"), f16(qkv))
        gate_up = np.concatenate([t[p + "mlp.gate_proj.weight"], t[p + "mlp.up_proj.weight"]])
        np.testing.assert_array_equal(mq.tensor(f"blk.{i}.ffn_gate_up.weight"), f16(gate_up))
        np.testing.assert_array_equal(mq.tensor(f"blk.{i}.attn_norm.weight"), t[p + "input_layernorm.weight"])
    np.testing.assert_array_equal(mq.tensor("token_embd.weight"), f16(t["model.embed_tokens.weight"]))
    if not tied:
        np.testing.assert_array_equal(mq.tensor("output.weight"), f16(t["lm_head.weight"]))


def test_convert_gguf_equals_convert_hf(tiny_hf_checkpoint, tiny_gguf, tmp_path):
    a = read_mq(convert(tiny_hf_checkpoint().path, tmp_path / "hf.mq", progress=False))
    b = read_mq(convert(tiny_gguf("F32"), tmp_path / "gguf.mq", progress=False))
    assert a.config == b.config and a.quant == b.quant
    for name in expected_layout(a.config):
        np.testing.assert_array_equal(a.tensor(name), b.tensor(name), err_msg=name)


def test_convert_refuses_unknown_scheme_and_stray_args(tiny_hf_checkpoint, tmp_path):
    with pytest.raises(ValueError, match="unknown linear scheme 'int3'"):
        convert(tiny_hf_checkpoint().path, tmp_path / "x.mq", scheme="int3", progress=False)
    with pytest.raises(TypeError, match="alpha"):
        convert(tiny_hf_checkpoint().path, tmp_path / "x.mq", alpha=0.5, progress=False)


def test_inspect_lists_metadata_and_tensors(tiny_hf_checkpoint, tmp_path):
    path = convert(tiny_hf_checkpoint(tied=False).path, tmp_path / "tiny.mq", progress=False)
    text = inspect_model(path)
    mq = read_mq(path)
    assert json.loads(text.splitlines()[1].removeprefix("config: ")) == json.loads(mq.config.to_json())
    assert "method 'f16'" in text and "{'f16': 8}" in text and '"model": "bpe"' in text
    assert re.search(r"blk\.1\.ffn_gate_up\.weight +F16 +\[256, 64\] +32768\n", text)
    total = sum(mq.nbytes(n) for n in mq.names())
    assert f"total tensor data: {total} bytes" in text


def _safetensors_parts(path):
    """(header without its metadata, metadata, data bytes) of a safetensors file."""
    import struct
    raw = path.read_bytes()
    (n,) = struct.unpack("<Q", raw[:8])
    header = json.loads(raw[8:8 + n])
    return header, header.pop("__metadata__"), raw[8 + n:], n


def test_streaming_writer_lays_out_like_safetensors(tmp_path):
    """MqWriter (tensors streamed through a scratch file) writes what safetensors.numpy.save_file writes: the same
    header entries (dtype, shape, offsets: the same order and alignment), header length and data bytes; only the
    metadata's key order may differ (safetensors' is a hash map's). A tensor added twice is the last one."""
    from mergequant.convert.mqfile import MqWriter
    rng = np.random.default_rng(1)
    tensors = {"z.f64": rng.standard_normal(3), "blk.0.q": rng.integers(0, 255, (5, 7), dtype=np.uint8),
               "blk.0.scale": rng.standard_normal(5).astype(np.float32), "i8": np.arange(-3, 4, dtype=np.int8),
               "h": rng.standard_normal((2, 3)).astype(np.float16), "i32": np.arange(9, dtype=np.int32),
               "i64": np.arange(2, dtype=np.int64), "u16": np.arange(5, dtype=np.uint16),
               "empty": np.zeros((0, 4), np.float32), "a.odd": np.ones(3, np.uint8)}
    meta = {"format": "mergequant", "zeta": "1", "alpha": json.dumps({"é": [1, 2]})}
    save_file(tensors, str(tmp_path / "ref.st"), metadata=meta)
    with MqWriter(tmp_path / "ours.st") as w:
        w.add("i32", np.zeros(9, np.int32))  # replaced below
        w.add_all(tensors)
        w.finish(meta)
    ref, ours = _safetensors_parts(tmp_path / "ref.st"), _safetensors_parts(tmp_path / "ours.st")
    assert list(ours[0].items()) == list(ref[0].items())
    assert ours[1] == ref[1] and ours[2] == ref[2] and ours[3] == ref[3]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ours.st", "ref.st"]  # no scratch or temporary left


def test_streaming_writer_leaves_nothing_on_failure(tmp_path):
    from mergequant.convert.mqfile import MqWriter
    with pytest.raises(RuntimeError):
        with MqWriter(tmp_path / "m.mq") as w:
            w.add("a", np.zeros(4, np.float32))
            raise RuntimeError("interrupted")
    assert list(tmp_path.iterdir()) == []


LAYER_SHAPE = dict(hidden_size=256, intermediate_size=512, num_attention_heads=4, num_key_value_heads=4)


def _layer_fp32_bytes(cfg):
    d, f = cfg["hidden_size"], cfg["intermediate_size"]
    return 4 * (4 * d * d + 3 * d * f + 2 * d)


def _convert_peak(src, out, **kw):
    """Peak bytes of numpy/Python allocations (tracemalloc) during one conversion."""
    import tracemalloc
    tracemalloc.start()
    try:
        tracemalloc.reset_peak()
        convert(src, out, progress=False, **kw)
        return tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()


@pytest.mark.parametrize("kw", [dict(), dict(scheme="w4a16g"), dict(method="rtn-w4a4-static")],
                         ids=["f16", "w4a16g", "rtn-w4a4-static"])
def test_conversion_holds_one_layer(tiny_hf_checkpoint, tmp_path, kw):
    """Conversion streams layer by layer (docs/architecture.md, "Memory of a conversion"): its peak allocation
    does not grow with the number of layers (6 layers against 2: within a tenth of one layer's fp32 weights, where keeping the packed
    layers would add 4 packed layers, and keeping the float ones 4 whole layers), and without calibration it stays
    below 2 x one layer's fp32 weights."""
    if "method" in kw:
        text = tmp_path / "calib.txt"
        text.write_text(" ".join(["the river city music year first game team war"] * 300))
        kw = kw | dict(calib=str(text), calib_n=2, calib_len=32,
                       tokenizer=str(tiny_hf_checkpoint(**LAYER_SHAPE).path / "tokenizer.json"))
    peaks = {}
    for layers in (2, 6):
        ck = tiny_hf_checkpoint(dtype="f16", tied=False, num_hidden_layers=layers, **LAYER_SHAPE)
        peaks[layers] = _convert_peak(ck.path, tmp_path / f"m{layers}.mq", **kw)
    layer = _layer_fp32_bytes(LAYER_SHAPE)
    assert peaks[6] - peaks[2] < 0.1 * layer, (peaks, layer)
    if "method" not in kw:
        assert peaks[6] < 2 * layer, (peaks, layer)
