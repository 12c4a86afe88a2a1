"""Sampling settings, seeds, stop strings, streaming and the errors of invalid values."""
from __future__ import annotations

import pytest

from mergequant import LLM

PROMPT = "Once upon a time"


@pytest.fixture(scope="module")
def llm(smollm2_f16_mq):
    return LLM(smollm2_f16_mq, device="cpu", n_ctx=512)


def test_same_seed_same_text(llm):
    a = llm.generate(PROMPT, max_tokens=24, temperature=1.0, top_k=0, top_p=1.0, min_p=0.0, seed=123)
    b = llm.generate(PROMPT, max_tokens=24, temperature=1.0, top_k=0, top_p=1.0, min_p=0.0, seed=123)
    assert a == b


def test_seeds_differ(llm):
    outs = {llm.generate(PROMPT, max_tokens=24, temperature=1.5, top_k=0, top_p=1.0, min_p=0.0, seed=s)
            for s in range(4)}
    assert len(outs) > 1


def test_top_k_1_is_greedy(llm):
    greedy = llm.generate(PROMPT, max_tokens=16, temperature=0.0)
    assert llm.generate(PROMPT, max_tokens=16, temperature=0.7, top_k=1, seed=5) == greedy


def test_min_p_1_is_greedy(llm):
    greedy = llm.generate(PROMPT, max_tokens=16, temperature=0.0)
    assert llm.generate(PROMPT, max_tokens=16, temperature=2.0, top_k=0, top_p=1.0, min_p=1.0, seed=7) == greedy


def test_repetition_penalty_changes_greedy_text(llm):
    plain = llm.generate("the the the the the", max_tokens=16, temperature=0.0)
    penalized = llm.generate("the the the the the", max_tokens=16, temperature=0.0, repetition_penalty=2.0)
    assert plain != penalized


def test_max_tokens_and_finish_reason(llm):
    llm.generate(PROMPT, max_tokens=5, temperature=0.0)
    assert len(llm._session.output_tokens) <= 5
    if len(llm._session.output_tokens) == 5:
        assert llm.last_finish_reason == "length"


def test_stop_string_excluded_and_stops(llm):
    full = llm.generate(PROMPT, max_tokens=40, temperature=0.0)
    words = full.split()
    assert len(words) > 4
    stop = words[3]
    cut = llm.generate(PROMPT, max_tokens=40, temperature=0.0, stop=[stop])
    assert stop not in cut
    assert full.startswith(cut)
    assert llm.last_finish_reason == "stop"


def test_stream_equals_generate(llm):
    pieces = list(llm.stream(PROMPT, max_tokens=32, temperature=0.0))
    assert "".join(pieces) == llm.generate(PROMPT, max_tokens=32, temperature=0.0)
    assert all(isinstance(p, str) and p for p in pieces)


def test_batch_of_prompts(llm):
    outs = llm.generate([PROMPT, "The sky is"], max_tokens=8, temperature=0.0)
    assert outs == [llm.generate(PROMPT, max_tokens=8, temperature=0.0),
                    llm.generate("The sky is", max_tokens=8, temperature=0.0)]


@pytest.mark.parametrize("kwargs, match", [
    (dict(temperature=-0.1), "temperature"),
    (dict(top_k=-1), "top_k"),
    (dict(top_p=0.0), "top_p"),
    (dict(top_p=1.5), "top_p"),
    (dict(min_p=-0.5), "min_p"),
    (dict(min_p=2.0), "min_p"),
    (dict(repetition_penalty=0.0), "repetition_penalty"),
    (dict(max_tokens=-1), "max_tokens"),
    (dict(seed=-5), "seed"),
    (dict(stop=[""]), "stop"),
])
def test_invalid_sampling_values(llm, kwargs, match):
    with pytest.raises(ValueError, match=match):
        llm.generate(PROMPT, **kwargs)


def test_empty_prompt(llm):
    with pytest.raises(ValueError, match="empty prompt"):
        llm.generate("")
    with pytest.raises(ValueError, match="empty prompt"):
        llm.generate([])


def test_context_overflow(llm):
    long_prompt = "hello " * 600  # > 512 tokens
    with pytest.raises(ValueError, match="context"):
        llm.generate(long_prompt, max_tokens=4)
    with pytest.raises(ValueError, match="context"):
        llm.generate(PROMPT, max_tokens=600)
    # the engine still works afterwards
    assert llm.generate(PROMPT, max_tokens=4, temperature=0.0)
