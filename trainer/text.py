"""Text the project accepts: Unicode strings without lone surrogates.

JSON may spell a UTF-16 surrogate on its own (``"\\ud800"``); Python decodes it into a ``str``
that no tokenizer, UTF-8 file or log line can take. Such text is refused where it enters (a
training file, an HTTP body), naming where it is, instead of failing deep inside with a
``TypeError`` or ``UnicodeEncodeError``.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Any

_SURROGATE = re.compile(r"[\ud800-\udfff]")


@dataclass(frozen=True)
class LoneSurrogate:
    param: str  # where in the value: "prompt", "messages[0].content", "" for the value itself
    position: int  # index of the surrogate in that string
    codepoint: int

    def describe(self) -> str:
        where = f"{self.param}: " if self.param else ""
        return f"{where}lone surrogate U+{self.codepoint:04X} at position {self.position} is not valid text"


def find_lone_surrogate(value: Any, param: str = "") -> LoneSurrogate | None:
    """The first lone surrogate in a decoded JSON value (strings, and keys and items of containers)."""
    if isinstance(value, str):
        found = _SURROGATE.search(value)
        return LoneSurrogate(param, found.start(), ord(found.group())) if found else None
    if isinstance(value, dict):
        for key, item in value.items():
            child = f"{param}.{key}" if param else str(key)
            hit = find_lone_surrogate(key, child) or find_lone_surrogate(item, child)
            if hit:
                return hit
    elif isinstance(value, list):
        for i, item in enumerate(value):
            hit = find_lone_surrogate(item, f"{param}[{i}]")
            if hit:
                return hit
    return None
