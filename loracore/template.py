"""The prompt template shared by training and serving.

GPT-2 has no chat template, so we define one plain-text format (``PromptTemplate``). A base that
ships a Jinja ``chat_template`` (Llama-family instruct models) is rendered with its own
(``ChatTemplate``). The template used is recorded in every adapter folder (``loraserve.json``).
Which one the server uses: the base's own when it has one, else the adapter's recorded one, else
``DEFAULT_TEMPLATE`` (``choose_template``).
Rendering returns *segments*: text plus a flag saying whether the model is trained on it, so
the trainer can mask the prompt by position and the server can stop where the response starts.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass
from datetime import datetime
from functools import lru_cache
from pathlib import Path
from typing import Any


@dataclass(frozen=True)
class PromptTemplate:
    name: str = "human-assistant-v1"
    system: str = "{content}\n"
    user: str = "Human: {content}\n"
    # The assistant turn is split so that "Assistant:" belongs to the prompt and the answer,
    # which starts after the space, is what the model learns (followed by EOS).
    assistant_prefix: str = "Assistant:"
    assistant_answer: str = " {content}"
    turn_separator: str = "\n"

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> PromptTemplate:
        known = {k: v for k, v in data.items() if k in cls.__dataclass_fields__}
        return cls(**known)

    @classmethod
    def checked(cls, data: Any) -> PromptTemplate:
        """A template a user wrote (``python -m trainer train --template``): a named object of string
        fields, unknown keys refused, ``{content}`` in each turn that holds text; fields left out keep
        the default template's. Raises ValueError naming the problem."""
        if not isinstance(data, dict):
            raise ValueError(f"a prompt template is a JSON object, not {type(data).__name__}")
        unknown = sorted(set(data) - set(cls.__dataclass_fields__))
        if unknown:
            raise ValueError(
                f"unknown prompt template key {unknown[0]!r} (known: {', '.join(cls.__dataclass_fields__)})"
            )
        for key, value in data.items():
            if not isinstance(value, str):
                raise ValueError(f"prompt template key {key!r} must be a string")
        if not data.get("name", "").strip():
            raise ValueError("a prompt template needs a 'name' (it is recorded with the adapter)")
        template = cls(**data)
        for key in ("system", "user", "assistant_answer"):
            text = getattr(template, key)
            try:
                rendered = text.format(content="\0")
            except (KeyError, IndexError, ValueError) as exc:
                raise ValueError(
                    f"prompt template key {key!r}: only {{content}} may be in braces ({exc})"
                ) from None
            if "\0" not in rendered:
                raise ValueError(f"prompt template key {key!r} must contain {{content}}")
        return template

    def render_prompt(self, prompt: str) -> str:
        """A single-turn prompt, ready for generation (the model continues after ``Assistant:``)."""
        return self.user.format(content=prompt) + self.assistant_prefix

    def render_chat(self, messages: list[dict[str, str]]) -> list[tuple[str, bool]]:
        """Render a conversation into (text, trainable) segments.

        Every assistant answer is trainable unless the message has ``"weight": 0``; the caller appends
        EOS after the last one. A conversation that ends on a user turn renders as a generation prompt.
        """
        segments: list[tuple[str, bool]] = []
        for i, msg in enumerate(messages):
            role, content = msg["role"], msg["content"]
            if role == "system":
                segments.append((self.system.format(content=content), False))
            elif role == "user":
                segments.append((self.user.format(content=content), False))
            elif role == "assistant":
                segments.append((self.assistant_prefix, False))
                trained = msg.get("weight", 1) != 0
                segments.append((self.assistant_answer.format(content=content), trained))
                if i != len(messages) - 1:
                    segments.append((self.turn_separator, False))
            else:
                raise ValueError(f"unknown role {role!r} (expected system, user or assistant)")
        if not messages or messages[-1]["role"] != "assistant":
            segments.append((self.assistant_prefix, False))
        return segments

    def render_chat_prompt(self, messages: list[dict[str, str]]) -> str:
        """A conversation as a generation prompt (for chat completions)."""
        if messages and messages[-1]["role"] == "assistant":
            raise ValueError("the last message must not be from the assistant")
        return "".join(text for text, _ in self.render_chat(messages))

    def turn_stops(self) -> list[str]:
        """Where the template would start the next user turn: a chat reply ends there."""
        user_head = self.user.partition("{content}")[0].rstrip()
        return [self.turn_separator + user_head] if user_head else []

    def answer_prefix(self) -> str:
        """What the template puts between ``Assistant:`` and the answer (a space): not part of the reply."""
        return self.assistant_answer.partition("{content}")[0]


DEFAULT_TEMPLATE = PromptTemplate()


class ChatTemplate:
    """A base model's own Jinja ``chat_template`` (``tokenizer_config.json`` or ``chat_template.jinja``),
    with the same interface as ``PromptTemplate``.

    Rendering follows ``transformers``' ``apply_chat_template``: a sandboxed Jinja environment with
    ``trim_blocks``/``lstrip_blocks``, ``raise_exception``, ``tojson`` and ``strftime_now``, and
    ``messages``, ``add_generation_prompt``, ``bos_token``, ``eos_token`` as variables. Training
    segments come from rendering the conversation up to each assistant turn: the text a turn adds
    after the generation prompt (its answer and the template's end-of-turn marker) is what the model
    learns. A template that rewrites earlier turns as later ones are added (the rendering of the
    shorter conversation is not a prefix of the longer one) cannot be split that way: ValueError.
    """

    def __init__(
        self, source: str, *, name: str = "base-chat-template", bos_token: str = "", eos_token: str = ""
    ):
        self.source = source
        self.name = name
        self.bos_token = bos_token or ""
        self.eos_token = eos_token or ""
        self._compiled = _compile(source)

    def to_dict(self) -> dict[str, Any]:
        return {
            "name": self.name,
            "chat_template": self.source,
            "bos_token": self.bos_token,
            "eos_token": self.eos_token,
        }

    def _render(self, messages: list[dict[str, str]], add_generation_prompt: bool) -> str:
        plain = [{"role": m["role"], "content": m["content"]} for m in messages]
        return self._compiled.render(
            messages=plain,
            add_generation_prompt=add_generation_prompt,
            bos_token=self.bos_token,
            eos_token=self.eos_token,
        )

    def render_prompt(self, prompt: str) -> str:
        return self._render([{"role": "user", "content": prompt}], True)

    def render_chat(self, messages: list[dict[str, str]]) -> list[tuple[str, bool]]:
        for msg in messages:
            if msg["role"] not in ("system", "user", "assistant"):
                raise ValueError(f"unknown role {msg['role']!r} (expected system, user or assistant)")
        segments: list[tuple[str, bool]] = []
        done = ""  # the text the segments cover so far
        for i, msg in enumerate(messages):
            if msg["role"] != "assistant":
                continue
            prompt = self._render(messages[:i], True)
            full = self._render(messages[: i + 1], False)
            if not (prompt.startswith(done) and full.startswith(prompt)):
                raise ValueError(
                    f"the chat template {self.name!r} renders earlier turns differently once later ones "
                    "are added, so the answers cannot be told apart from the prompt"
                )
            segments.append((prompt[len(done) :], False))
            segments.append((full[len(prompt) :], msg.get("weight", 1) != 0))
            done = full
        if not messages or messages[-1]["role"] != "assistant":
            rest = self._render(messages, True)
            if not rest.startswith(done):
                raise ValueError(f"the chat template {self.name!r} is not prefix-stable")
            segments.append((rest[len(done) :], False))
        return [(text, trained) for text, trained in segments if text or trained]

    def render_chat_prompt(self, messages: list[dict[str, str]]) -> str:
        if messages and messages[-1]["role"] == "assistant":
            raise ValueError("the last message must not be from the assistant")
        return self._render(messages, True)

    def turn_stops(self) -> list[str]:
        """A chat reply ends where the template's end-of-turn marker starts (besides the base's EOS)."""
        end = self.turn_end()
        return [end] if end else []

    def answer_prefix(self) -> str:
        """Nothing between the generation prompt and the answer is the template's own."""
        return ""

    def turn_end(self) -> str:
        """The text the template puts right after an assistant answer, stripped (ChatML:
        ``<|im_end|>``); "" when it cannot be told."""
        mark = "\x00answer\x00"
        try:
            text = self._render(
                [{"role": "user", "content": "q"}, {"role": "assistant", "content": mark}], False
            )
        except Exception:
            return ""
        return text.partition(mark)[2].strip()


Template = PromptTemplate | ChatTemplate


def template_from_dict(data: dict[str, Any]) -> Template:
    """A recorded template (``loraserve.json``): a base's Jinja template when it holds one."""
    if isinstance(data.get("chat_template"), str):
        return ChatTemplate(
            data["chat_template"],
            name=str(data.get("name") or "base-chat-template"),
            bos_token=str(data.get("bos_token") or ""),
            eos_token=str(data.get("eos_token") or ""),
        )
    return PromptTemplate.from_dict(data)


def _token_text(value: Any) -> str:
    """A special token as ``tokenizer_config.json`` writes it: a string or ``{"content": ...}``."""
    if isinstance(value, dict):
        value = value.get("content")
    return value if isinstance(value, str) else ""


def base_chat_template(model_dir: str | Path) -> ChatTemplate | None:
    """The base folder's own chat template, or None when it has none (GPT-2). Read from
    ``chat_template.jinja`` (how ``transformers`` 5 saves it) or ``tokenizer_config.json``'s
    ``chat_template`` (a string, or a list of named ones: the ``default`` one)."""
    folder = Path(model_dir)
    try:
        config = json.loads((folder / "tokenizer_config.json").read_text(encoding="utf-8"))
    except (OSError, ValueError):
        config = {}
    if not isinstance(config, dict):
        config = {}
    source = None
    jinja_file = folder / "chat_template.jinja"
    if jinja_file.is_file():
        source = jinja_file.read_text(encoding="utf-8")
    else:
        raw = config.get("chat_template")
        if isinstance(raw, list):
            raw = next(
                (t.get("template") for t in raw if isinstance(t, dict) and t.get("name") == "default"), None
            )
        source = raw if isinstance(raw, str) else None
    if not source:
        return None
    return ChatTemplate(
        source,
        name=f"{folder.name}:chat_template",
        bos_token=_token_text(config.get("bos_token")),
        eos_token=_token_text(config.get("eos_token")),
    )


@lru_cache(maxsize=32)
def _compile(source: str):
    from jinja2.exceptions import TemplateError
    from jinja2.ext import loopcontrols
    from jinja2.sandbox import ImmutableSandboxedEnvironment

    def raise_exception(message):
        raise TemplateError(message)

    def tojson(x, ensure_ascii=False, indent=None, separators=None, sort_keys=False):
        return json.dumps(
            x, ensure_ascii=ensure_ascii, indent=indent, separators=separators, sort_keys=sort_keys
        )

    def strftime_now(fmt):
        return datetime.now().strftime(fmt)

    env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True, extensions=[loopcontrols])
    env.filters["tojson"] = tojson
    env.globals["raise_exception"] = raise_exception
    env.globals["strftime_now"] = strftime_now
    return env.from_string(source)


def choose_template(base: Template | None, recorded: dict[str, Any] | None) -> Template:
    """The serving rule: the base's own chat template, else the adapter's recorded one, else the default."""
    if base is not None:
        return base
    if recorded is not None:
        try:
            return template_from_dict(recorded)
        except Exception:  # a broken record (bad Jinja) falls back: the folder is still servable
            return DEFAULT_TEMPLATE
    return DEFAULT_TEMPLATE
