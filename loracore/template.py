"""The prompt template shared by training and serving.

GPT-2 has no chat template, so we define one plain-text format, record it in every adapter
folder (``loraserve.json``) and have the server render prompts with the record it finds there.
Rendering returns *segments*: text plus a flag saying whether the model is trained on it, so
the trainer can mask the prompt by position and the server can stop where the response starts.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
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
