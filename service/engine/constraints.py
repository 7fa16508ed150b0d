"""Per-row grammar state for JSON output (see ``service/structured.py`` for what a schema becomes).

``Grammars`` compiles each distinct schema once (an LRU keyed by the hash of its canonical text)
into a prototype matcher; every constrained row gets a cheap copy of it (``Constraint``). Each
step the engine asks ``masks`` for the allowed tokens of the constrained rows only, as one packed
bitmask (32 tokens per int32, computed for all rows at once by llguidance's thread pool), and the
sampler (``sampling.apply_token_bitmask``) sets their other logits to -inf. After the draw
``Constraint.advance`` feeds the chosen token to the row's matcher. The matcher allows EOS only
where the grammar accepts, so a row ends either with complete JSON or with ``length``.

Vocabulary sizes: the grammar's vocabulary is the larger of the tokenizer's and the model's. Model
ids the tokenizer has no token for (a padded output layer) are never allowed; tokenizer ids past
the model's output size are dropped from the mask (the model cannot emit them).
"""

from __future__ import annotations

from collections import OrderedDict

import llguidance
import llguidance.hf
import numpy as np

from service import structured

MAX_GRAMMARS = 64  # compiled schemas kept; the least recently used one is dropped first


class Constraint:
    """One row's position in its grammar."""

    def __init__(self, matcher: llguidance.LLMatcher):
        self.matcher = matcher

    def advance(self, token: int) -> str | None:
        """Feed the token the row generated; None, or why the grammar refused it (the mask allowed
        only what it accepts, so a refusal is a defect: it fails this row alone)."""
        if self.matcher.consume_token(token):
            return None
        return f"the JSON grammar refused token {token}: {self.matcher.get_error()}"

    @property
    def accepting(self) -> bool:
        return self.matcher.is_accepting()


class Grammars:
    """Compiled schemas for one tokenizer and model vocabulary (the grammar tokenizer is built on
    first use: ~0.6 s). Used from the engine's one thread, like the rest of the engine."""

    def __init__(self, tokenizer, model_vocab: int, eos_ids: set[int], max_grammars: int = MAX_GRAMMARS):
        self._hf = tokenizer
        self.model_vocab = model_vocab
        self._eos = sorted(eos_ids)
        self.max_grammars = max_grammars
        self._tok: llguidance.LLTokenizer | None = None
        self._executor: llguidance.LLExecutor | None = None
        self._cache: OrderedDict[str, llguidance.LLMatcher] = OrderedDict()
        self.compiled = 0  # schemas compiled so far (cache misses)

    @property
    def tokenizer(self) -> llguidance.LLTokenizer:
        if self._tok is None:
            n_vocab = max(len(self._hf), self.model_vocab)
            self._tok = llguidance.hf.from_tokenizer(self._hf, n_vocab=n_vocab, eos_token=self._eos or None)
        return self._tok

    @property
    def mask_words(self) -> int:
        """int32 words per row of a bitmask."""
        return (self.tokenizer.vocab_size + 31) // 32

    def _prototype(self, text: str) -> llguidance.LLMatcher:
        key = structured.schema_key(text)
        proto = self._cache.get(key)
        if proto is not None:
            self._cache.move_to_end(key)
            return proto
        matcher = llguidance.LLMatcher(self.tokenizer, structured.grammar(text), log_level=0)
        if matcher.is_error():
            raise structured.SchemaError(f"unsupported or invalid JSON schema: {matcher.get_error()}")
        self.compiled += 1
        self._cache[key] = matcher
        while len(self._cache) > self.max_grammars:
            self._cache.popitem(last=False)
        return matcher

    def check(self, text: str) -> None:
        """Compile (or find) a schema; SchemaError (a ValueError) if the grammar cannot be built."""
        self._prototype(text)

    def start(self, text: str) -> Constraint:
        """A fresh constraint at the start of the schema's grammar."""
        return Constraint(self._prototype(text).deep_copy())

    def masks(self, constraints: list[Constraint]) -> np.ndarray:
        """Packed allowed-token bitmasks ``[len(constraints), mask_words]`` (int32, bit i of word w
        is token 32 * w + i), computed in parallel."""
        out = np.zeros((len(constraints), self.mask_words), dtype=np.int32)
        if self._executor is None:
            self._executor = llguidance.LLExecutor()
        self._executor.unsafe_compute_mask_ptr(
            [(c.matcher, i) for i, c in enumerate(constraints)], out.ctypes.data, out.shape[1] * 4, len(out)
        )
        return out
