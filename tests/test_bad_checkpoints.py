"""Bad checkpoints given to the converter: each is a clear error naming the file/tensor and the problem,
raised before any output file is written; a failed write leaves no file under the output name."""
from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
from safetensors.numpy import save_file

from mergequant.convert import UnsupportedModelError
from mergequant.convert.convert import convert
from mergequant.convert.tokenizer import TokenizerExportError


def _copy(tiny_hf_checkpoint, dst: Path, sharded: bool = False) -> Path:
    shutil.copytree(tiny_hf_checkpoint(sharded=sharded).path, dst)
    return dst


def _truncated_shard(tiny_hf_checkpoint, d: Path) -> Path:
    src = _copy(tiny_hf_checkpoint, d / "truncated", sharded=True)
    shard = src / "model-00002-of-00002.safetensors"
    raw = shard.read_bytes()
    shard.write_bytes(raw[:len(raw) - 100])
    return src


def _missing(tiny_hf_checkpoint, d: Path) -> Path:
    src = _copy(tiny_hf_checkpoint, d / "missing")
    t = {n: w for n, w in tiny_hf_checkpoint().tensors.items() if n != "model.layers.0.mlp.down_proj.weight"}
    save_file(t, str(src / "model.safetensors"))
    return src


def _wrong_dtype(tiny_hf_checkpoint, d: Path) -> Path:
    src = _copy(tiny_hf_checkpoint, d / "dtype")
    t = {n: (w.astype(np.int32) if n == "model.norm.weight" else w) for n, w in tiny_hf_checkpoint().tensors.items()}
    save_file(t, str(src / "model.safetensors"))
    return src


def _wrong_shape(tiny_hf_checkpoint, d: Path) -> Path:
    src = _copy(tiny_hf_checkpoint, d / "shape")
    t = dict(tiny_hf_checkpoint().tensors)
    t["model.layers.1.self_attn.k_proj.weight"] = t["model.layers.1.self_attn.k_proj.weight"][:-1].copy()
    save_file(t, str(src / "model.safetensors"))
    return src


def _tokenizer_edit(tiny_hf_checkpoint, d: Path, name: str, fn) -> Path:
    src = _copy(tiny_hf_checkpoint, d / name)
    tj = json.loads((src / "tokenizer.json").read_text(encoding="utf-8"))
    fn(tj)
    (src / "tokenizer.json").write_text(json.dumps(tj), encoding="utf-8")
    return src


def _gguf_arch(tiny_hf_checkpoint, d: Path) -> Path:
    import gguf

    w = gguf.GGUFWriter(str(d / "q.gguf"), "qwen2")
    w.add_tensor("token_embd.weight", np.zeros((8, 4), np.float32))
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return d / "q.gguf"


CASES = {
    "truncated shard": (_truncated_shard, ValueError, r"model-00002-of-00002\.safetensors.*run past the end.*truncated"),
    "missing tensor": (_missing, ValueError, r"model\.layers\.0\.mlp\.down_proj\.weight.*missing"),
    "wrong dtype": (_wrong_dtype, UnsupportedModelError, r"model\.norm\.weight.*I32"),
    "wrong shape": (_wrong_shape, ValueError, r"model\.layers\.1\.self_attn\.k_proj\.weight.*expected \(32, 64\)"),
    "unsupported tokenizer model": (
        lambda ck, d: _tokenizer_edit(ck, d, "wordpiece", lambda tj: tj.update(model={
            "type": "WordPiece", "unk_token": "<|endoftext|>", "continuing_subword_prefix": "##",
            "max_input_chars_per_word": 100, "vocab": tj["model"]["vocab"]})),
        TokenizerExportError, r"tokenizer\.json: tokenizer model 'WordPiece' is not supported"),
    "unsupported pre-tokenizer": (
        lambda ck, d: _tokenizer_edit(ck, d, "pre", lambda tj: tj.update(pre_tokenizer={
            "type": "Sequence", "pretokenizers": [{"type": "Whitespace"}, tj["pre_tokenizer"]]})),
        TokenizerExportError, r"unsupported pre_tokenizer.*Whitespace"),
    "GGUF unknown architecture": (_gguf_arch, UnsupportedModelError, r"'qwen2'"),
}


@pytest.mark.parametrize("case", list(CASES))
def test_bad_checkpoint_refused_before_output(case, tiny_hf_checkpoint, tmp_path):
    make, exc, match = CASES[case]
    src = make(tiny_hf_checkpoint, tmp_path)
    out_dir = tmp_path / "out"
    out_dir.mkdir()
    with pytest.raises(exc, match=match):
        convert(src, out_dir / "model.mq", progress=False)
    assert list(out_dir.iterdir()) == []  # no output, no temporary left


def test_gguf_unknown_tensor_type_refused_before_output(tiny_gguf, tmp_path):
    with pytest.raises(UnsupportedModelError, match=r"token_embd\.weight.*Q5_0"):
        convert(tiny_gguf("Q5_0"), tmp_path / "model.mq", progress=False)
    assert list(tmp_path.iterdir()) == []


def test_failed_write_leaves_no_file(tiny_hf_checkpoint, tmp_path, monkeypatch):
    """A write that fails half-way (here: the disk 'fills' after the first bytes of the final copy, or while the
    layers stream to the scratch file) leaves neither the output nor its temporary nor the scratch file; a
    successful one leaves exactly the output."""
    import os

    from mergequant.convert import mqfile

    real_copy, real_add = mqfile._copy_range, mqfile.MqWriter.add

    def failing_copy(src, src_off, dst, dst_off, count):
        os.pwrite(dst, b"partial", dst_off)
        raise OSError(28, "No space left on device")

    def failing_add(self, name, array):
        if name.startswith("blk.1."):
            raise OSError(28, "No space left on device")
        real_add(self, name, array)

    for target, attr, fake in ((mqfile, "_copy_range", failing_copy), (mqfile.MqWriter, "add", failing_add)):
        monkeypatch.setattr(target, attr, fake)
        with pytest.raises(OSError, match="No space left"):
            convert(tiny_hf_checkpoint().path, tmp_path / "model.mq", progress=False)
        assert list(tmp_path.iterdir()) == []
        monkeypatch.undo()
    assert mqfile._copy_range is real_copy and mqfile.MqWriter.add is real_add
    convert(tiny_hf_checkpoint().path, tmp_path / "model.mq", progress=False)
    assert [p.name for p in tmp_path.iterdir()] == ["model.mq"]
