"""The one place the bench scripts write their generated section of bench/RESULTS.md: the text between the
script's begin/end markers is replaced (or the section appended when the markers are absent)."""
from __future__ import annotations

import re
from pathlib import Path


def write_section(path: Path, section: str, begin: str, end: str) -> None:
    text = path.read_text() if path.exists() else "# Benchmark results\n"
    pattern = re.compile(re.escape(begin) + ".*?" + re.escape(end) + "\n?", re.S)
    text = pattern.sub(lambda _: section, text) if pattern.search(text) else text.rstrip("\n") + "\n\n" + section
    path.write_text(text)
