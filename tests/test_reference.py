"""The numpy reference forward against an independent naive implementation (float64, explicit loops over
positions and heads, no KV cache), its cache against full recomputation, perplexity against its
definition, the .mq-backed reference against the checkpoint, and SmolLM2 end to end."""
from __future__ import annotations

import math

import numpy as np
import pytest

from mergequant.convert import ReferenceModel, convert, load_checkpoint, reference_from_mq
from mergequant.convert.reference import block_forward, layer_tensors

LLAMA3 = {"rope_type": "llama3", "factor": 4.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
          "original_max_position_embeddings": 128}


def naive_inv_freq(c) -> np.ndarray:
    """transformers' _compute_default_rope_parameters / _compute_llama3_parameters, element by element."""
    inv = [1.0 / c.rope_theta ** (2 * j / c.head_dim) for j in range(c.head_dim // 2)]
    s = c.rope_scaling
    if s is None:
        return np.array(inv)
    low_wavelen = s["original_max_position_embeddings"] / s["low_freq_factor"]
    high_wavelen = s["original_max_position_embeddings"] / s["high_freq_factor"]
    out = []
    for f in inv:
        wavelen = 2 * math.pi / f
        if wavelen < high_wavelen:
            out.append(f)
        elif wavelen > low_wavelen:
            out.append(f / s["factor"])
        else:
            smooth = (s["original_max_position_embeddings"] / wavelen - s["low_freq_factor"]) / \
                (s["high_freq_factor"] - s["low_freq_factor"])
            out.append((1 - smooth) * f / s["factor"] + smooth * f)
    return np.array(out)


def naive_logits(c, t: dict[str, np.ndarray], ids: list[int]) -> np.ndarray:
    w = {k: v.astype(np.float64) for k, v in t.items()}
    hd, half, group = c.head_dim, c.head_dim // 2, c.num_attention_heads // c.num_key_value_heads
    inv = naive_inv_freq(c)

    def norm(x, g):
        return np.stack([r / math.sqrt(np.mean(r * r) + c.rms_norm_eps) * g for r in x])

    def rotate(vec, pos):  # HF rotate_half: dimension j pairs with j + hd/2
        out = np.empty(hd)
        for j in range(half):
            cs, sn = math.cos(pos * inv[j]), math.sin(pos * inv[j])
            out[j] = vec[j] * cs - vec[j + half] * sn
            out[j + half] = vec[j + half] * cs + vec[j] * sn
        return out

    x = w["model.embed_tokens.weight"][ids]
    n = len(ids)
    for i in range(c.num_hidden_layers):
        L = {k: w[f"model.layers.{i}.{k}.weight"] for k in
             ("input_layernorm", "self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.o_proj",
              "post_attention_layernorm", "mlp.gate_proj", "mlp.up_proj", "mlp.down_proj")}
        a = norm(x, L["input_layernorm"])
        q, k, v = a @ L["self_attn.q_proj"].T, a @ L["self_attn.k_proj"].T, a @ L["self_attn.v_proj"].T
        o = np.zeros((n, c.num_attention_heads * hd))
        for h in range(c.num_attention_heads):
            kv = h // group
            for p in range(n):
                qh = rotate(q[p, h * hd:(h + 1) * hd], p)
                scores = [qh @ rotate(k[s, kv * hd:(kv + 1) * hd], s) / math.sqrt(hd) for s in range(p + 1)]
                e = np.exp(np.array(scores) - max(scores))
                probs = e / e.sum()
                o[p, h * hd:(h + 1) * hd] = sum(probs[s] * v[s, kv * hd:(kv + 1) * hd] for s in range(p + 1))
        x = x + o @ L["self_attn.o_proj"].T
        m = norm(x, L["post_attention_layernorm"])
        g, u = m @ L["mlp.gate_proj"].T, m @ L["mlp.up_proj"].T
        x = x + (g / (1 + np.exp(-g)) * u) @ L["mlp.down_proj"].T
    head = w["model.embed_tokens.weight"] if c.tie_word_embeddings else w["lm_head.weight"]
    return norm(x, w["model.norm.weight"]) @ head.T


IDS = [5, 77, 200, 3, 3, 150, 263, 9, 42, 100, 18]


@pytest.mark.parametrize("tied", [True, False])
@pytest.mark.parametrize("rope_scaling", [None, LLAMA3])
def test_forward_matches_naive(tiny_hf_checkpoint, tied, rope_scaling):
    tiny = tiny_hf_checkpoint(tied=tied, rope_scaling=rope_scaling)
    ck = load_checkpoint(tiny.path)
    got = ReferenceModel(ck.config, ck.tensors).forward(IDS)
    want = naive_logits(ck.config, tiny.tensors, IDS)
    assert got.dtype == np.float32 and got.shape == (len(IDS), ck.config.vocab_size)
    np.testing.assert_allclose(got, want, rtol=0, atol=2e-4 * np.abs(want).max())


def test_cache_chunks_equal_full_forward(tiny_hf_checkpoint):
    ck = load_checkpoint(tiny_hf_checkpoint().path)
    m = ReferenceModel(ck.config, ck.tensors)
    full = m.forward(IDS, start_pos=0)
    m.reset()
    chunks = [m.forward(IDS[:4]), m.forward(IDS[4:7])] + [m.forward([t]) for t in IDS[7:]]
    np.testing.assert_allclose(np.concatenate(chunks), full, rtol=1e-5, atol=1e-5)
    # Rewinding to position 4 and replaying gives the same logits again.
    np.testing.assert_allclose(m.forward(IDS[4:], start_pos=4), full[4:], rtol=1e-5, atol=1e-5)
    with pytest.raises(ValueError, match="start_pos=20"):
        m.forward([1], start_pos=20)


def test_greedy_matches_full_recompute_argmax(tiny_hf_checkpoint):
    ck = load_checkpoint(tiny_hf_checkpoint(tied=False).path)
    m = ReferenceModel(ck.config, ck.tensors)
    got = m.greedy(IDS[:3], 8)
    seq = list(IDS[:3])
    for _ in range(8):
        m.reset()
        seq.append(int(np.argmax(m.forward(seq)[-1])))
    assert got == seq[3:]


def test_perplexity_definition(tiny_hf_checkpoint):
    tiny = tiny_hf_checkpoint()
    ck = load_checkpoint(tiny.path)
    window = 5
    ppl, nll, count = ReferenceModel(ck.config, ck.tensors).perplexity(IDS, window)
    want_nll = 0.0
    for start in (0, 5):  # 11 tokens: two windows, the last token dropped
        chunk = IDS[start:start + window]
        logits = naive_logits(ck.config, tiny.tensors, chunk)
        for p in range(window - 1):
            row = logits[p]
            want_nll += math.log(np.exp(row - row.max()).sum()) + row.max() - row[chunk[p + 1]]
    assert count == 8
    assert nll == pytest.approx(want_nll, rel=1e-4)
    assert ppl == pytest.approx(math.exp(want_nll / 8), rel=1e-4)


def test_block_forward_capture_and_cacheless(tiny_hf_checkpoint):
    ck = load_checkpoint(tiny_hf_checkpoint().path)
    c = ck.config
    x = np.random.default_rng(0).standard_normal((6, c.hidden_size)).astype(np.float32)
    layer = layer_tensors(ck.tensors, 1)
    capture: dict[str, np.ndarray] = {}
    y = block_forward(x, layer, c, capture=capture)
    assert {k: v.shape for k, v in capture.items()} == {
        "attn_qkv": (6, c.hidden_size), "attn_output": (6, c.num_attention_heads * c.head_dim),
        "ffn_gate_up": (6, c.hidden_size), "ffn_down": (6, c.intermediate_size)}
    # The last linear's input reproduces the block's output: y = x + attn + down(h).
    attn = capture["attn_output"] @ layer["self_attn.o_proj"].T
    np.testing.assert_allclose(y, x + attn + capture["ffn_down"] @ layer["mlp.down_proj"].T, atol=1e-5)


def test_reference_from_f16_mq(tiny_hf_checkpoint, tmp_path):
    tiny = tiny_hf_checkpoint(tied=False)
    ref = reference_from_mq(convert(tiny.path, tmp_path / "t.mq", progress=False))
    # Norms stay f32 in the file; everything else is rounded to f16.
    rounded = {n: w if w.ndim == 1 else w.astype(np.float16).astype(np.float32) for n, w in tiny.tensors.items()}
    want = ReferenceModel(ref.config, rounded, f16_inputs=True).forward(IDS)
    np.testing.assert_array_equal(ref.forward(IDS), want)


def test_smollm2_greedy_answers_paris(smollm2_gguf_path, smollm2_f16_mq):
    ck = load_checkpoint(smollm2_gguf_path)
    tokens = ck.gguf_reader.fields["tokenizer.ggml.tokens"].contents()
    index = {t: i for i, t in enumerate(tokens)}
    prompt = [index[t] for t in ("The", "Ġcapital", "Ġof", "ĠFrance", "Ġis")]
    out = reference_from_mq(smollm2_f16_mq).greedy(prompt, 2)
    assert tokens[out[0]] == "ĠParis"
