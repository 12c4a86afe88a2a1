"""The simulated engine: executes a quantized model in numpy with exactly the integer semantics of
docs/numerics.md. It reads the packed tensors of a .mq file (or the dict a method produced), so it is
the oracle for the C++ backends and the fast path for accuracy experiments. Each linear runs its scheme's
path (schemes.py → quant/simulate_linear.py); this module runs the blocks around them."""
from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any, NamedTuple

import numpy as np

from ..config import LlamaConfig
from ..mqfile import read_mq
from ..reference import rope, rope_cos_sin
from ..schemes import get_scheme
from .blas import parallel_for
from .int4 import pad_columns, round_codes
from .simulate_linear import SimLinear, expand_slots, fp16_round

LINEARS = ("attn_qkv", "attn_output", "ffn_gate_up", "ffn_down")
KV_CACHE_TYPES = ("fp16", "int8")
KV_QMAX = 127  # int8 cache codes are symmetric: [-127, 127]

# kv_observer(layer, k, v): k after RoPE and v [T, Hkv, hd], fp32, as they go to the cache (before its rounding)
KVObserver = Callable[[int, np.ndarray, np.ndarray], None]


def rms_factor(h: np.ndarray, eps: float) -> np.ndarray:
    """r = 1 / sqrt(Σ h² / D + eps) per row in float64, rounded once to fp32, shape [..., 1]."""
    hd = h.astype(np.float64)
    ss = np.einsum("...i,...i->...", hd, hd)[..., None]
    return (1.0 / np.sqrt(ss / h.shape[-1] + np.float64(np.float32(eps)))).astype(np.float32)


def swiglu(g: np.ndarray, u: np.ndarray) -> np.ndarray:
    """silu(g) · u = (g / (1 + exp(-g))) · u in float64, rounded once to fp32."""
    out = np.empty(np.broadcast_shapes(g.shape, u.shape), np.float32)
    rows = 1024  # elementwise: row blocks in threads give the same values

    def block(i: int) -> None:
        r = slice(i * rows, (i + 1) * rows)
        g64 = g[r].astype(np.float64)
        with np.errstate(over="ignore"):
            out[r] = g64 / (1.0 + np.exp(-g64)) * u[r]

    if g.ndim == 2 and g.shape == u.shape:
        parallel_for(block, -(-len(g) // rows))
        return out
    g64 = g.astype(np.float64)
    with np.errstate(over="ignore"):
        return (g64 / (1.0 + np.exp(-g64)) * u).astype(np.float32)


@dataclass
class SimBlock:
    attn_norm: np.ndarray
    ffn_norm: np.ndarray
    qkv: SimLinear
    o: SimLinear
    gate_up: SimLinear
    down: SimLinear

    @property
    def static(self) -> bool:
        """Int4-code inputs: the norms, attention and SwiGLU emit the codes the linears read."""
        return self.qkv.inputs == "codes"

    @property
    def down_codes(self) -> bool:
        """ffn_down reads SwiGLU's int4 codes too; False in a static block whose ffn_down takes the fp32 SwiGLU
        output and quantizes it itself (the mixed-precision policy: ffn_down in w4a8, docs/numerics.md)."""
        return self.down.inputs == "codes"


@dataclass(frozen=True)
class KVInt8:
    """One layer's int8 KV cache (docs/numerics.md, "int8 KV cache"): the per-channel steps s [Hkv·hd] of k
    (after RoPE) and of v, fp32. A value x of channel c is stored as clamp(rint(x · fp32(1/s_c)), -127, 127)
    and read back as float(code) · s_c."""
    k_scale: np.ndarray
    v_scale: np.ndarray

    @staticmethod
    def codes(x: np.ndarray, scale: np.ndarray) -> np.ndarray:
        """x [T, Hkv, hd] fp32 → the stored codes clamp(rint(x · inv), -127, 127) (fp32 holding integers),
        inv = fp32(1 / s) (IEEE division), one fp32 multiply."""
        return round_codes(x * (np.float32(1) / scale.reshape(x.shape[1:])), -KV_QMAX, KV_QMAX)

    @classmethod
    def roundtrip(cls, x: np.ndarray, scale: np.ndarray) -> np.ndarray:
        """x [T, Hkv, hd] fp32 → what the cache gives back: float(code) · s (fp32 multiply)."""
        return cls.codes(x, scale) * scale.reshape(x.shape[1:])

    def keys(self, k: np.ndarray) -> np.ndarray:
        return self.roundtrip(k, self.k_scale)

    def values(self, v: np.ndarray) -> np.ndarray:
        return self.roundtrip(v, self.v_scale)


def causal_attention(q: np.ndarray, k: np.ndarray, v: np.ndarray, block: int = 256) -> np.ndarray:
    """q [T, H, hd], k/v [T, Hkv, hd] at positions 0..T-1 → [T, H·hd]: with qc = fp32(q · fp32(1/sqrt(hd))),
    s = qc · k, p = exp(s - max s) over keys ≤ the query position, o = fp32((p · v) / Σ p), all in float64
    (rounded once, so summation order does not reach the fp32 result). Per kv head, its query heads
    stacked, in query blocks that read only the keys up to the block's end (the causal half is skipped).
    The products run as 2-D GEMMs (the G heads' rows stacked): numpy's stacked matmul computes the same
    sums several times slower."""
    t, h, hd = q.shape
    g = h // k.shape[1]
    out = np.empty((h, t, hd), np.float32)
    qh = (np.ascontiguousarray(q.transpose(1, 0, 2)) * np.float32(1 / np.sqrt(hd))).astype(np.float64)
    kh = np.ascontiguousarray(k.transpose(1, 0, 2), np.float64)
    vh = np.ascontiguousarray(v.transpose(1, 0, 2), np.float64)
    for i0 in range(0, t, block):
        i1 = min(i0 + block, t)
        rows = i1 - i0
        mask = np.triu(np.full((rows, i1), -np.inf), i0 + 1)
        for j in range(k.shape[1]):
            qb = qh[j * g:(j + 1) * g, i0:i1].reshape(g * rows, hd)
            s = (qb @ kh[j, :i1].T).reshape(g, rows, i1)      # [G, block, i1]
            s += mask
            s -= s.max(axis=-1, keepdims=True)
            np.exp(s, out=s)
            pv = (s.reshape(g * rows, i1) @ vh[j, :i1]).reshape(g, rows, hd)
            out[j * g:(j + 1) * g, i0:i1] = pv / s.sum(axis=-1, keepdims=True)
    return out.transpose(1, 0, 2).reshape(t, h * hd)


def attend(q: np.ndarray, k: np.ndarray, v: np.ndarray, config: LlamaConfig,
           cos: np.ndarray, sin: np.ndarray, kv: KVInt8 | None = None,
           observe: Callable[[np.ndarray, np.ndarray], None] | None = None) -> np.ndarray:
    """q [B, T, H·hd], k/v [B, T, Hkv·hd] (pre-RoPE) → attention output [B, T, H·hd] in fp32, with RoPE,
    the fp16 rounding of q and the K/V cache's rounding: fp16, or int8 with the steps of `kv`. `observe`,
    when given, gets each sequence's fp32 k after RoPE and v [T, Hkv, hd] before the cache's rounding."""
    b, t, _ = q.shape
    h, hkv, hd = config.num_attention_heads, config.num_key_value_heads, config.head_dim
    out = np.empty((b, t, h * hd), np.float32)

    def sequence(i: int) -> None:
        qi = fp16_round(rope(q[i].reshape(t, h, hd), cos, sin))
        ki = rope(k[i].reshape(t, hkv, hd), cos, sin)
        vi = v[i].reshape(t, hkv, hd)
        if observe is not None:
            observe(ki, vi)
        if kv is None:
            ki, vi = fp16_round(ki), fp16_round(vi)
        else:
            ki, vi = kv.keys(ki), kv.values(vi)
        out[i] = causal_attention(qi, ki, vi)

    # the sequences are independent: in threads (the observer, when given, sees them in order)
    parallel_for(sequence, b, threads=1 if observe is not None else None)
    return out


def split_qkv(y: np.ndarray, config: LlamaConfig) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    nq = config.num_attention_heads * config.head_dim
    nkv = config.num_key_value_heads * config.head_dim
    return y[..., :nq], y[..., nq:nq + nkv], y[..., nq + nkv:]


def block_forward(h: np.ndarray, blk: SimBlock, config: LlamaConfig, cos: np.ndarray, sin: np.ndarray,
                  record: dict[str, np.ndarray] | None = None, prefix: str = "", kv: KVInt8 | None = None,
                  observe: Callable[[np.ndarray, np.ndarray], None] | None = None) -> np.ndarray:
    """One block on the residual stream h [B, T, D] (B independent sequences at positions 0..T-1); the
    K/V cache is fp16, or int8 with the steps of `kv`; `observe` as in `attend`."""
    b, t, d = h.shape
    eps = config.rms_norm_eps
    flat = lambda x: x.reshape(b * t, -1)  # noqa: E731
    if blk.static:
        z = flat(h * rms_factor(h, eps) * blk.qkv.in_scale)
        y = blk.qkv(expand_slots(z, blk.qkv.in_map), record, prefix + "attn_qkv")
    else:
        y = blk.qkv(flat(h * rms_factor(h, eps) * blk.attn_norm), record, prefix + "attn_qkv")
    q, k, v = split_qkv(y.reshape(b, t, -1), config)
    o = flat(attend(q, k, v, config, cos, sin, kv, observe))
    if blk.static:
        out = blk.o(pad_columns(round_codes(o), blk.o.kp), record, prefix + "attn_output")
    else:
        out = blk.o(o, record, prefix + "attn_output")
    h = h + out.reshape(b, t, d)
    if blk.static:
        z = flat(h * rms_factor(h, eps) * blk.gate_up.in_scale)
        y = blk.gate_up(expand_slots(z, blk.gate_up.in_map), record, prefix + "ffn_gate_up")
    else:
        y = blk.gate_up(flat(h * rms_factor(h, eps) * blk.ffn_norm), record, prefix + "ffn_gate_up")
    f = config.intermediate_size
    m = swiglu(y[:, :f], y[:, f:])
    if blk.static and blk.down_codes:
        out = blk.down(expand_slots(m, blk.down.in_map), record, prefix + "ffn_down")
    else:
        out = blk.down(m, record, prefix + "ffn_down")
    return h + out.reshape(b, t, d)


def load_block(config: LlamaConfig, get: Callable[[str], np.ndarray | None], linears: Mapping[str, str],
               i: int) -> SimBlock:
    p = f"blk.{i}."
    lin: dict[str, SimLinear] = {n: get_scheme(linears[p + n]).simulate(lambda s, n=n: get(f"{p}{n}.{s}"))
                                 for n in LINEARS}
    # int4-code inputs cover all four linears, or the first three with a float-input ffn_down (mixed precision)
    first3 = {lin[n].inputs for n in LINEARS if n != "ffn_down"}
    if len(first3) > 1 or (first3 == {"float"} and lin["ffn_down"].inputs == "codes"):
        raise ValueError(f"block {i}: a scheme with int4-code inputs must cover attn_qkv, attn_output and "
                         f"ffn_gate_up (and ffn_down, unless it takes float inputs), got "
                         f"{[lin[n].scheme for n in LINEARS]}")
    f32 = lambda s: np.asarray(get(p + s), np.float32)  # noqa: E731
    return SimBlock(f32("attn_norm.weight"), f32("ffn_norm.weight"), lin["attn_qkv"], lin["attn_output"],
                    lin["ffn_gate_up"], lin["ffn_down"])


def kv_scale_names(i: int) -> tuple[str, str]:
    """The file tensors of layer i's int8 KV cache steps (docs/format.md)."""
    return f"blk.{i}.attn_k_scale", f"blk.{i}.attn_v_scale"


def load_kv_int8(config: LlamaConfig, get: Callable[[str], np.ndarray | None], i: int) -> KVInt8:
    names = kv_scale_names(i)
    missing = [n for n in names if get(n) is None]
    if missing:
        raise ValueError(f"simulator: kv_cache='int8' needs the KV-cache scales {missing[0]!r} (and the other "
                         f"layers'): convert the model with --kv-int8")
    want = (config.num_key_value_heads * config.head_dim,)
    steps = [np.asarray(get(n), np.float32) for n in names]
    for n, s in zip(names, steps):
        if s.shape != want or not np.all(np.isfinite(s) & (s > 0)):
            raise ValueError(f"simulator: {n} must be {list(want)} finite steps > 0, got shape {list(s.shape)}")
    return KVInt8(*steps)


def load_output(config: LlamaConfig, get: Callable[[str], np.ndarray | None], linears: Mapping[str, str]
                ) -> tuple[SimLinear, Callable[[np.ndarray], np.ndarray]]:
    """The output linear and the embedding (docs/numerics.md, "Embedding"): the output in the scheme of
    linears["output"] (absent: f16: `output.weight`, or `token_embd.weight` when tied); the embedding returns
    fp32 rows [..., D] for ids [...]: fp16 `token_embd.weight` widened, or, tied with a quantized output, the
    output matrix's rows dequantized by its scheme (SimLinear.embed_rows)."""
    scheme = linears.get("output", "f16")
    tied = config.tie_word_embeddings
    if scheme == "f16":
        table = np.asarray(get("token_embd.weight"), np.float16)
        head_w = table if tied else get("output.weight")
        head = get_scheme("f16").simulate(lambda s: head_w if s == "weight" else None)
        return head, lambda ids: table[ids].astype(np.float32)
    s = get_scheme(scheme)
    if s.inputs != "float":
        raise ValueError(f"simulator: linear 'output' uses scheme {scheme!r}, which takes int4 codes; the output "
                         f"linear reads the final norm's fp32 output")
    head = s.simulate(lambda suffix: get(f"output.{suffix}"))
    if not tied:
        table = np.asarray(get("token_embd.weight"), np.float16)
        return head, lambda ids: table[ids].astype(np.float32)
    if head.embed_rows is None or head.bias is not None:
        raise ValueError(f"simulator: a tied model's embedding reads the rows of the output matrix, which scheme "
                         f"{scheme!r}{' with a bias' if head.bias is not None else ''} cannot give")
    if get("token_embd.weight") is not None:
        raise ValueError(f"simulator: tied model with the output in {scheme!r}: 'token_embd.weight' must be absent")
    return head, lambda ids: head.embed_rows(head, np.asarray(ids))


class SimModel:
    """A quantized model in simulation. `tensors` maps .mq names to arrays; `quant` is the file's quant
    recipe (its `linears` gives each linear's scheme). `kv_cache` is the K/V cache's type: "fp16", or "int8"
    with the file's per-channel steps (`blk.{i}.attn_k_scale`, `attn_v_scale`)."""

    def __init__(self, config: LlamaConfig, tensors: Mapping[str, np.ndarray], quant: Mapping[str, Any],
                 kv_cache: str = "fp16") -> None:
        if kv_cache not in KV_CACHE_TYPES:
            raise ValueError(f"simulator: invalid kv_cache {kv_cache!r}: expected one of {', '.join(KV_CACHE_TYPES)}")
        self.config = config
        self.quant = dict(quant)
        self.kv_cache = kv_cache
        get = lambda name: tensors[name] if name in tensors else None  # noqa: E731
        self.head, self.embed = load_output(config, get, quant.get("linears", {}))
        self.norm = np.asarray(tensors["output_norm.weight"], np.float32)
        layers = range(config.num_hidden_layers)
        self.blocks = [load_block(config, get, quant["linears"], i) for i in layers]
        self.kv: list[KVInt8 | None] = [load_kv_int8(config, get, i) if kv_cache == "int8" else None for i in layers]

    @classmethod
    def from_mq(cls, path: str | Path, kv_cache: str = "fp16") -> SimModel:
        mq = read_mq(path)
        if mq.config is None or mq.quant is None:
            raise ValueError(f"{path}: a tokenizer-only .mq file has no model to simulate")
        return cls(mq.config, {n: mq.tensor(n) for n in mq.names() if not n.startswith("tokenizer.")}, mq.quant,
                   kv_cache)

    def hidden(self, batch: np.ndarray, record: dict[str, np.ndarray] | None = None,
               kv_observer: KVObserver | None = None) -> np.ndarray:
        """The residual stream [B, T, D] after the last block for ids [B, T] (fresh sequences at positions
        0..T-1); `record` as in `forward`; `kv_observer(layer, k, v)` sees what every layer stores in its
        K/V cache (fp32, before the cache's rounding)."""
        t = batch.shape[1]
        cos, sin = rope_cos_sin(self.config, np.arange(t))
        h = self.embed(batch)
        for i, (blk, kv) in enumerate(zip(self.blocks, self.kv)):
            observe = None if kv_observer is None else lambda k, v, i=i: kv_observer(i, k, v)
            h = block_forward(h, blk, self.config, cos, sin, record, f"blk.{i}.", kv, observe)
        return h

    def forward(self, ids: np.ndarray, record: dict[str, np.ndarray] | None = None,
                kv_observer: KVObserver | None = None) -> np.ndarray:
        """Logits [T, V] (or [B, T, V] for ids [B, T]) of fresh sequences at positions 0..T-1. With
        `record`, every linear's int32 accumulators (`blk.{i}.attn_qkv` …) and int4 input codes
        (`… .in`) are stored in it, flattened to [B·T, ·]; `kv_observer` as in `hidden`."""
        ids = np.asarray(ids, np.int64)
        h = self.hidden(ids.reshape(-1, ids.shape[-1]), record, kv_observer)
        x = h * rms_factor(h, self.config.rms_norm_eps) * self.norm
        logits = self.head(x.reshape(-1, x.shape[-1]))
        return logits.reshape(*ids.shape, -1)


class Metrics(NamedTuple):
    ppl: float
    kl: float       # mean KL(P_ref ‖ P_model) per predicted token, nats
    tokens: int


def log_softmax(logits: np.ndarray) -> np.ndarray:
    shifted = logits - logits.max(axis=-1, keepdims=True)
    log_z = np.log(np.exp(shifted).sum(axis=-1, keepdims=True, dtype=np.float64))
    return (shifted - log_z).astype(np.float32)


def evaluate(models: Mapping[str, SimModel], reference: SimModel, ids: np.ndarray, window: int,
             n_windows: int, progress: bool = True) -> dict[str, Metrics]:
    """Perplexity and KL divergence against `reference` on the first `n_windows` non-overlapping windows
    of `window` tokens, each a fresh context; tokens 1..W-1 of each window are predicted. The reference's
    own metrics are returned under 'reference' (its KL is 0)."""
    from tqdm import tqdm

    ids = np.asarray(ids, np.int64)
    if len(ids) < window * n_windows:
        raise ValueError(f"evaluate: {len(ids)} tokens are fewer than {n_windows} windows of {window}")
    names = ["reference", *models]
    nll = dict.fromkeys(names, 0.0)
    kl = dict.fromkeys(names, 0.0)
    for w in tqdm(range(n_windows), desc="evaluate", unit="window", disable=not progress):
        chunk = ids[w * window:(w + 1) * window]
        target = chunk[1:]
        rows = np.arange(window - 1)
        ref = log_softmax(reference.forward(chunk)[:-1])
        nll["reference"] -= float(ref[rows, target].sum(dtype=np.float64))
        p_ref = np.exp(ref)
        for name, model in models.items():
            lp = log_softmax(model.forward(chunk)[:-1])
            nll[name] -= float(lp[rows, target].sum(dtype=np.float64))
            kl[name] += float((p_ref * (ref - lp)).sum(dtype=np.float64))
    count = n_windows * (window - 1)
    return {n: Metrics(float(np.exp(nll[n] / count)), kl[n] / count, count) for n in names}
