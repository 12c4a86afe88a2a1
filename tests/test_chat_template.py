"""Chat templates: the Python jinja2 rendering of each template in shared/data/tokenizers against the
prompt text its format specifies (written out by hand below), and the engine's native formatting against
the Python rendering."""
from __future__ import annotations

import json
import os
from functools import lru_cache
from pathlib import Path

import pytest

from mergequant import _engine
from mergequant.chat_template import ChatTemplateError, render_chat_template

SYSTEM = {"role": "system", "content": "You are terse."}
TURNS = [{"role": "user", "content": "Hi!"}, {"role": "assistant", "content": "Hello."},
         {"role": "user", "content": "What is 2+2?"}]
CONVERSATION = [SYSTEM] + TURNS

CHATML = ("<|im_start|>system\nYou are terse.<|im_end|>\n<|im_start|>user\nHi!<|im_end|>\n"
          "<|im_start|>assistant\nHello.<|im_end|>\n<|im_start|>user\nWhat is 2+2?<|im_end|>\n"
          "<|im_start|>assistant\n")
LLAMA3 = ("<|begin_of_text|><|start_header_id|>system<|end_header_id|>\n\nYou are terse.<|eot_id|>"
          "<|start_header_id|>user<|end_header_id|>\n\nHi!<|eot_id|>"
          "<|start_header_id|>assistant<|end_header_id|>\n\nHello.<|eot_id|>"
          "<|start_header_id|>user<|end_header_id|>\n\nWhat is 2+2?<|eot_id|>"
          "<|start_header_id|>assistant<|end_header_id|>\n\n")
LLAMA2 = "<s>[INST] <<SYS>>\nYou are terse.\n<</SYS>>\n\nHi! [/INST] Hello. </s><s>[INST] What is 2+2? [/INST]"
MISTRAL = "<s>[INST] Hi! [/INST]Hello.</s> [INST] What is 2+2? [/INST]"
ZEPHYR = ("<|system|>\nYou are terse.</s>\n<|user|>\nHi!</s>\n<|assistant|>\nHello.</s>\n<|user|>\nWhat is 2+2?</s>\n"
          "<|assistant|>\n")
# HuggingFaceH4/zephyr-7b-beta's template (no file of it in the shared data)
ZEPHYR_TEMPLATE = ("{% for message in messages %}\n{% if message['role'] == 'user' %}\n{{ '<|user|>\n' + "
                   "message['content'] + eos_token }}\n{% elif message['role'] == 'system' %}\n{{ '<|system|>\n' + "
                   "message['content'] + eos_token }}\n{% elif message['role'] == 'assistant' %}\n{{ '<|assistant|>\n'"
                   "  + message['content'] + eos_token }}\n{% endif %}\n{% if loop.last and add_generation_prompt %}\n"
                   "{{ '<|assistant|>' }}\n{% endif %}\n{% endfor %}")
SMOLLM2_DEFAULT_SYSTEM = "You are a helpful AI assistant named SmolLM, trained by Hugging Face"


def tokenizers_dir() -> Path:
    env = os.environ.get("MERGEQUANT_SHARED")
    path = (Path(env) if env else Path(__file__).resolve().parents[2] / "shared") / "data" / "tokenizers"
    if not path.is_dir():
        pytest.skip(f"{path} is absent (set MERGEQUANT_SHARED)")
    return path


def template(rel: str) -> str:
    return json.loads((tokenizers_dir() / rel).read_text(encoding="utf-8"))["chat_template"]


@lru_cache(maxsize=1)
def smollm2_template(smollm2_gguf_path: Path) -> str:
    import gguf
    return gguf.GGUFReader(str(smollm2_gguf_path)).fields["tokenizer.chat_template"].contents()


# (template source, bos, eos, expected rendering of CONVERSATION with a generation prompt)
CASES = {
    "qwen2.5": ("qwen2/tokenizer_config.qwen2.5.json", "", "<|im_end|>", CHATML),
    "qwen2-finetune": ("qwen2/tokenizer_config.boundless-finetune.json", "", "<|im_end|>", CHATML),
    "llama3": ("llama3/chat_template.mistralrs-llama3.json", "<|begin_of_text|>", "<|eot_id|>", LLAMA3),
    "llama3-config": ("llama3/tokenizer_config.WebR-modified.json", "<|begin_of_text|>", "<|eot_id|>", LLAMA3),
    "llama2": ("llama2/chat_template.mistralrs-llama2.json", "<s>", "</s>", LLAMA2),
}


@pytest.mark.parametrize("name", list(CASES))
def test_python_rendering_matches_format(name: str) -> None:
    rel, bos, eos, expected = CASES[name]
    text = render_chat_template(template(rel), CONVERSATION, add_generation_prompt=True, bos_token=bos, eos_token=eos)
    assert text == expected


def test_python_rendering_smollm2(smollm2_gguf_path: Path) -> None:
    tmpl = smollm2_template(smollm2_gguf_path)
    assert render_chat_template(tmpl, CONVERSATION, True) == CHATML
    # without a system message the template inserts its own
    no_system = render_chat_template(tmpl, TURNS, True)
    assert no_system == CHATML.replace("You are terse.", SMOLLM2_DEFAULT_SYSTEM)


def test_python_rendering_mistral_and_zephyr() -> None:
    mistral = template("mistral7b/chat_template.mistralrs-mistral.json")
    assert render_chat_template(mistral, TURNS, True, bos_token="<s>", eos_token="</s>") == MISTRAL
    with pytest.raises(ChatTemplateError, match="alternate"):  # a system message breaks the alternation
        render_chat_template(mistral, CONVERSATION, True, bos_token="<s>", eos_token="</s>")
    with pytest.raises(ChatTemplateError, match="Only user and assistant roles"):
        render_chat_template(mistral, TURNS[:1] + [SYSTEM], True, bos_token="<s>", eos_token="</s>")
    assert render_chat_template(ZEPHYR_TEMPLATE, CONVERSATION, True, eos_token="</s>") == ZEPHYR


def test_template_runs_in_a_sandbox() -> None:
    with pytest.raises(ChatTemplateError):
        render_chat_template("{{ ''.__class__.__mro__[1].__subclasses__() }}", TURNS)
    with pytest.raises(ChatTemplateError):  # immutable: a template cannot modify its inputs
        render_chat_template("{% set _ = messages.append(1) %}", TURNS)
    with pytest.raises(ChatTemplateError, match="alternate"):
        render_chat_template(template("llama2/chat_template.mistralrs-llama2.json"), TURNS[:1] + TURNS[:1], True)


def all_templates(smollm2_gguf_path: Path) -> dict[str, tuple[str, str, str]]:
    out = {name: (template(rel), bos, eos) for name, (rel, bos, eos, _) in CASES.items()}
    out["smollm2"] = (smollm2_template(smollm2_gguf_path), "", "<|im_end|>")
    out["mistral"] = (template("mistral7b/chat_template.mistralrs-mistral.json"), "<s>", "</s>")
    out["zephyr"] = (ZEPHYR_TEMPLATE, "", "</s>")
    return out


def test_native_formats_detected(smollm2_gguf_path: Path) -> None:
    expected = {"qwen2.5": "chatml", "qwen2-finetune": "chatml", "smollm2": "chatml", "llama3": "llama3",
                "llama3-config": "llama3", "llama2": "llama2", "mistral": "mistral", "zephyr": "zephyr"}
    got = {name: _engine.chat_format(t) for name, (t, _, _) in all_templates(smollm2_gguf_path).items()}
    assert got == expected
    assert _engine.chat_format("{{ messages[0]['content'] }}") == "plain"


@pytest.mark.parametrize("gen", [True, False])
def test_native_formatting_matches_python(smollm2_gguf_path: Path, gen: bool) -> None:
    for name, (tmpl, bos, eos) in all_templates(smollm2_gguf_path).items():
        conversations = [TURNS, TURNS[:1], [TURNS[0] | {"content": "  padded\n"}]]
        if name not in ("mistral",):
            conversations += [CONVERSATION, [SYSTEM, TURNS[0]]]
        if name == "qwen2-finetune":  # its default system message is set in a variable: not recognised
            conversations = [c for c in conversations if c[0]["role"] == "system"]
        for msgs in conversations:
            py = render_chat_template(tmpl, msgs, gen, bos_token=bos, eos_token=eos)
            if name == "qwen2-finetune" and not gen:  # it writes the assistant header after every user turn
                continue
            assert _engine.format_chat(tmpl, msgs, gen, bos, eos) == py, (name, msgs)


def test_native_formatting_refuses_what_the_template_refuses() -> None:
    mistral = template("mistral7b/chat_template.mistralrs-mistral.json")
    with pytest.raises(ValueError, match="alternate"):
        _engine.format_chat(mistral, CONVERSATION, True, "<s>", "</s>")
    with pytest.raises(ValueError, match="Only user and assistant roles"):
        _engine.format_chat(mistral, TURNS[:1] + [SYSTEM], True, "<s>", "</s>")
    with pytest.raises(ValueError, match="alternate"):
        _engine.format_chat(template("llama2/chat_template.mistralrs-llama2.json"), TURNS[:1] * 2, True, "<s>", "</s>")
