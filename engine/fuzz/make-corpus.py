#!/usr/bin/env python3
"""Seed corpora for the libFuzzer targets, from small real files:

  OUT/model-file/   tiny random Llama models (f16, w4a16g, w4a4d; byte-level BPE vocabulary) converted by
                    the converter, plus the tokenizer-only files of the small SentencePiece tokenizer
  OUT/tokenizers/   tokenizer-only .mq files of every tokenizer in ../shared/data/tokenizers (what
                    fuzz-tokenizer loads through MQ_FUZZ_TOKENIZERS)
  OUT/tokenizer/    text seeds for fuzz-tokenizer: the first lines of the evaluation texts

Usage: python3 engine/fuzz/make-corpus.py OUT   (needs the mergequant package importable)
"""
from __future__ import annotations

import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT / "tests"))

from conftest import write_tiny_hf  # noqa: E402  (the test suite's tiny checkpoint writer)
from mergequant.convert.convert import convert  # noqa: E402
from mergequant.convert.tokenizer import write_tokenizer_mq  # noqa: E402
from test_tokenizer import FAMILIES, family_dir, shared_root  # noqa: E402


def main(out: Path) -> None:
    models, toks, texts = out / "model-file", out / "tokenizers", out / "tokenizer"
    for d in (models, toks, texts):
        d.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        # smaller than the test suite's tiny model, so a mutation is cheap to load
        ck = write_tiny_hf(tmp / "hf", hidden_size=64, intermediate_size=64, num_hidden_layers=1)
        for scheme in ("f16", "w4a16g", "w4a4d"):
            convert(ck.path, models / f"tiny-{scheme}.mq", scheme=scheme, progress=False)
        data = shared_root()
        for family in FAMILIES:
            try:
                src = family_dir(data, family, tmp / family)
            except BaseException:  # the shared data is absent: pytest.skip raises outside pytest too
                continue
            write_tokenizer_mq(src, toks / f"{family}.mq")
            if (toks / f"{family}.mq").stat().st_size < 64 * 1024:
                (models / f"tokenizer-{family}.mq").write_bytes((toks / f"{family}.mq").read_bytes())
        eval_dir = data / "eval"
        for i, f in enumerate(sorted(eval_dir.glob("*"))):
            if f.suffix in (".txt", ".raw", ".jsonl"):
                with open(f, "rb") as fh:
                    for k in range(4):
                        (texts / f"{i}-{k}.txt").write_bytes(b"\x30" + fh.read(512))
    print(f"corpus in {out}: {len(list(models.iterdir()))} model files, {len(list(toks.iterdir()))} tokenizers, "
          f"{len(list(texts.iterdir()))} texts")


if __name__ == "__main__":
    if len(sys.argv) != 2:
        sys.exit(__doc__)
    main(Path(sys.argv[1]))
