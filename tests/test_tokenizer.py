"""Golden tokenizer tests: the engine's tokenizers (through the binding, from .mq files written by the
converter) against the reference libraries — `tokenizers` for byte-level BPE, `sentencepiece` for
SentencePiece BPE, `tiktoken` with the Llama-3 pattern — on an edge-case list and on the eval texts."""
from __future__ import annotations

import base64
import json
import os
import random
from pathlib import Path
from typing import Callable

import pytest

from mergequant import _engine
from mergequant.convert.tokenizer import QWEN2_PATTERN, LLAMA3_PATTERN, TokenizerExportError, write_tokenizer_mq

# HF-style names the converter looks for → the files of tokenizers/<family>/ that play them
FAMILIES: dict[str, dict[str, str]] = {
    "smollm2": {"tokenizer.json": "tokenizer.json", "config.json": "config.json"},
    "llama2": {"tokenizer.model": "tokenizer.model", "tokenizer_config.json": "tokenizer_config.llama2-hf.json"},
    "mistral7b": {"tokenizer.model": "tokenizer.model", "tokenizer_config.json": "tokenizer_config.json"},
    "stories260K": {"tokenizer.model": "tok512.model"},
    "llama3": {"tokenizer.model": "tokenizer.model", "tokenizer_config.json": "tokenizer_config.WebR-modified.json"},
    "qwen2": {"vocab.json": "vocab.json", "merges.txt": "merges.txt", "added_tokens.json": "added_tokens.json",
              "config.json": "config.json", "tokenizer_config.json": "tokenizer_config.qwen2.5.json"},
}


def edge_cases() -> list[str]:
    cases = ["", " ", "  ", "   ", "\t", "\t\t x", "\n", "\n\n", "\n\n\n\n", "\r\n", " \n \n", "a\n\n\nb",
             " leading", "  two leading", "trailing ", "trailing  ", "Hello world", "hello   world",
             "...", "!!!???", "--==>>", "a,b.c;d:e", "(parenthesised) [bracketed] {braced}", "$$$ 100%",
             "I'm", "you're", "we've", "they'll", "she'd", "don't", "DON'T", "I'M", "'s 't 're", "''''",
             "it's 'quoted'", "naïve café", "Привет, мир!", "Съешь же ещё этих мягких булок", "日本語のテキスト",
             "中文测试，标点。", "한국어 텍스트", "ភាសាខ្មែរ", "ក្រុងភ្នំពេញ", "مرحبا بالعالم", "שלום עולם",
             "🙂", "👨‍👩‍👧‍👦 family", "🏳️‍🌈", "a🙂b", "mixed English русский 中文 ខ្មែរ 123",
             "x² + y³ = ½", "١٢٣ ٤٥٦", "ǅ ǈ Ⅻ", "\u00a0nbsp\u2003em\u3000ideographic", "zero\u200bwidth",
             "tabs\tand\tspaces  \t ", "CamelCaseIdentifier snake_case_identifier", "http://example.com/a?b=c&d=e",
             "<html><body>&amp;</body></html>", "def f(x):\n    return x * 2\n", "'ſ", "a'S 'Ll"]
    cases += ["".join(str((k + i) % 10) for k in range(n)) for n in range(1, 13) for i in (1, 7)]
    cases += [f"x{n}y" for n in (1, 12, 123, 1234, 12345)] + ["3.14159", "1,000,000", "2024-05-29"]
    return cases


def shared_root() -> Path:
    env = os.environ.get("MERGEQUANT_SHARED")
    return (Path(env) if env else Path(__file__).resolve().parents[2] / "shared") / "data"


def eval_texts(data: Path, with_jsonl: bool = False) -> list[tuple[str, str]]:
    """(name, text) of every plain-text file in eval/ (.txt, .raw), and the .jsonl files when asked
    (15 MB more: read whole for the default model's tokenizer only, to keep the run short)."""
    suffixes = (".txt", ".raw", ".jsonl") if with_jsonl else (".txt", ".raw")
    return [(p.name, p.read_text(encoding="utf-8")) for p in sorted((data / "eval").iterdir())
            if p.suffix in suffixes]


def chunks(text: str, n_lines: int = 400) -> list[str]:
    lines = text.splitlines(keepends=True)
    return ["".join(lines[i:i + n_lines]) for i in range(0, len(lines), n_lines)]


class Reference:
    """ids of text without BOS/EOS under the reference library; special: match special-token text."""

    def __init__(self, family: str, src: Path) -> None:
        self.family = family
        if family == "smollm2":
            from tokenizers import Tokenizer
            self.hf = Tokenizer.from_file(str(src / "tokenizer.json"))
        elif family == "qwen2":
            self.hf = self._qwen2(src)
        elif family == "llama3":
            self.tt = self._tiktoken(src)
        else:
            import sentencepiece as spm
            self.sp = spm.SentencePieceProcessor(model_file=str(src / "tokenizer.model"))
            self.specials = sorted({self.sp.id_to_piece(i) for i in range(self.sp.get_piece_size())
                                    if self.sp.is_control(i) or self.sp.is_unknown(i)} - {""}, key=len, reverse=True)

    @staticmethod
    def _qwen2(src: Path):
        # Qwen2's tokenizer.json, rebuilt from vocab.json + merges.txt: NFC, the Qwen2 split, byte-level BPE
        from tokenizers import AddedToken, Regex, Tokenizer, decoders, models, normalizers, pre_tokenizers
        tok = Tokenizer(models.BPE.from_file(str(src / "vocab.json"), str(src / "merges.txt")))
        tok.normalizer = normalizers.NFC()
        tok.pre_tokenizer = pre_tokenizers.Sequence([
            pre_tokenizers.Split(Regex(QWEN2_PATTERN), behavior="isolated"),
            pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)])
        tok.decoder = decoders.ByteLevel()
        added = json.loads((src / "added_tokens.json").read_text())
        tok.add_special_tokens([AddedToken(t, special=True, normalized=False) for t in sorted(added, key=added.get)])
        return tok

    @staticmethod
    def _tiktoken(src: Path):
        import tiktoken
        ranks = {base64.b64decode(tok): int(rank) for tok, rank in
                 (line.split() for line in (src / "tokenizer.model").read_text().splitlines() if line)}
        cfg = json.loads((src / "tokenizer_config.json").read_text())
        special = {v["content"]: int(k) for k, v in cfg["added_tokens_decoder"].items()}
        return tiktoken.Encoding("llama3", pat_str=LLAMA3_PATTERN, mergeable_ranks=ranks, special_tokens=special)

    def encode(self, text: str, special: bool) -> list[int]:
        if hasattr(self, "hf"):
            self.hf.encode_special_tokens = not special
            return self.hf.encode(text, add_special_tokens=False).ids
        if hasattr(self, "tt"):
            return self.tt.encode(text, allowed_special="all" if special else set(), disallowed_special=())
        if not special:
            return self.sp.encode(text)
        # SentencePiece does not parse special tokens: split them off and encode the pieces between
        # (each piece gets the dummy prefix, as Hugging Face's legacy Llama tokenizer and llama.cpp do)
        out: list[int] = []
        i = start = 0
        while i < len(text):
            hit = next((s for s in self.specials if text.startswith(s, i)), None)
            if hit is None:
                i += 1
                continue
            if i > start:
                out += self.sp.encode(text[start:i])
            out.append(self.sp.piece_to_id(hit))
            i += len(hit)
            start = i
        if start < len(text):
            out += self.sp.encode(text[start:])
        return out

    def encode_batch(self, texts: list[str]) -> list[list[int]]:
        if hasattr(self, "hf"):
            self.hf.encode_special_tokens = True
            return [e.ids for e in self.hf.encode_batch(texts, add_special_tokens=False)]
        if hasattr(self, "tt"):
            return self.tt.encode_ordinary_batch(texts)
        return self.sp.encode(texts)


def family_dir(data: Path, family: str, out: Path) -> Path:
    src = data / "tokenizers" / family
    if not src.is_dir():
        pytest.skip(f"{src} is absent")
    out.mkdir(parents=True, exist_ok=True)
    for name, real in FAMILIES[family].items():
        if not (out / name).exists():
            (out / name).symlink_to(src / real)
    return out


@pytest.fixture(scope="module")
def tokenizer(tmp_path_factory: pytest.TempPathFactory) -> Callable[[str], tuple]:
    """family → (engine Tokenizer, Reference), converted once per module."""
    data = shared_root()
    if not (data / "tokenizers").is_dir():
        pytest.skip(f"shared data directory {data} is absent (set MERGEQUANT_SHARED)")
    made: dict[str, tuple] = {}

    def get(family: str):
        if family not in made:
            d = family_dir(data, family, tmp_path_factory.mktemp(family))
            mq = d.parent / f"{family}.mq"
            write_tokenizer_mq(d, mq)
            made[family] = (_engine.Tokenizer(str(mq)), Reference(family, d))
        return made[family]
    return get


@pytest.mark.parametrize("family", list(FAMILIES))
@pytest.mark.parametrize("special", [False, True])
def test_edge_cases_match_reference(tokenizer, family: str, special: bool) -> None:
    tok, ref = tokenizer(family)
    specials = {"smollm2": "<|im_start|>", "qwen2": "<|im_start|>", "llama3": "<|begin_of_text|>"}.get(family, "<s>")
    ends = {"smollm2": "<|im_end|>", "qwen2": "<|im_end|>", "llama3": "<|eot_id|>"}.get(family, "</s>")
    texts = edge_cases() + [f"{specials}user\nHi{ends}", f" {specials} x {ends} ", f"{specials}{ends}",
                            f"a{specials}", f"{ends}\n\n{specials}assistant"]
    for text in texts:
        assert tok.encode(text, add_special=False, special=special) == ref.encode(text, special), (family, text)


@pytest.mark.parametrize("family", list(FAMILIES))
def test_eval_texts_match_reference(tokenizer, family: str) -> None:
    tok, ref = tokenizer(family)
    for name, text in eval_texts(shared_root(), with_jsonl=family == "smollm2"):
        parts = chunks(text)
        expected = ref.encode_batch(parts)
        for k, (part, ids) in enumerate(zip(parts, expected)):
            assert tok.encode(part, add_special=False, special=False) == ids, (family, name, k)


@pytest.mark.parametrize("family", list(FAMILIES))
def test_decode_roundtrip(tokenizer, family: str) -> None:
    tok, _ = tokenizer(family)
    for text in edge_cases() + [t[:20000] for _, t in eval_texts(shared_root())]:
        if family == "stories260K" and text != " ".join(w for w in text.split(" ") if w):
            continue  # its SentencePiece model drops leading, trailing and repeated spaces: lossy by design
        assert tok.decode(tok.encode(text, add_special=True, special=False)) == text, (family, text[:80])


def test_bos_eos_and_special_settings(tokenizer) -> None:
    llama2, _ = tokenizer("llama2")
    assert (llama2.bos_id, llama2.eos_id, llama2.add_bos) == (1, 2, True)
    assert llama2.encode("Hello", add_special=True)[0] == 1
    assert llama2.encode("Hello", add_special=False)[0] != 1
    llama3, _ = tokenizer("llama3")
    assert llama3.bos_id == 128000 and llama3.add_bos
    assert 128009 in llama3.eot_ids  # <|eot_id|> ends an assistant turn
    smol, _ = tokenizer("smollm2")
    assert not smol.add_bos and smol.encode("Hi", add_special=True) == smol.encode("Hi", add_special=False)
    # control tokens are text unless parse_special; they decode to text only when asked
    assert smol.encode("<|im_end|>", add_special=False, special=True) == [2]
    assert 2 not in smol.encode("<|im_end|>", add_special=False, special=False)
    assert smol.decode([2]) == "" and smol.decode([2], special=True) == "<|im_end|>"
    assert smol.token_to_piece(2) == b"<|im_end|>"


def test_spm_decode_bytes_and_spaces(tokenizer) -> None:
    tok, ref = tokenizer("llama2")
    text = "  two spaces, a tab\tand 🙂 (byte fallback)"
    ids = tok.encode(text, add_special=True)
    assert tok.decode(ids) == ref.sp.decode(ids[1:]) == text
    assert tok.token_to_piece(ref.sp.piece_to_id("<0x0A>")) == b"\n"
    assert tok.token_to_piece(ref.sp.piece_to_id("▁Hello")) == b" Hello"


def test_gguf_vocab_matches_tokenizer_json(smollm2_gguf_path: Path, tokenizer, tmp_path: Path) -> None:
    """The default model's GGUF vocabulary exports to the same tokenizer as SmolLM2's tokenizer.json."""
    mq = tmp_path / "smollm2-gguf.mq"
    write_tokenizer_mq(smollm2_gguf_path, mq)
    tok = _engine.Tokenizer(str(mq))
    _, ref = tokenizer("smollm2")
    assert "<|im_start|>" in tok.chat_template and tok.eos_id == 2
    for text in edge_cases() + [t[:50000] for _, t in eval_texts(shared_root())]:
        assert tok.encode(text, add_special=False, special=True) == ref.encode(text, True), text[:80]


def test_unknown_pre_tokenizer_is_refused(tmp_path: Path) -> None:
    vocab = {"a": 0, "b": 1, "ab": 2}
    tj = {"version": "1.0", "added_tokens": [], "normalizer": None, "post_processor": None,
          "pre_tokenizer": {"type": "Sequence", "pretokenizers": [{"type": "Whitespace"}, {"type": "ByteLevel",
                            "add_prefix_space": False, "trim_offsets": True, "use_regex": True}]},
          "decoder": None, "model": {"type": "BPE", "vocab": vocab, "merges": ["a b"]}}
    (tmp_path / "tokenizer.json").write_text(json.dumps(tj))
    with pytest.raises(TokenizerExportError, match="unsupported pre_tokenizer"):
        write_tokenizer_mq(tmp_path, tmp_path / "out.mq")


def stream(tok, ids: list[int], stops: list[str] = ()) -> tuple[list[str], bool]:
    dec = tok.stream_decoder(list(stops))
    out = [dec.push(i) for i in ids]
    out.append(dec.flush())
    return out, dec.stopped


@pytest.mark.parametrize("family", ["smollm2", "llama2", "llama3"])
def test_stream_decoder_matches_decode(tokenizer, family: str) -> None:
    tok, _ = tokenizer(family)
    for text in ["👨‍👩‍👧‍👦 family 日本語のテキスト ភាសាខ្មែរ", " leading space", "a🙂b\n\nend"]:
        ids = tok.encode(text, add_special=False)
        pieces, stopped = stream(tok, ids)  # each piece is a str: the binding refuses invalid UTF-8
        assert "".join(pieces) == tok.decode(ids) == text and not stopped


def test_stream_decoder_holds_partial_utf8_and_stops(tokenizer) -> None:
    tok, _ = tokenizer("smollm2")
    emoji = tok.encode("🙂", add_special=False)
    assert len(emoji) > 1  # byte-level pieces of one character
    pieces, _ = stream(tok, emoji)
    assert pieces[:-2] == [""] * (len(emoji) - 1) and "".join(pieces) == "🙂"

    ids = tok.encode("Sure. User: more", add_special=False)
    pieces, stopped = stream(tok, ids, ["\nUser:", "User:"])
    assert stopped and "".join(pieces) == "Sure. "
    # a possible stop prefix is held back and released by flush when the stop never completes
    ids = tok.encode("Answer\nUs", add_special=False)
    pieces, stopped = stream(tok, ids, ["\nUser:"])
    assert not stopped and "".join(pieces[:-1]) == "Answer" and pieces[-1] == "\nUs"


def test_stream_decoder_random_ids_are_valid_utf8(tokenizer) -> None:
    tok, _ = tokenizer("smollm2")
    rng = random.Random(0)
    ids = [rng.randrange(tok.n_vocab) for _ in range(3000)]
    pieces, _ = stream(tok, ids)
    assert "".join(pieces).encode("utf-8")  # every piece decoded as str already: no broken UTF-8
