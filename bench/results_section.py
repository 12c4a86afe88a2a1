"""The one place the bench scripts write their generated section of bench/RESULTS.md: the text between the
script's begin/end markers is replaced (or the section appended when the markers are absent)."""
from __future__ import annotations

import platform
import re
from pathlib import Path


def write_section(path: Path, section: str, begin: str, end: str) -> None:
    text = path.read_text() if path.exists() else "# Benchmark results\n"
    pattern = re.compile(re.escape(begin) + ".*?" + re.escape(end) + "\n?", re.S)
    text = pattern.sub(lambda _: section, text) if pattern.search(text) else text.rstrip("\n") + "\n\n" + section
    path.write_text(text)


def cpu_name() -> str:
    """The CPU's model name (/proc/cpuinfo), for the machine line of a section."""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()
