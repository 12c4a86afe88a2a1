"""Checkpoint loaders: HF directories (f32/f16/bf16, sharded, tied/untied) and GGUF files return the same
tensors under Hugging Face names, q/k rows in rotate_half layout; unsupported inputs are refused by name."""
from __future__ import annotations

import json
import shutil

import numpy as np
import pytest
from conftest import llama_cpp_permute, write_tiny_hf
from safetensors.numpy import save_file

from mergequant.convert import LlamaConfig, UnsupportedModelError, load_checkpoint
from mergequant.convert.loaders import unpermute_rope_rows


@pytest.mark.parametrize("dtype", ["f32", "f16", "bf16"])
@pytest.mark.parametrize("sharded", [False, True])
@pytest.mark.parametrize("tied", [True, False])
def test_hf_returns_stored_values(tiny_hf_checkpoint, dtype, sharded, tied):
    tiny = tiny_hf_checkpoint(dtype=dtype, sharded=sharded, tied=tied)
    ck = load_checkpoint(tiny.path)
    assert ck.hf_dir == tiny.path and ck.gguf_reader is None
    assert ck.config.tie_word_embeddings is tied
    assert sorted(ck.names()) == sorted(tiny.tensors)
    for name, want in tiny.tensors.items():
        got = ck.get(name)
        assert got.dtype == np.float32 and got.shape == want.shape, name
        np.testing.assert_array_equal(got, want, err_msg=name)


def test_hf_config_fields(tiny_hf_checkpoint):
    c = load_checkpoint(tiny_hf_checkpoint().path).config
    assert (c.vocab_size, c.hidden_size, c.intermediate_size, c.num_hidden_layers) == (264, 64, 128, 2)
    assert (c.num_attention_heads, c.num_key_value_heads, c.head_dim) == (4, 2, 16)
    assert LlamaConfig.from_json(c.to_json()) == c


@pytest.mark.parametrize("tied", [True, False])
def test_gguf_matches_hf(tiny_hf_checkpoint, tiny_gguf, tied):
    tiny = tiny_hf_checkpoint(tied=tied)
    hf, gg = load_checkpoint(tiny.path), load_checkpoint(tiny_gguf("F32", tied=tied))
    assert gg.gguf_reader is not None and gg.hf_dir is None
    assert gg.config == hf.config
    assert sorted(gg.names()) == sorted(hf.names())
    for name in hf.names():
        np.testing.assert_array_equal(gg.get(name), hf.get(name), err_msg=name)


@pytest.mark.parametrize("qtype,tol", [("F16", 1e-3), ("Q8_0", 1e-2), ("Q4_0", 0.2), ("Q4_1", 0.2)])
def test_gguf_quantized_dequantizes_near_hf(tiny_hf_checkpoint, tiny_gguf, qtype, tol):
    hf, gg = load_checkpoint(tiny_hf_checkpoint().path), load_checkpoint(tiny_gguf(qtype))
    for name in hf.names():
        want, got = hf.get(name), gg.get(name)
        # Error relative to the row's range: a wrong row order would be off by O(1).
        err = np.abs(got - want).max(axis=-1) / np.abs(want).max(axis=-1)
        assert err.max() < tol, (name, float(err.max()))


def test_unpermute_inverts_llama_cpp_permutation():
    w = np.random.default_rng(1).standard_normal((6 * 8, 5)).astype(np.float32)
    for n_head in (1, 2, 3, 6):
        np.testing.assert_array_equal(unpermute_rope_rows(llama_cpp_permute(w, n_head), n_head), w)


def test_llama3_rope_scaling_accepted_under_either_key(tmp_path):
    params = {"factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
              "original_max_position_embeddings": 8192}
    for key in ("rope_type", "type"):
        tiny = write_tiny_hf(tmp_path / key, rope_scaling={key: "llama3", **params})
        assert load_checkpoint(tiny.path).config.rope_scaling == {"rope_type": "llama3", **params}


@pytest.mark.parametrize("overrides,needle", [
    ({"architectures": ["GPTNeoXForCausalLM"]}, "GPTNeoXForCausalLM"),
    ({"architectures": ["MistralForCausalLM"], "sliding_window": 64}, "sliding_window=64"),
    ({"rope_scaling": {"type": "linear", "factor": 2.0}}, "'linear'"),
    ({"rope_scaling": {"rope_type": "yarn", "factor": 2.0}}, "'yarn'"),
    ({"attention_bias": True}, "attention_bias"),
])
def test_hf_unsupported_model_refused(tmp_path, overrides, needle):
    tiny = write_tiny_hf(tmp_path / "m", **overrides)
    with pytest.raises(UnsupportedModelError, match=needle):
        load_checkpoint(tiny.path)


def test_mistral_without_window_accepted(tmp_path):
    tiny = write_tiny_hf(tmp_path / "m", architectures=["MistralForCausalLM"], sliding_window=None)
    assert load_checkpoint(tiny.path).config.architecture == "llama"


def test_hf_unsupported_dtype_refused_naming_tensor(tmp_path, tiny_hf_checkpoint):
    src = tiny_hf_checkpoint().path
    dst = tmp_path / "f64"
    shutil.copytree(src, dst)
    tensors = {n: w.astype(np.float64 if n.endswith("0.self_attn.q_proj.weight") else np.float32)
               for n, w in tiny_hf_checkpoint().tensors.items()}
    save_file(tensors, str(dst / "model.safetensors"))
    with pytest.raises(UnsupportedModelError, match=r"model\.layers\.0\.self_attn\.q_proj\.weight.*F64"):
        load_checkpoint(dst)


def test_hf_missing_tensor_named(tmp_path, tiny_hf_checkpoint):
    dst = tmp_path / "missing"
    shutil.copytree(tiny_hf_checkpoint().path, dst)
    tensors = {n: w for n, w in tiny_hf_checkpoint().tensors.items() if n != "model.layers.1.mlp.up_proj.weight"}
    save_file(tensors, str(dst / "model.safetensors"))
    with pytest.raises(ValueError, match=r"model\.layers\.1\.mlp\.up_proj\.weight.*missing"):
        load_checkpoint(dst)


def test_hf_wrong_shape_named(tmp_path, tiny_hf_checkpoint):
    dst = tmp_path / "shape"
    shutil.copytree(tiny_hf_checkpoint().path, dst)
    cfg = json.loads((dst / "config.json").read_text())
    (dst / "config.json").write_text(json.dumps(cfg | {"intermediate_size": 96}))
    with pytest.raises(ValueError, match=r"mlp\.gate_proj\.weight.*\(128, 64\), expected \(96, 64\)"):
        load_checkpoint(dst)


def test_gguf_other_architecture_refused(tmp_path):
    import gguf

    w = gguf.GGUFWriter(str(tmp_path / "q.gguf"), "qwen2")
    w.add_tensor("token_embd.weight", np.zeros((8, 4), np.float32))
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    with pytest.raises(UnsupportedModelError, match="'qwen2'"):
        load_checkpoint(tmp_path / "q.gguf")


def test_gguf_unsupported_tensor_type_refused(tiny_gguf):
    with pytest.raises(UnsupportedModelError, match=r"token_embd\.weight.*Q5_0"):
        load_checkpoint(tiny_gguf("Q5_0"))


def test_not_a_checkpoint(tmp_path):
    with pytest.raises(FileNotFoundError, match="config.json"):
        load_checkpoint(tmp_path)
