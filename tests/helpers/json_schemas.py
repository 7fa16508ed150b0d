"""JSON schemas the structured-output tests share."""

# Every valid output is short: on random weights each row completes well within a modest token
# budget, so the output must be complete, valid JSON.
SMALL_SCHEMA = {
    "type": "object",
    "properties": {
        "ok": {"type": "boolean"},
        "color": {"enum": ["red", "green", "blue"]},
        "n": {"type": "integer", "minimum": 0, "maximum": 99},
        "tag": {"type": "string", "maxLength": 4},
    },
    "required": ["ok", "color", "n", "tag"],
    "additionalProperties": False,
}
