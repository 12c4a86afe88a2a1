"""The output linear in f16, w8a8 or w4a16g (`convert --output-scheme`, docs/format.md "The output linear"): the
CPU embed op from a quantized table equals the simulator's dequantized rows bit for bit, and the whole CPU engine's
logits and greedy tokens equal the simulator's on a tiny model stored with each output scheme."""
from __future__ import annotations

import numpy as np
import pytest

from mergequant import LLM, _engine
from mergequant.convert.convert import convert
from mergequant.convert.mqfile import read_mq
from mergequant.convert.quant.simulate import SimModel
from mergequant.convert.schemes import get_scheme


@pytest.mark.parametrize("scheme", ["w8a8", "w4a16g"])
def test_embed_from_quantized_table(scheme):
    rng = np.random.default_rng(0)
    w = rng.standard_normal((40, 128)).astype(np.float32)
    packed = get_scheme(scheme).pack(w)
    lin = get_scheme(scheme).simulate(lambda s: packed.get(s))
    ids = np.array([3, 0, 39, 3, 17], np.int32)
    out = np.empty((len(ids), 128), np.float32)
    scale = packed["scale"] if scheme == "w8a8" else packed["scale"].view(np.uint16)
    _engine.CpuOps(1).embed_quant(scheme, packed["qweight"], np.ascontiguousarray(scale), ids, out)
    want = lin.embed_rows(lin, ids.astype(np.int64))
    np.testing.assert_array_equal(out, want)
    # an independent dequantization: codes times their scale
    if scheme == "w8a8":
        ref = packed["qweight"][ids].astype(np.float32) * packed["scale"][ids][:, None]
        np.testing.assert_array_equal(out, ref)


@pytest.mark.parametrize("output_scheme", ["f16", "w8a8", "w4a16g"])
def test_tiny_output_scheme_engine_equals_simulator(tiny_hf_checkpoint, tmp_path, output_scheme):
    ck = tiny_hf_checkpoint()
    out = convert(ck.path, tmp_path / f"{output_scheme}.mq", method="rtn-w4a16", progress=False,
                  output_scheme=output_scheme)
    names = set(read_mq(out).names())
    tied = "output.weight" not in names and "token_embd.weight" not in names
    if output_scheme != "f16":
        assert "output.qweight" in names and "output.weight" not in names
    sim = SimModel.from_mq(out)
    llm = LLM(out, device="cpu")
    ids = [5, 17, 99, 3, 42, 7, 200, 11, 64, 9]
    want = sim.forward(np.array(ids))[-1]
    got = llm.logits(ids)
    assert float(np.abs(got - want).max() / np.abs(want).max()) <= (2e-2 if output_scheme == "w8a8" else 1e-4)
    assert int(np.argmax(got)) == int(np.argmax(want)), tied


def test_tied_quantized_output_with_embedding_refused(tiny_hf_checkpoint, tmp_path):
    """A tied file stores the matrix once: a token_embd.weight beside a quantized output is refused by name."""
    from safetensors import safe_open
    from safetensors.numpy import load_file, save_file

    from mergequant import EngineError
    ck = tiny_hf_checkpoint()
    out = convert(ck.path, tmp_path / "w8a8.mq", progress=False, output_scheme="w8a8")
    t = load_file(str(out))
    with safe_open(str(out), "np") as f:
        meta = dict(f.metadata())
    t["token_embd.weight"] = np.zeros((t["output.scale"].shape[0], t["output_norm.weight"].shape[0]), np.float16)
    save_file(t, str(out), metadata=meta)
    with pytest.raises(EngineError, match="token_embd.weight"):
        LLM(out, device="cpu")
