"""mergequant: static 4-bit LLM inference.

    from mergequant import LLM
    llm = LLM("model.mq")            # or LLM() for the built-in default model
    print(llm.generate("The capital of France is", max_tokens=16, temperature=0))
"""
from ._engine import ArgumentError, ContextOverflowError, EngineError
from .llm import LLM

__all__ = ["LLM", "EngineError", "ArgumentError", "ContextOverflowError"]
__version__ = "0.1.0"
