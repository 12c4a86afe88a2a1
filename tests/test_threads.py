"""One LLM shared by many threads, and several LLMs side by side: every generation equals the
single-threaded greedy result; a stream replaced by another generation raises a clear error instead of
reading freed state."""
from __future__ import annotations

import random
import threading
from pathlib import Path

import pytest

from mergequant import LLM, EngineError
from mergequant.convert.convert import convert

PROMPTS = ["the", "Once upon a time", "in the", "hello world", "a b c", "The capital of"]
N_THREADS = 8  # two of each kind of worker
REQUESTS_PER_THREAD = 8
MAX_TOKENS = 12


@pytest.fixture(scope="module")
def tiny_models(tiny_hf_checkpoint, tmp_path_factory) -> tuple[Path, Path]:
    d = tmp_path_factory.mktemp("threads")
    a = convert(tiny_hf_checkpoint().path, d / "a.mq", progress=False)
    b = convert(tiny_hf_checkpoint(seed=1).path, d / "b.mq", progress=False)
    return a, b


def expected(path: Path) -> dict[str, str]:
    """Greedy completions computed one at a time in a fresh LLM per prompt (no shared cache)."""
    return {p: LLM(path, device="cpu").generate(p, max_tokens=MAX_TOKENS, temperature=0.0) for p in PROMPTS}


def run_threads(worker, n: int) -> list[BaseException]:
    errors: list[BaseException] = []

    def wrap(k: int) -> None:
        try:
            worker(k)
        except BaseException as e:  # noqa: BLE001 - reported by the test
            errors.append(e)

    threads = [threading.Thread(target=wrap, args=(k,)) for k in range(n)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=300)
        assert not t.is_alive(), "a worker thread hung"
    return errors


def test_shared_llm_generate_tokenize_and_streams(tiny_models):
    path, _ = tiny_models
    want = expected(path)
    assert len(set(want.values())) > 1  # the prompts give different completions: a mix-up would show
    llm = LLM(path, device="cpu", threads=1)
    want_ids = {p: LLM(path, device="cpu").tokenize(p) for p in PROMPTS}
    done = {"generate": 0, "stream": 0, "interrupted": 0, "abandoned": 0, "tokenize": 0}
    lock = threading.Lock()

    def worker(k: int) -> None:
        rng = random.Random(k)
        for _ in range(REQUESTS_PER_THREAD):
            p = rng.choice(PROMPTS)
            kind = ("generate", "stream", "abandon", "tokenize")[k % 4]
            if kind == "generate":
                assert llm.generate(p, max_tokens=MAX_TOKENS, temperature=0.0) == want[p]
            elif kind == "tokenize":
                assert llm.tokenize(p) == want_ids[p]
            elif kind == "abandon":
                it = llm.stream(p, max_tokens=MAX_TOKENS, temperature=0.0)
                try:
                    next(it, None)
                except EngineError as e:
                    assert "interrupted" in str(e)
                del it  # abandoned mid-stream
                kind = "abandoned"
            else:
                try:
                    text = "".join(llm.stream(p, max_tokens=MAX_TOKENS, temperature=0.0))
                except EngineError as e:
                    assert "interrupted" in str(e) and "same model" in str(e)
                    kind = "interrupted"
                else:
                    assert text == want[p]
            with lock:
                done[kind] += 1

    errors = run_threads(worker, N_THREADS)
    assert not errors, errors
    # every generate() completed and matched; every stream either matched in full or raised the clear error
    per_kind = N_THREADS // 4 * REQUESTS_PER_THREAD
    assert done["generate"] == done["tokenize"] == done["abandoned"] == per_kind
    assert done["stream"] + done["interrupted"] == per_kind
    # the LLM still works single-threaded afterwards
    assert llm.generate(PROMPTS[1], max_tokens=MAX_TOKENS, temperature=0.0) == want[PROMPTS[1]]


def test_stream_replaced_by_generate_raises(tiny_models):
    path, _ = tiny_models
    llm = LLM(path, device="cpu")
    it = llm.stream("the", max_tokens=MAX_TOKENS, temperature=0.0)
    next(iter(it), None)
    want = LLM(path, device="cpu").generate("hello world", max_tokens=4, temperature=0.0)
    assert llm.generate("hello world", max_tokens=4, temperature=0.0) == want
    with pytest.raises(EngineError, match="stream was interrupted"):
        for _ in it:
            pass


def test_two_models_side_by_side(tiny_models):
    a, b = tiny_models
    want_a, want_b = expected(a), expected(b)
    assert want_a != want_b  # different weights: a mix-up between the two would show
    llms = {a: LLM(a, device="cpu"), b: LLM(b, device="cpu")}
    wants = {a: want_a, b: want_b}

    def worker(k: int) -> None:
        path = (a, b)[k % 2]
        rng = random.Random(100 + k)
        for _ in range(REQUESTS_PER_THREAD):
            p = rng.choice(PROMPTS)
            assert llms[path].generate(p, max_tokens=MAX_TOKENS, temperature=0.0) == wants[path][p]

    errors = run_threads(worker, 4)
    assert not errors, errors
