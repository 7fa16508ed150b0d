"""Token ids to text deltas, and stop strings, per row.

``Detokenizer`` turns one token at a time into text so that the deltas always concatenate to
``tokenizer.decode(all_tokens)``. For byte-level BPE (GPT-2) each token is a byte string; an
incremental UTF-8 decoder holds back a character split across tokens until its last byte arrives,
and invalid bytes become U+FFFD exactly as a one-shot decode makes them. Tokenizers that are not
byte-level fall back to decoding the whole sequence each step and emitting the new suffix.

``StopMatcher`` holds back the tail of the text that could still be the start of a stop string,
and cuts the text where a stop string begins (the stop string itself is never emitted).
"""

from __future__ import annotations

import codecs


def _bytes_to_unicode() -> dict[int, str]:
    """GPT-2's reversible byte -> printable character map (as in the original encoder.py)."""
    bs = (
        list(range(ord("!"), ord("~") + 1))
        + list(range(ord("¡"), ord("¬") + 1))
        + list(range(ord("®"), ord("ÿ") + 1))
    )
    cs = bs[:]
    n = 0
    for b in range(256):
        if b not in bs:
            bs.append(b)
            cs.append(256 + n)
            n += 1
    return dict(zip(bs, map(chr, cs), strict=True))


def byte_table(tokenizer) -> list[bytes] | None:
    """``table[id]`` = the bytes token ``id`` stands for, or None if the tokenizer is not byte-level BPE
    (or a spot check against ``tokenizer.decode`` fails)."""
    byte_of = {c: b for b, c in _bytes_to_unicode().items()}
    size = len(tokenizer)
    pieces = tokenizer.convert_ids_to_tokens(list(range(size)))
    special = set(getattr(tokenizer, "all_special_tokens", []))
    table: list[bytes] = []
    for piece in pieces:
        if piece is None:
            return None
        if piece in special:
            table.append(piece.encode("utf-8"))
            continue
        try:
            table.append(bytes(byte_of[c] for c in piece))
        except KeyError:
            return None
    # Spot check: a mixed sample, including ids that are parts of multi-byte characters.
    sample = [
        ids for ids in ([i for i in range(0, size, 997)], list(range(size - 50, size)), list(range(150, 260)))
    ]
    for ids in sample:
        expected = tokenizer.decode(ids)
        if b"".join(table[i] for i in ids).decode("utf-8", errors="replace") != expected:
            return None
    return table


class Detokenizer:
    """Incremental decoding of one row's generated tokens."""

    def __init__(self, tokenizer, table: list[bytes] | None):
        self.tokenizer = tokenizer
        self.table = table
        self.ids: list[int] = []
        self._utf8 = codecs.getincrementaldecoder("utf-8")(errors="replace") if table is not None else None
        self._emitted = ""  # fallback path: text produced so far

    def push(self, token_id: int) -> str:
        """Text completed by this token (may be "")."""
        self.ids.append(token_id)
        if self._utf8 is not None:
            return self._utf8.decode(self.table[token_id])
        text = self.tokenizer.decode(self.ids)
        # hold back a trailing replacement char: it may be a character that is still incomplete
        stable = text[:-1] if text.endswith("\ufffd") else text
        if not stable.startswith(self._emitted):  # decode is not prefix-stable here: emit nothing yet
            return ""
        delta = stable[len(self._emitted) :]
        self._emitted = stable
        return delta

    def flush(self) -> str:
        """Whatever is still held back, at the end of the sequence."""
        if self._utf8 is not None:
            return self._utf8.decode(b"", final=True)
        text = self.tokenizer.decode(self.ids)
        delta = text[len(self._emitted) :] if text.startswith(self._emitted) else ""
        self._emitted = text
        return delta


class StopMatcher:
    """Text streaming with stop strings: ``feed`` returns (text safe to emit, stopped)."""

    def __init__(self, stops: list[str]):
        self.stops = [s for s in stops if s]
        self.pending = ""  # the tail that could still be the start of a stop string

    def feed(self, text: str, final: bool = False) -> tuple[str, bool]:
        if not self.stops:
            return text, False
        pending = self.pending + text
        # A match must start inside `pending`: everything before it was emitted only because no
        # stop string could start there.
        hits = [i for i in (pending.find(s) for s in self.stops) if i >= 0]
        if hits:
            self.pending = ""
            return pending[: min(hits)], True
        if final:
            self.pending = ""
            return pending, False
        hold = 0
        for s in self.stops:
            for k in range(min(len(s) - 1, len(pending)), hold, -1):
                if pending.endswith(s[:k]):
                    hold = k
                    break
        self.pending = pending[len(pending) - hold :] if hold else ""
        return pending[: len(pending) - hold], False
