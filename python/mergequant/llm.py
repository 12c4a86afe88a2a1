"""The Python API: `LLM(path).generate / stream / chat / tokenize / detokenize`.

Names and defaults follow llama-cpp-python and vLLM. The engine does the work in C++ with the GIL
released; this module only validates arguments and turns bytes into text.
"""
from __future__ import annotations

import os
import threading
from typing import Iterator, Optional, Sequence, Union

from . import _engine

Prompt = Union[str, Sequence[int]]
# KV cache types: fp16, or int8 with the static per-channel scales of a model converted with --kv-int8
KV_CACHE_TYPES = ("fp16", "int8")


def _stop_list(stop: Union[str, Sequence[str], None]) -> list[str]:
    if stop is None:
        return []
    if isinstance(stop, str):
        return [stop]
    stops = list(stop)
    for s in stops:
        if not isinstance(s, str):
            raise TypeError(f"stop must be a string or a list of strings, got an item of type {type(s).__name__}")
    return stops


class LLM:
    """A model loaded on one device, with one conversation's KV cache.

    Args:
        model: path of a .mq file (see `mergequant convert`); None uses the built-in default model
            (SmolLM2-135M-Instruct), converted on first use into the cache directory: with MergeQuant W4A4
            (`convert --method mergequant`, a few minutes once; its stages and time are printed).
        scheme: the default model's file when `model` is None: "w4a4" (MergeQuant, the default) or "f16"
            (unquantized); not allowed with a model path.
        device: "auto" (CUDA when available, else CPU), "cpu", "cuda" or "cuda:N".
        n_ctx: context length in tokens; None uses min(the model's trained context, 4096). A context
            that does not fit in the free host (or GPU) memory is refused up front, naming the sizes and
            the n_ctx that would fit (see `memory()`).
        threads: CPU threads; None uses one per core.
        n_batch: prompt tokens per forward pass; None uses the device's default (CPU 256, CUDA 2048). Larger
            passes read the weights fewer times and take more scratch memory (see `memory()`).
        kv_cache: "fp16" (default) or "int8" (1 byte per cached value instead of 2, with the static
            per-channel scales of a model converted with `--kv-int8`; docs/numerics.md).

    Threads: one LLM may be shared. `generate`, `chat`, the scoring calls and `tokenize` are safe from any
    thread (generations run one at a time, each in full); a `stream` that is not finished when another
    generation starts raises EngineError ("interrupted") at its next piece. Several LLM objects work
    side by side, each with its own cache.
    """

    def __init__(self, model: Union[str, os.PathLike, None] = None, device: str = "auto",
                 n_ctx: Optional[int] = None, threads: Optional[int] = None, kv_cache: str = "fp16",
                 scheme: Optional[str] = None, n_batch: Optional[int] = None):
        if model is None:
            from .default_model import DEFAULT_SCHEME, check_scheme, default_model_path
            model = default_model_path(check_scheme(scheme or DEFAULT_SCHEME))
        elif scheme is not None:
            raise ValueError(f"scheme={scheme!r} selects the default model's file: pass it without a model path "
                             f"(a .mq file has its scheme already)")
        path = os.fspath(model)
        if not os.path.exists(path):
            raise FileNotFoundError(f"model file not found: {path}")
        if n_ctx is not None and (not isinstance(n_ctx, int) or n_ctx <= 0):
            raise ValueError(f"invalid n_ctx {n_ctx!r}: must be a positive integer or None")
        if n_batch is not None and (not isinstance(n_batch, int) or isinstance(n_batch, bool) or n_batch <= 0):
            raise ValueError(f"invalid n_batch {n_batch!r}: must be a positive integer or None")
        if threads is not None and (not isinstance(threads, int) or threads <= 0):
            raise ValueError(f"invalid threads {threads!r}: must be a positive integer or None")
        if not isinstance(kv_cache, str):
            raise TypeError(f"kv_cache must be a str ({' or '.join(KV_CACHE_TYPES)}), got {type(kv_cache).__name__}")
        self.path = path
        self._model = _engine.Model(path, device=device, n_threads=threads or 0)
        self._session = _engine.Session(self._model, n_ctx=n_ctx or 0, n_batch=n_batch or 0, kv_cache=kv_cache)
        # one generation at a time: generate() holds it from start to the last token
        self._lock = threading.RLock()

    # --- properties ---------------------------------------------------------------------------
    @property
    def device(self) -> str:
        return self._model.backend

    @property
    def n_ctx(self) -> int:
        return self._session.n_ctx

    @property
    def kv_cache(self) -> str:
        """The KV cache type: "fp16" or "int8"."""
        return self._session.kv_cache

    @property
    def n_vocab(self) -> int:
        return self._model.n_vocab

    @property
    def chat_template(self) -> str:
        return self._model.chat_template

    @property
    def last_timings(self) -> dict:
        """Token counts and milliseconds of the last generation's prefill and decode."""
        return self._session.timings

    @property
    def last_finish_reason(self) -> str:
        """"stop" (end of turn, stop token or stop string) or "length" (max_tokens reached)."""
        return self._session.finish_reason

    def memory(self) -> dict:
        """The memory plan in bytes: {"device", "n_ctx", "n_batch", "kv_cache", "weights", "kv_cache_bytes",
        "scratch", "total", "available"} ("available": free host or GPU memory now, None when unknown)."""
        return self._session.memory()

    # --- tokens -------------------------------------------------------------------------------
    def tokenize(self, text: str, add_special: bool = True, special: bool = False) -> list[int]:
        """Token ids of `text`; BOS/EOS added per the tokenizer's settings when `add_special`;
        special-token text such as `<|im_start|>` matched as one token when `special`."""
        if not isinstance(text, str):
            raise TypeError(f"text must be a str, got {type(text).__name__}")
        return self._model.tokenize(text, add_special, special)

    def detokenize(self, ids: Sequence[int], special: bool = False) -> str:
        return self._model.detokenize(list(ids), special).decode("utf-8", errors="replace")

    # --- generation ---------------------------------------------------------------------------
    def _prompt_ids(self, prompt: Prompt, special: bool) -> list[int]:
        if isinstance(prompt, str):
            if prompt == "":
                raise ValueError("empty prompt: give at least one character")
            return self.tokenize(prompt, add_special=True, special=special)
        ids = list(prompt)
        if not ids:
            raise ValueError("empty prompt: give at least one token")
        return ids

    def stream(self, prompt: Prompt, max_tokens: int = 128, temperature: float = 0.8, top_k: int = 40,
               top_p: float = 0.95, min_p: float = 0.05, repetition_penalty: float = 1.0,
               seed: Optional[int] = None, stop: Union[str, Sequence[str], None] = None,
               stop_token_ids: Optional[Sequence[int]] = None, special: bool = False) -> Iterator[str]:
        """Yield the generated text piece by piece; every piece is valid UTF-8 and a stop string is
        never yielded (not even partly). Settings as in `generate`."""
        ids = self._prompt_ids(prompt, special)
        with self._lock:
            gen_id = self._start(ids, max_tokens, temperature, top_k, top_p, min_p, repetition_penalty, seed, stop,
                                 stop_token_ids)
        return self._pieces(gen_id)

    def _start(self, ids, max_tokens, temperature, top_k, top_p, min_p, repetition_penalty, seed, stop,
               stop_ids) -> int:
        if seed is not None and (not isinstance(seed, int) or seed < 0):
            raise ValueError(f"invalid seed {seed!r}: must be a non-negative integer or None")
        return self._session.start(ids, int(max_tokens), float(temperature), int(top_k), float(top_p), float(min_p),
                                   float(repetition_penalty), -1 if seed is None else int(seed), _stop_list(stop),
                                   list(stop_ids or []))

    def _pieces(self, gen_id: int) -> Iterator[str]:
        while True:
            piece = self._session.next(gen_id)
            if piece is None:
                return
            if piece:
                yield piece.decode("utf-8", errors="replace")

    def generate(self, prompt: Union[Prompt, list[str]], max_tokens: int = 128, temperature: float = 0.8,
                 top_k: int = 40, top_p: float = 0.95, min_p: float = 0.05, repetition_penalty: float = 1.0,
                 seed: Optional[int] = None, stop: Union[str, Sequence[str], None] = None,
                 stop_token_ids: Optional[Sequence[int]] = None, special: bool = False) -> Union[str, list[str]]:
        """Complete `prompt` (a string, token ids, or a list of strings: then a list of completions).

        temperature 0 is greedy; top_k 0, top_p 1 and min_p 0 disable those filters; repetition_penalty
        > 1 discourages tokens already in the sequence; a `seed` makes sampling reproducible; generation
        ends at the model's end-of-turn token, a `stop` string (excluded from the text), a
        `stop_token_ids` id, or after `max_tokens`.
        """
        if isinstance(prompt, list) and prompt and all(isinstance(p, str) for p in prompt):
            return [self.generate(p, max_tokens, temperature, top_k, top_p, min_p, repetition_penalty, seed, stop,
                                  stop_token_ids, special) for p in prompt]
        with self._lock:
            return "".join(self.stream(prompt, max_tokens, temperature, top_k, top_p, min_p, repetition_penalty,
                                       seed, stop, stop_token_ids, special))

    def chat(self, messages: list[dict], max_tokens: int = 128, temperature: float = 0.8, top_k: int = 40,
             top_p: float = 0.95, min_p: float = 0.05, repetition_penalty: float = 1.0, seed: Optional[int] = None,
             stop: Union[str, Sequence[str], None] = None, stream: bool = False) -> Union[str, Iterator[str]]:
        """Reply to `messages` ([{"role": "system"|"user"|"assistant", "content": str}, ...]) using the
        model's chat template. The conversation's prefix stays in the KV cache, so a follow-up that
        extends the same messages only prefills the new turn."""
        from .chat_template import render_chat_template

        if not messages:
            raise ValueError("empty messages: give at least one message")
        text = render_chat_template(self._model.chat_template, messages, add_generation_prompt=True,
                                    bos_token=self._token_text(self._model.bos_id),
                                    eos_token=self._token_text(self._model.eos_id))
        # the template already places BOS where the model wants it (as HF's apply_chat_template)
        ids = self.tokenize(text, add_special=False, special=True)
        if stream:
            return self.stream(ids, max_tokens, temperature, top_k, top_p, min_p, repetition_penalty, seed, stop)
        with self._lock:
            return "".join(self.stream(ids, max_tokens, temperature, top_k, top_p, min_p, repetition_penalty, seed,
                                       stop))

    def _token_text(self, token_id: int) -> str:
        if token_id < 0:
            return ""
        return self._model.detokenize([token_id], True).decode("utf-8", errors="replace")

    # --- evaluation ---------------------------------------------------------------------------
    def token_logprobs(self, ids: Sequence[int]):
        """log p(ids[i+1] | ids[:i+1]) for every i, in a fresh context (numpy float64 array)."""
        with self._lock:
            return self._session.token_logprobs(list(ids))

    def log_probs(self, ids: Sequence[int]):
        """Log-softmax of the next-token distribution after every token of `ids`, in a fresh context
        (numpy float32 [len(ids), n_vocab])."""
        with self._lock:
            return self._session.log_probs(list(ids))

    def logits(self, ids: Sequence[int]):
        """fp32 logits after `ids`, evaluated in a fresh context."""
        with self._lock:
            return self._session.logits(list(ids), fresh=True)
