"""Summarise py-spy's collapsed stacks ("frame;frame;... count" lines): where the time goes."""

from __future__ import annotations

import re
from collections import Counter

_FRAME = re.compile(r"^(?P<func>.*?) \((?P<file>[^()]*?)(?::(?P<line>\d+))?\)$")


def _short(frame: str) -> str:
    """'forward (transformers/models/gpt2/modeling_gpt2.py:123)' -> 'forward (gpt2/modeling_gpt2.py)'."""
    m = _FRAME.match(frame.strip())
    if not m:
        return frame.strip()
    path = m.group("file").replace("\\", "/")
    parts = [p for p in path.split("/") if p]
    if "site-packages" in parts:
        parts = parts[parts.index("site-packages") + 1 :]
    return f"{m.group('func')} ({'/'.join(parts[-2:])})"


def summarize_collapsed(text: str, top: int = 30) -> dict:
    self_c: Counter[str] = Counter()
    incl_c: Counter[str] = Counter()
    total = 0
    for line in text.splitlines():
        stack, _, count = line.rpartition(" ")
        if not stack or not count.isdigit():
            continue
        n = int(count)
        frames = [_short(f) for f in stack.split(";") if f]
        if not frames:
            continue
        total += n
        self_c[frames[-1]] += n
        for f in set(frames):
            incl_c[f] += n

    def pct(c: Counter) -> list[dict]:
        return [{"frame": f, "share": round(n / total, 4)} for f, n in c.most_common(top)] if total else []

    return {"samples": total, "top_self": pct(self_c), "top_inclusive": pct(incl_c)}
