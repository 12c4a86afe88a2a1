"""The mixed-precision policy of the mergequant method (`down_a8`): static W4A4 blocks whose ffn_down takes the
fp32 SwiGLU output as a w4a8 linear (per-token int8 inputs, smoothing folded into the up rows). The CPU engine
against the simulator on a tiny model: the file's layout, every int32 accumulator, the logits and the greedy
tokens; and the smoothing fold is exact (the simulated block with and without it gives the same ffn_down input
up to the per-channel scale)."""
from __future__ import annotations

import json

import numpy as np
import pytest
from safetensors import safe_open

from mergequant import LLM
from mergequant.convert.convert import convert
from mergequant.convert.quant.simulate import SimModel


@pytest.fixture(scope="module")
def mixed_mq(tiny_hf_checkpoint, tmp_path_factory):
    ck = tiny_hf_checkpoint()
    out = tmp_path_factory.mktemp("mixed") / "tiny-mixed.mq"
    return convert(ck.path, out, method="mergequant", progress=False, calib_n=2, calib_len=32, down_a8=True)


def test_layout_is_static_w4a4_with_w4a8_down(mixed_mq):
    with safe_open(str(mixed_mq), "np") as f:
        meta = f.metadata()
        names = set(f.keys())
    linears = json.loads(meta["quant"])["linears"]
    layers = sorted({k.split(".")[1] for k in linears})
    assert layers
    for i in layers:
        p = f"blk.{i}."
        assert [linears[p + n] for n in ("attn_qkv", "attn_output", "ffn_gate_up", "ffn_down")] == \
            ["w4a4", "w4a4", "w4a4", "w4a8"]
        assert p + "ffn_down.in_map" not in names and p + "ffn_gate_up.in_map" in names
    assert json.loads(meta["quant"])["params"]["options"]["down_a8"] is True


def test_engine_matches_simulator(mixed_mq):
    sim = SimModel.from_mq(mixed_mq)
    llm = LLM(mixed_mq, device="cpu")
    ids = [5, 17, 99, 3, 42, 7, 200, 11, 64, 9]
    record: dict[str, np.ndarray] = {}
    want = sim.forward(np.array(ids), record=record)[-1]
    got = np.asarray(llm.logits(ids))
    assert float(np.max(np.abs(got - want)) / np.max(np.abs(want))) <= 1e-4
    downs = [k for k in record if k.endswith("ffn_down.in")]
    assert downs and all(np.abs(record[k]).max() > 7 for k in downs)  # 8-bit inputs, beyond int4's range
    for key in [k for k in record if k.endswith(".in")]:
        np.testing.assert_array_equal(llm._model.int_gemm(key[:-3], np.ascontiguousarray(record[key])),
                                      record[key[:-3]])
    llm.generate(ids, max_tokens=12, temperature=0.0, stop_token_ids=None)
    out = llm._session.output_tokens
    logits = sim.forward(np.array(ids + out))
    assert out == [int(np.argmax(logits[len(ids) - 1 + i])) for i in range(len(out))]
