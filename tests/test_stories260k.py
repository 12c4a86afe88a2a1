"""End to end with a trained SentencePiece model: llama2.c's stories260K (legacy .bin + tok512.model)
turned into a Hugging Face checkpoint, converted, and generated greedily by the engine. The expected text
is llama2.c's published greedy sample; the expected tokens come from an independent numpy port of
llama2.c's forward pass (interleaved rotary pairs, weights read straight from the .bin)."""
from __future__ import annotations

import json
import struct
from pathlib import Path

import numpy as np
import pytest
from safetensors.numpy import save_file

from mergequant import LLM
from mergequant.convert.convert import convert

PUBLISHED = ("Once upon a time, there was a little girl named Lily. She loved to play outside in the park. "
             "One day, she saw a big, red ball. She wanted to play with it, but it was too high.")


def read_llama2c(path: Path) -> tuple[dict, dict[str, np.ndarray]]:
    raw = path.read_bytes()
    dim, hidden, n_layers, n_heads, n_kv, vocab, seq = struct.unpack("<7i", raw[:28])
    shared = vocab > 0
    vocab = abs(vocab)
    hd = dim // n_heads
    w = np.frombuffer(raw, dtype="<f4", offset=28)
    cfg = dict(dim=dim, hidden=hidden, n_layers=n_layers, n_heads=n_heads, n_kv=n_kv, vocab=vocab, seq=seq,
               shared=shared, hd=hd)
    shapes = [("tok", (vocab, dim)), ("rms_att", (n_layers, dim)), ("wq", (n_layers, n_heads * hd, dim)),
              ("wk", (n_layers, n_kv * hd, dim)), ("wv", (n_layers, n_kv * hd, dim)),
              ("wo", (n_layers, dim, n_heads * hd)), ("rms_ffn", (n_layers, dim)), ("w1", (n_layers, hidden, dim)),
              ("w2", (n_layers, dim, hidden)), ("w3", (n_layers, hidden, dim)), ("rms_final", (dim,)),
              ("freq_real", (seq, hd // 2)), ("freq_imag", (seq, hd // 2))]
    out, off = {}, 0
    for name, shape in shapes:
        n = int(np.prod(shape))
        out[name] = w[off:off + n].reshape(shape).astype(np.float32)
        off += n
    if not shared:
        out["wcls"] = w[off:off + vocab * dim].reshape(vocab, dim)
    return cfg, out


def llama2c_greedy(cfg: dict, w: dict[str, np.ndarray], prompt: list[int], steps: int) -> list[int]:
    """llama2.c's run.c forward in numpy: rotary on adjacent pairs (2i, 2i+1), tied classifier."""
    dim, hd, nh, nkv = cfg["dim"], cfg["hd"], cfg["n_heads"], cfg["n_kv"]

    def rms(x, g):
        return x / np.sqrt(np.mean(x * x) + 1e-5) * g

    kc = np.zeros((cfg["n_layers"], cfg["seq"], nkv * hd), np.float32)
    vc = np.zeros_like(kc)
    tokens, out = list(prompt), []
    for pos in range(cfg["seq"]):
        tok = tokens[pos]
        x = w["tok"][tok].copy()
        for l in range(cfg["n_layers"]):
            xb = rms(x, w["rms_att"][l])
            q, k, v = w["wq"][l] @ xb, w["wk"][l] @ xb, w["wv"][l] @ xb
            i = np.arange(0, nh * hd, 2)
            freq = 1.0 / 10000.0 ** ((i % hd) / hd)
            ang = pos * freq
            c, s = np.cos(ang), np.sin(ang)
            for vec, n in ((q, nh * hd), (k, nkv * hd)):
                m = i < n
                a, b = vec[i[m]].copy(), vec[i[m] + 1].copy()
                vec[i[m]] = a * c[m] - b * s[m]
                vec[i[m] + 1] = a * s[m] + b * c[m]
            kc[l, pos], vc[l, pos] = k, v
            att = np.zeros(nh * hd, np.float32)
            for h in range(nh):
                kh = h // (nh // nkv)
                sc = kc[l, :pos + 1, kh * hd:(kh + 1) * hd] @ q[h * hd:(h + 1) * hd] / np.sqrt(hd)
                p = np.exp(sc - sc.max())
                p /= p.sum()
                att[h * hd:(h + 1) * hd] = p @ vc[l, :pos + 1, kh * hd:(kh + 1) * hd]
            x = x + w["wo"][l] @ att
            xb = rms(x, w["rms_ffn"][l])
            h1, h3 = w["w1"][l] @ xb, w["w3"][l] @ xb
            x = x + w["w2"][l] @ (h1 / (1 + np.exp(-h1)) * h3)
        logits = w["tok"] @ rms(x, w["rms_final"])
        if pos + 1 < len(tokens):
            continue
        nxt = int(np.argmax(logits))
        if nxt == 1 or len(out) == steps:  # llama2.c stops at BOS
            break
        out.append(nxt)
        tokens.append(nxt)
    return out


def to_hf_rows(w: np.ndarray, n_heads: int) -> np.ndarray:
    """Interleaved rotary pairs (2i, 2i+1) of each head → Hugging Face's rotate_half order (i, i + hd/2)."""
    n, k = w.shape
    hd = n // n_heads
    return w.reshape(n_heads, hd // 2, 2, k).transpose(0, 2, 1, 3).reshape(n, k)


def write_hf(cfg: dict, w: dict[str, np.ndarray], tok_model: Path, out: Path) -> Path:
    out.mkdir(parents=True, exist_ok=True)
    t = {"model.embed_tokens.weight": w["tok"], "model.norm.weight": w["rms_final"]}
    for l in range(cfg["n_layers"]):
        p = f"model.layers.{l}."
        t[p + "input_layernorm.weight"] = w["rms_att"][l]
        t[p + "post_attention_layernorm.weight"] = w["rms_ffn"][l]
        t[p + "self_attn.q_proj.weight"] = to_hf_rows(w["wq"][l], cfg["n_heads"])
        t[p + "self_attn.k_proj.weight"] = to_hf_rows(w["wk"][l], cfg["n_kv"])
        t[p + "self_attn.v_proj.weight"] = w["wv"][l]
        t[p + "self_attn.o_proj.weight"] = w["wo"][l]
        t[p + "mlp.gate_proj.weight"] = w["w1"][l]
        t[p + "mlp.down_proj.weight"] = w["w2"][l]
        t[p + "mlp.up_proj.weight"] = w["w3"][l]
    save_file({k: np.ascontiguousarray(v, dtype=np.float32) for k, v in t.items()}, str(out / "model.safetensors"))
    (out / "config.json").write_text(json.dumps({
        "architectures": ["LlamaForCausalLM"], "model_type": "llama", "hidden_act": "silu",
        "vocab_size": cfg["vocab"], "hidden_size": cfg["dim"], "intermediate_size": cfg["hidden"],
        "num_hidden_layers": cfg["n_layers"], "num_attention_heads": cfg["n_heads"],
        "num_key_value_heads": cfg["n_kv"], "max_position_embeddings": cfg["seq"], "rms_norm_eps": 1e-5,
        "rope_theta": 10000.0, "tie_word_embeddings": cfg["shared"], "bos_token_id": 1, "eos_token_id": 2}))
    (out / "tokenizer.model").write_bytes(tok_model.read_bytes())
    (out / "tokenizer_config.json").write_text(json.dumps(
        {"bos_token": "<s>", "eos_token": "</s>", "unk_token": "<unk>", "add_bos_token": True,
         "add_eos_token": False}))
    return out


@pytest.fixture(scope="module")
def stories(shared_data, tmp_path_factory):
    d = shared_data / "tokenizers" / "stories260K"
    cfg, w = read_llama2c(d / "stories260K.bin")
    hf = write_hf(cfg, w, d / "tok512.model", tmp_path_factory.mktemp("stories") / "hf")
    mq = convert(hf, hf.parent / "stories260K.mq", progress=False)
    return cfg, w, mq


def test_greedy_reproduces_llama2c_sample(stories):
    cfg, w, mq = stories
    llm = LLM(mq, device="cpu")
    prompt = llm.tokenize("Once upon a time")
    assert prompt[0] == 1  # BOS, as llama2.c's encode adds it
    expected_ids = llama2c_greedy(cfg, w, prompt, 64)
    text = llm.generate(prompt, max_tokens=64, temperature=0.0)
    assert llm._session.output_tokens == expected_ids[:len(llm._session.output_tokens)]
    assert len(llm._session.output_tokens) == 64 or len(expected_ids) == len(llm._session.output_tokens)
    full = "Once upon a time" + text
    assert full.startswith(PUBLISHED), full
