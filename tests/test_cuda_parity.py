"""The CUDA backend against the CPU backend through the Python API: logits of a prompt and greedy
generations on the tiny random model and on the default model (SmolLM2-135M, f16). Skipped where the
extension has no CUDA backend or no GPU is present. Op-level checks: engine/backends/cuda/test-cuda-ops.cpp."""
from __future__ import annotations

import numpy as np
import pytest

from mergequant import LLM, _engine

PROMPTS = ["The capital of France is", "def fibonacci(n):", "Once upon a time, in a small village,"]


def _cuda_llm(path) -> LLM:
    if not _engine.cuda_built():
        pytest.skip("this build has no CUDA backend")
    try:
        return LLM(path, device="cuda")
    except RuntimeError as e:  # built with CUDA, but no usable GPU here
        pytest.skip(f"no usable CUDA device: {e}")


def _max_rel(a: np.ndarray, b: np.ndarray) -> float:
    # max-abs difference over max-abs logit (docs/numerics.md)
    return float(np.max(np.abs(a - b)) / np.max(np.abs(a)))


@pytest.fixture(scope="module")
def tiny_mq(tiny_hf_checkpoint, tmp_path_factory):
    from mergequant.convert import convert

    ck = tiny_hf_checkpoint(hidden_size=256, intermediate_size=704, max_position_embeddings=1024)
    return convert(ck.path, tmp_path_factory.mktemp("tiny_cuda") / "tiny-f16.mq", progress=False)


def test_tiny_logits_match_cpu(tiny_mq):
    gpu = _cuda_llm(tiny_mq)
    cpu = LLM(tiny_mq, device="cpu")
    rng = np.random.default_rng(0)
    for n in (1, 7, 9, 300):  # decode-sized (GEMV) and prefill-sized (GEMM) batches; > 256 keys in attention
        ids = rng.integers(0, cpu.n_vocab, n).tolist()
        assert _max_rel(np.asarray(cpu.logits(ids)), np.asarray(gpu.logits(ids))) <= 1e-3


@pytest.mark.parametrize("prompt", PROMPTS)
def test_default_model_logits_and_greedy_match_cpu(smollm2_f16_mq, prompt):
    gpu = _cuda_llm(smollm2_f16_mq)
    cpu = LLM(smollm2_f16_mq, device="cpu")
    ids = cpu.tokenize(prompt)
    assert _max_rel(np.asarray(cpu.logits(ids)), np.asarray(gpu.logits(ids))) <= 1e-3
    a = cpu.generate(prompt, max_tokens=32, temperature=0.0)
    b = gpu.generate(prompt, max_tokens=32, temperature=0.0)
    assert a == b
