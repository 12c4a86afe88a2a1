"""Docs and comments point only at files that exist.

Every file path the project's docs, README and source comments name (a path starting at the repository root,
`engine/backends/cpu/embed.cpp`, or inside one of the engine's and converter's folders, `backends/cuda/rope.cu`,
`quant/gptq.py`) must be a tracked file, and every bare C++/CUDA file name (`splitk.cuh`) must name one. The
scan reads the tracked files through git, so a renamed or deleted file that a doc still cites fails here.
bench/RESULTS.md is left out: it is the record of past measurements, which name the files of their commit
(and this file, whose self-test names missing files on purpose).
"""
from __future__ import annotations

import re
import subprocess
from pathlib import Path, PurePosixPath

import pytest

ROOT = Path(__file__).resolve().parent.parent

EXT = r"(?:cpp|h|cu|cuh|py|md|sh|txt|json|inc|toml)"
PATH_RE = re.compile(r"(?<![\w./<-])((?:[\w.-]+/)+[\w.-]+\." + EXT + r")(?!\.?\w|/)")
NAME_RE = re.compile(r"(?<![\w./<-])([\w-]{2,}\.(?:cpp|h|cu|cuh|inc))(?!\.?\w|[/(])")
# folders a project path may start with besides the top-level ones (relative to engine/ or converter/)
INNER = {"backends", "kernels", "quant", "src", "cpu", "cuda", "peer"}
# names that are not project files: system and toolkit headers, and the historic files of the "before"
# column of docs/architecture.md's scheme count (commit 73e66bc), which that table names on purpose
NOT_PROJECT = {"cuda_fp16.h", "cuda_runtime.h", "cublas_v2.h", "cublasLt.h", "cublas_api.h", "immintrin.h",
               "cuda.h", "library_types.h", "llama.cpp", "cpu-quant.cpp", "cpu-quant.h"}
SCANNED = re.compile(r"\.(cpp|h|cu|cuh|py|md|sh|txt|toml)$")


def tracked() -> list[str]:
    r = subprocess.run(["git", "ls-files"], cwd=ROOT, capture_output=True, text=True)
    if r.returncode != 0:
        pytest.skip("not a git checkout: " + r.stderr.strip())
    return r.stdout.split()


def dangling(files: list[str], texts: dict[str, str]) -> list[str]:
    """'file:line: reference' for each reference in `texts` that names no file of `files`."""
    names = {PurePosixPath(f).name for f in files}
    top = {PurePosixPath(f).parts[0] for f in files if "/" in f}
    out = []
    for f, text in texts.items():
        for ln, line in enumerate(text.splitlines(), 1):
            for m in PATH_RE.finditer(line):
                p = m.group(1)
                first = PurePosixPath(p).parts[0]
                if first not in top and first not in INNER:
                    continue  # another project's path (e.g. a checkpoint's files, a peer's source tree)
                if p not in files and not any(t.endswith("/" + p) for t in files):
                    out.append(f"{f}:{ln}: {p}")
            for m in NAME_RE.finditer(line):
                n = m.group(1)
                if n not in names and n not in NOT_PROJECT:
                    out.append(f"{f}:{ln}: {n}")
    return out


def test_docs_and_comments_name_existing_files():
    files = tracked()
    texts = {f: (ROOT / f).read_text(errors="replace") for f in files
             if SCANNED.search(f) and f not in ("bench/RESULTS.md", "tests/test_doc_paths.py")
             and not f.startswith("tests/fuzz-regressions/")}
    bad = dangling(files, texts)
    assert bad == [], "references to files that do not exist:\n" + "\n".join(bad)


def test_the_scan_sees_a_dangling_reference():
    files = ["engine/backends/cpu/embed.cpp", "docs/format.md", "engine/backends/cuda/splitk.cuh"]
    texts = {"docs/format.md": "see engine/backends/cpu/embed.cpp and backends/cpu/embed.cpp, splitk.cuh;\n"
                               "gone: engine/backends/cpu/gone.cpp, backends/cuda/old.cu, lost.cuh;\n"
                               "not ours: model/config.json, <nanobind/nanobind.h>, llama.cpp"}
    assert dangling(files, texts) == ["docs/format.md:2: engine/backends/cpu/gone.cpp",
                                      "docs/format.md:2: backends/cuda/old.cu", "docs/format.md:2: lost.cuh"]
