"""Chat templates: turning OpenAI chat messages into one prompt.

    template = find_chat_template(tokenizer, tokenizer_model)   # the tokenizer's own, or None
    template = load_chat_template(path)                          # --chat-template FILE
    text = ChatTemplate(template, bos_token="<s>", eos_token="</s>").render(messages)

A template is a Jinja template in the format HuggingFace tokenizers carry (the `chat_template`
field of tokenizer_config.json, or a chat_template.jinja file beside it): it sees `messages` (a
list of {"role", "content"}), `add_generation_prompt` (True: the text ends where the assistant's
answer begins), `bos_token` and `eos_token`, and may call `raise_exception(message)`. It runs in
Jinja's sandbox, so a template cannot reach the server's Python objects.
"""

from __future__ import annotations

import json
import os
from typing import List, Optional

__all__ = ["ChatTemplate", "ChatTemplateError", "find_chat_template", "load_chat_template"]


class ChatTemplateError(ValueError):
    """A template that cannot be loaded or rendered (the message says which and why)."""


def _from_tokenizer_config(path: str) -> Optional[str]:
    """The chat_template of a tokenizer_config.json (a string, or a list of named templates of which
    "default" is taken), or None."""
    try:
        with open(path, encoding="utf-8") as f:
            config = json.load(f)
    except (OSError, ValueError) as exc:
        raise ChatTemplateError(f"cannot read {path}: {exc}") from None
    template = config.get("chat_template") if isinstance(config, dict) else None
    if isinstance(template, list):
        named = {t.get("name"): t.get("template") for t in template if isinstance(t, dict)}
        template = named.get("default")
    return template if isinstance(template, str) and template.strip() else None


def load_chat_template(path: str) -> str:
    """--chat-template FILE: a Jinja template file, or a tokenizer_config.json holding one."""
    if not os.path.isfile(path):
        raise ChatTemplateError(f"--chat-template {path}: no such file")
    if path.endswith(".json"):
        template = _from_tokenizer_config(path)
        if template is None:
            raise ChatTemplateError(f"--chat-template {path}: the JSON file has no chat_template field")
        return template
    with open(path, encoding="utf-8") as f:
        template = f.read()
    if not template.strip():
        raise ChatTemplateError(f"--chat-template {path} is empty")
    return template


def find_chat_template(tokenizer, tokenizer_model: Optional[str] = None) -> Optional[str]:
    """The tokenizer's own chat template: its `chat_template` attribute (a transformers tokenizer,
    also when wrapped), else a chat_template.jinja or the chat_template of tokenizer_config.json in
    the --tokenizer-model folder (or beside the tokenizer.json file); None when there is none."""
    for obj in (tokenizer, getattr(tokenizer, "_auto", None)):
        template = getattr(obj, "chat_template", None) if obj is not None else None
        if isinstance(template, str) and template.strip():
            return template
    if tokenizer_model and os.path.exists(tokenizer_model):
        folder = tokenizer_model if os.path.isdir(tokenizer_model) else os.path.dirname(tokenizer_model)
        jinja = os.path.join(folder, "chat_template.jinja")
        if os.path.isfile(jinja):
            return load_chat_template(jinja)
        config = os.path.join(folder, "tokenizer_config.json")
        if os.path.isfile(config):
            return _from_tokenizer_config(config)
    return None


class ChatTemplate:
    """A compiled chat template; render(messages) -> the prompt text."""

    def __init__(self, source: str, bos_token: str = "", eos_token: str = ""):
        from jinja2 import TemplateError
        from jinja2.sandbox import ImmutableSandboxedEnvironment

        def raise_exception(message):
            raise ChatTemplateError(f"the chat template refused the messages: {message}")

        def tojson(value, indent=None):
            return json.dumps(value, ensure_ascii=False, indent=indent)

        env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True)
        env.globals["raise_exception"] = raise_exception
        env.filters["tojson"] = tojson
        try:
            self.template = env.from_string(source)
        except TemplateError as exc:
            raise ChatTemplateError(f"the chat template does not compile: {exc}") from None
        self.source = source
        self.bos_token = bos_token
        self.eos_token = eos_token

    def render(self, messages: List[dict], add_generation_prompt: bool = True) -> str:
        from jinja2 import TemplateError

        try:
            return self.template.render(messages=messages, add_generation_prompt=add_generation_prompt,
                                        bos_token=self.bos_token, eos_token=self.eos_token)
        except ChatTemplateError:
            raise
        except (TemplateError, TypeError, ValueError, KeyError, IndexError) as exc:
            raise ChatTemplateError(f"the chat template failed on these messages: {type(exc).__name__}: {exc}") from None
