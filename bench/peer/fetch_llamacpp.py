"""Fetches the peer engine's sources for the benchmarks: llama.cpp as vendored by the llama-cpp-python sdist
on PyPI (version pinned below), trimmed to what `llama-bench` and `llama-quantize` need on the CPU and CUDA
backends, as one tarball in bench/peer/cache/ (kept out of git; this script recreates it). The GPU machine
reaches no package registry: what it needs goes into bench/peer/cache/carry/ (about 4 MB), the one folder
to copy there with the benchmark: the tarball, the wheel of the `gguf` package (pure Python; the GGUF writer
needs it and that machine lacks it) and the Llama-2 SentencePiece tokenizer of the shared data (the random
7B files use it; the shared data does not travel).

    python3 bench/peer/fetch_llamacpp.py            # prints the tarball's path

The trimmed tree keeps the top-level CMake project, cmake/, include/, src/ (libllama), common/, vendor/
(header-only third-party code that common/ links), ggml's core with its CPU and CUDA backends, and
tools/llama-bench and tools/quantize; tools/CMakeLists.txt is replaced by one that adds only those two.
Everything else (other backends, the server and its web UI, examples, tests, models, conversion scripts)
is left out. Sources are not modified.
"""
from __future__ import annotations

import argparse
import io
import shutil
import subprocess
import sys
import tarfile
from pathlib import Path

LLAMA_CPP_PYTHON_VERSION = "0.3.36"
GGUF_VERSION = "0.19.0"  # the version in this project's environment
HERE = Path(__file__).resolve().parent
CACHE = HERE / "cache"
CARRY = CACHE / "carry"
TOKENIZER = HERE.parent.parent.parent / "shared" / "data" / "tokenizers" / "llama2"

# paths under vendor/llama.cpp/ that are kept: directories (whole subtree) and single files
KEEP_TREES = ("cmake/", "include/", "src/", "common/", "vendor/", "licenses/", "ggml/cmake/", "ggml/include/",
              "ggml/src/ggml-cpu/", "ggml/src/ggml-cuda/", "tools/llama-bench/", "tools/quantize/")
KEEP_FILES = ("CMakeLists.txt", "LICENSE", "ggml/CMakeLists.txt", "tools/CMakeLists.txt")
TOOLS_CMAKE = b"""# trimmed by mergequant bench/peer/fetch_llamacpp.py: only the two tools the benchmarks run
find_package(Threads REQUIRED)
llama_add_compile_flags()
add_subdirectory(llama-bench)
add_subdirectory(quantize)
"""


def tarball_path(version: str = LLAMA_CPP_PYTHON_VERSION) -> Path:
    return CARRY / f"llama.cpp-from-llama-cpp-python-{version}.tar.gz"


def keep(rel: str) -> bool:
    if rel in KEEP_FILES:
        return True
    if rel.startswith("ggml/src/") and rel.count("/") == 2:  # ggml core: the files directly in ggml/src
        return True
    return rel.startswith(KEEP_TREES)


def download_sdist(version: str) -> Path:
    sdist = CACHE / f"llama_cpp_python-{version}.tar.gz"
    if not sdist.is_file():
        # --no-build-isolation: pip prepares the sdist's metadata with the scikit-build-core already installed
        # here instead of installing the build backend's requirements first (which takes minutes)
        subprocess.run([sys.executable, "-m", "pip", "download", "--no-deps", "--no-binary", ":all:",
                        "--no-build-isolation", f"llama-cpp-python=={version}", "-d", str(CACHE)], check=True)
    if not sdist.is_file():
        raise FileNotFoundError(f"pip download did not produce {sdist}")
    return sdist


def download_gguf_wheel(version: str) -> Path:
    wheels = CARRY / "wheels"
    found = sorted(wheels.glob(f"gguf-{version}-*.whl"))
    if not found:
        subprocess.run([sys.executable, "-m", "pip", "download", "--no-deps", "--only-binary", ":all:",
                        f"gguf=={version}", "-d", str(wheels)], check=True)
        found = sorted(wheels.glob(f"gguf-{version}-*.whl"))
    if not found:
        raise FileNotFoundError(f"pip download did not produce a gguf {version} wheel in {wheels}")
    return found[0]


def trim(sdist: Path, out: Path, version: str) -> tuple[int, int]:
    """Writes the trimmed tree as llama.cpp/... into `out`; returns (files kept, files seen)."""
    prefix = f"llama_cpp_python-{version}/vendor/llama.cpp/"
    kept = seen = 0
    tmp = out.with_suffix(".part")
    with tarfile.open(sdist, "r:gz") as src, tarfile.open(tmp, "w:gz", compresslevel=9) as dst:
        for m in src:
            if not m.name.startswith(prefix) or not m.isfile():
                continue
            rel = m.name[len(prefix):]
            seen += 1
            if not keep(rel):
                continue
            kept += 1
            info = tarfile.TarInfo("llama.cpp/" + rel)
            info.mode, info.mtime = m.mode, m.mtime
            data = TOOLS_CMAKE if rel == "tools/CMakeLists.txt" else src.extractfile(m).read()
            info.size = len(data)
            dst.addfile(info, io.BytesIO(data))
    tmp.replace(out)
    return kept, seen


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--version", default=LLAMA_CPP_PYTHON_VERSION, help="llama-cpp-python sdist version")
    ap.add_argument("--force", action="store_true", help="re-trim even if the tarball exists")
    a = ap.parse_args()
    CARRY.mkdir(parents=True, exist_ok=True)
    out = tarball_path(a.version)
    if a.force or not out.is_file():
        kept, seen = trim(download_sdist(a.version), out, a.version)
        print(f"kept {kept} of {seen} files of vendor/llama.cpp", file=sys.stderr)
    wheel = download_gguf_wheel(GGUF_VERSION)
    if not TOKENIZER.is_dir():
        raise FileNotFoundError(f"{TOKENIZER}: the shared data's Llama-2 tokenizer is missing")
    shutil.copytree(TOKENIZER, CARRY / "tokenizer-llama2", dirs_exist_ok=True, copy_function=shutil.copyfile)
    print(f"{out} ({out.stat().st_size / 1e6:.1f} MB); {wheel.name}", file=sys.stderr)
    print(out)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
