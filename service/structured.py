"""JSON output constraints: the one owner of what a request's JSON schema becomes.

A request asks for JSON with a schema (OpenAI's ``response_format`` ``json_schema``, ``/generate``'s
``json_schema`` object) or for any JSON object (``json_object``, ``json_schema: true``: the schema
``{"type": "object"}``). The API side checks the schema here and sends its canonical text to the
worker; the engine (``service/engine/constraints.py``) compiles that text into a token-level grammar
once per distinct schema. Both use the same options, so a schema the API accepted compiles in the
engine.

Torch-free: llguidance is a Rust library with no Python dependencies, so API processes can check
schemas without loading the model's stack.
"""

from __future__ import annotations

import hashlib
import json
from typing import Any

import llguidance

# What json_object means: any JSON object (OpenAI's JSON mode).
JSON_OBJECT: dict[str, Any] = {"type": "object"}

# Compact JSON: no whitespace between tokens. With flexible whitespace a weak model can spend its
# whole budget on spaces and newlines; the output is the same JSON either way.
_OPTIONS: dict[str, Any] = {"whitespace_flexible": False}

GUIDANCE_KEY = "x-guidance"  # llguidance's per-schema compiler options
MAX_SCHEMA_CHARS = 64_000  # a schema's canonical text; a bigger one is refused before compiling


class SchemaError(ValueError):
    """The schema is not valid JSON Schema, or uses a keyword the grammar compiler does not support."""


def canonical(schema: Any) -> str:
    """The schema's canonical JSON text (sorted keys, no whitespace): what travels and what is cached."""
    return json.dumps(schema, sort_keys=True, separators=(",", ":"), ensure_ascii=False, allow_nan=False)


def schema_key(text: str) -> str:
    """Cache key of a canonical schema text."""
    return hashlib.sha256(text.encode()).hexdigest()


def grammar(text: str) -> str:
    """The llguidance grammar of a canonical schema text (not yet checked: see ``check``)."""
    try:
        return llguidance.LLMatcher.grammar_from_json_schema(text, defaults=dict(_OPTIONS))
    except ValueError as exc:
        raise SchemaError(f"the schema is not a JSON object schema: {exc}") from None


def check(schema: Any) -> str:
    """Canonical text of a schema the engine can enforce; SchemaError naming the problem otherwise.

    The compiler's messages name the keyword (``Unimplemented keys: ["not"]``, ``Unknown format: x``,
    ``Unsatisfiable schema: minimum (5) is greater than maximum (1)``).
    """
    if not isinstance(schema, dict):
        raise SchemaError(f"a JSON schema must be a JSON object, got {type(schema).__name__}")
    if GUIDANCE_KEY in schema:  # it would override the compiler options the server relies on
        raise SchemaError(f"the {GUIDANCE_KEY!r} keyword is not supported")
    try:
        text = canonical(schema)
    except ValueError as exc:  # NaN or Infinity: not JSON
        raise SchemaError(f"the schema is not valid JSON: {exc}") from None
    if len(text) > MAX_SCHEMA_CHARS:
        raise SchemaError(f"the schema is {len(text)} characters long; the limit is {MAX_SCHEMA_CHARS}")
    is_error, messages = llguidance.LLMatcher.validate_grammar_with_warnings(grammar(text))
    if is_error:
        raise SchemaError(f"unsupported or invalid JSON schema: {messages[0] if messages else 'rejected'}")
    return text
