"""Chat templates: render a model's Jinja chat template the way Hugging Face's apply_chat_template does
(trim_blocks, lstrip_blocks, loop controls, `raise_exception`, `tojson`), inside jinja2's immutable
sandbox so that a template from a model file cannot touch anything outside its inputs."""
from __future__ import annotations

import json
from functools import lru_cache
from typing import Any, NoReturn, Optional

import jinja2
from jinja2.sandbox import ImmutableSandboxedEnvironment


class ChatTemplateError(ValueError):
    """The template is malformed or rejected the conversation (its raise_exception)."""


def _raise_exception(message: str) -> NoReturn:
    raise ChatTemplateError(message)


def _tojson(value: Any, ensure_ascii: bool = False, indent: Optional[int] = None, separators: Any = None,
            sort_keys: bool = False) -> str:
    # Hugging Face's tojson keeps non-ASCII text as is (jinja2's own escapes it for HTML)
    return json.dumps(value, ensure_ascii=ensure_ascii, indent=indent, separators=separators, sort_keys=sort_keys)


@lru_cache(maxsize=16)
def _compile(template: str) -> jinja2.Template:
    env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True, extensions=["jinja2.ext.loopcontrols"])
    env.filters["tojson"] = _tojson
    env.globals["raise_exception"] = _raise_exception
    try:
        return env.from_string(template)
    except jinja2.TemplateSyntaxError as e:
        raise ChatTemplateError(f"chat template syntax error at line {e.lineno}: {e.message}") from e


def render_chat_template(template: Optional[str], messages: list[dict[str, Any]], add_generation_prompt: bool = True,
                         bos_token: str = "", eos_token: str = "", **extra: Any) -> str:
    """The prompt text of `messages` ([{"role": ..., "content": ...}, ...]) under `template`; `extra`
    (tools, documents, ...) is passed to the template as further variables."""
    if not template:
        raise ChatTemplateError("the model file has no chat template")
    for i, m in enumerate(messages):
        if not isinstance(m, dict) or "role" not in m or "content" not in m:
            raise ChatTemplateError(f"messages[{i}] must be a dict with 'role' and 'content', got {m!r}")
    try:
        return _compile(template).render(messages=messages, add_generation_prompt=add_generation_prompt,
                                          bos_token=bos_token, eos_token=eos_token, **extra)
    except jinja2.TemplateError as e:
        raise ChatTemplateError(f"chat template failed: {e}") from e
