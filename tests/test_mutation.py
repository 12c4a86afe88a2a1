"""Mutation test of the model-file reader through the Python API: seeded mutations of small real .mq files
(byte flips in the header, the tokenizer tables and the weights; header numbers replaced by extremes;
truncation; offset tables made non-monotonic), each loaded through `LLM` in a worker subprocess whose address
space is capped. Every file either loads and generates, or is rejected with the engine's own error and a
message; none crashes the process or runs it out of memory; a mutation that breaks a rule of docs/format.md
by construction is always rejected."""
from __future__ import annotations

import json
import os
import random
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest

from mergequant.convert.convert import convert

N_CASES = int(os.environ.get("MERGEQUANT_MUTATION_CASES", "2000"))
MEMORY_CAP = 3 << 30  # RLIMIT_AS of the worker: a bounded reader stays far below it

WORKER = textwrap.dedent("""
    import json, resource, sys
    resource.setrlimit(resource.RLIMIT_AS, (int(sys.argv[1]), int(sys.argv[1])))
    from mergequant import LLM, EngineError
    for line in sys.stdin:
        path = line.strip()
        print("MQ " + json.dumps({"start": path}), flush=True)
        try:
            llm = LLM(path, device="cpu", threads=1)
            text = llm.generate("the", max_tokens=3, temperature=0.0)
            ids = llm._session.output_tokens
            ok = all(0 <= i < llm.n_vocab for i in ids) and isinstance(text, str)
            res = {"result": "loaded" if ok else "bad output", "detail": repr(ids)}
        except EngineError as e:
            res = {"result": "rejected", "detail": str(e)}
        except BaseException as e:
            res = {"result": "foreign error", "detail": type(e).__name__ + ": " + str(e)}
        print("MQ " + json.dumps(res), flush=True)
""")


def _split(raw: bytes) -> tuple[int, dict]:
    n = int.from_bytes(raw[:8], "little")
    return n, json.loads(raw[8:8 + n])


def _join(header: dict, data: bytes) -> bytes:
    text = json.dumps(header).encode()
    text += b" " * (-len(text) % 8)
    return len(text).to_bytes(8, "little") + text + data


EXTREMES = [0, -1, 1, 2**31, 2**31 - 1, 2**32 + 5, 2**40, 2**62, -2**40, 1e999, -1e999, 1e-300, 0.5, 7]


def _mutate_numbers(obj, rng: random.Random, p: float):
    """Replace numbers in a JSON value (and in JSON nested inside its strings) by extremes, with probability p."""
    if isinstance(obj, dict):
        return {k: _mutate_numbers(v, rng, p) for k, v in obj.items()}
    if isinstance(obj, list):
        return [_mutate_numbers(v, rng, p) for v in obj]
    if isinstance(obj, bool) or obj is None:
        return obj
    if isinstance(obj, (int, float)):
        return rng.choice(EXTREMES) if rng.random() < p else obj
    if isinstance(obj, str) and obj[:1] in "{[":
        try:
            inner = json.loads(obj)
        except ValueError:
            return obj
        return json.dumps(_mutate_numbers(inner, rng, p)).replace("Infinity", "1e999")
    return obj


def mutate(raw: bytes, rng: random.Random) -> tuple[bytes, str, bool]:
    """(mutated bytes, kind, whether docs/format.md calls it invalid by construction)."""
    n, hdr = _split(raw)
    data = raw[8 + n:]
    kind = rng.choice(["flip header", "flip tokenizer", "flip weights", "numbers", "truncate", "offsets",
                       "shape", "header length"])
    if kind == "flip header" or kind == "flip weights":
        b = bytearray(raw)
        lo, hi = (8, 8 + n) if kind == "flip header" else (8 + n, len(raw))
        for _ in range(rng.randint(1, 8)):
            b[rng.randrange(lo, hi)] ^= 1 << rng.randrange(8)
        return bytes(b), kind, False
    if kind == "flip tokenizer":
        names = [k for k in hdr if k.startswith("tokenizer.")]
        name = rng.choice(names)
        b0, b1 = hdr[name]["data_offsets"]
        b = bytearray(data)
        for _ in range(rng.randint(1, 8)):
            if b1 > b0:
                b[rng.randrange(b0, b1)] = rng.randrange(256)
        return _join(hdr, bytes(b)), kind, False
    if kind == "numbers":
        out = _mutate_numbers(hdr, rng, 0.05)
        return _join(out, data), kind, False
    if kind == "truncate":
        return raw[:rng.randrange(0, len(raw))], kind, True
    if kind == "offsets":
        # an offset table entry far past its blob then back: non-monotonic, always invalid
        name = rng.choice([k for k in hdr if k.endswith("_offsets")])
        b0, _ = hdr[name]["data_offsets"]
        count = hdr[name]["shape"][0]
        off = np.frombuffer(data, "<i4", count, b0).copy()
        i = rng.randrange(1, count - 1)
        off[i] = rng.choice([2**31 - 1, off[-1] + 1 + rng.randrange(1 << 20), -5])
        b = bytearray(data)
        b[b0:b0 + 4 * count] = off.tobytes()
        return _join(hdr, bytes(b)), kind, True
    if kind == "shape":
        name = rng.choice([k for k in hdr if k != "__metadata__"])
        hdr[name]["shape"] = rng.choice([[2**40, 2**24, 7], [2**32, 2**32], [-1], [2**62, 4]])
        return _join(hdr, data), kind, True
    # header length field past the end of the file or not the header's
    b = bytearray(raw)
    b[:8] = (n + rng.choice([1, 3, 8 * 2**20, 2**40])).to_bytes(8, "little")
    return bytes(b), kind, True


@pytest.fixture(scope="module")
def seeds(tiny_hf_checkpoint, tmp_path_factory) -> list[Path]:
    d = tmp_path_factory.mktemp("mutation")
    ck = tiny_hf_checkpoint()
    return [convert(ck.path, d / f"tiny-{s}.mq", scheme=s, progress=False) for s in ("f16", "w4a16g", "w4a4d", "w8a8", "w4a8g")]


def run_worker(paths: list[Path]) -> dict[str, dict]:
    """Loads every path in capped worker processes; a worker that dies is recorded against the file it was
    loading ("crash" with its signal or exit status) and a fresh worker takes the rest."""
    results: dict[str, dict] = {}
    todo = [str(p) for p in paths]
    while todo:
        proc = subprocess.Popen([sys.executable, "-c", WORKER, str(MEMORY_CAP)], stdin=subprocess.PIPE,
                                stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        out, err = proc.communicate("\n".join(todo) + "\n", timeout=900)
        current = None
        for line in out.splitlines():
            if not line.startswith("MQ "):
                continue  # anything else the interpreter prints
            msg = json.loads(line[3:])
            if "start" in msg:
                current = msg["start"]
            else:
                results[current] = msg
                current = None
        if current is not None:
            results[current] = {"result": "crash", "detail": f"exit {proc.returncode}: {err[-2000:]}"}
        elif proc.returncode != 0:
            raise AssertionError(f"worker failed outside a load: {proc.returncode} {err[-2000:]}")
        todo = [p for p in todo if p not in results]
    return results


def test_mutated_files_are_rejected_cleanly_or_work(seeds, tmp_path):
    rng = random.Random(13)
    cases: dict[str, tuple[str, bool]] = {}
    for k in range(N_CASES):
        src = seeds[k % len(seeds)]
        raw, kind, invalid = mutate(src.read_bytes(), rng)
        p = tmp_path / f"m{k:05d}.mq"
        p.write_bytes(raw)
        cases[str(p)] = (kind, invalid)
    results = run_worker(list(map(Path, cases)))
    bad = []
    counts: dict[str, int] = {}
    for path, (kind, invalid) in cases.items():
        r = results[path]
        counts[r["result"]] = counts.get(r["result"], 0) + 1
        if r["result"] in ("crash", "foreign error", "bad output"):
            bad.append((path, kind, r))
        elif r["result"] == "rejected" and (not r["detail"] or path not in r["detail"]):
            bad.append((path, kind, r))  # the engine's error names the file and says why
        elif invalid and r["result"] != "rejected":
            bad.append((path, kind, r))  # invalid by docs/format.md, yet loaded
    print(f"mutation test: {N_CASES} files: {counts}")
    assert not bad, f"{len(bad)} of {N_CASES} bad outcomes, first: {bad[:5]}"
    assert counts.get("rejected", 0) > 0 and counts.get("loaded", 0) > 0
