"""Training data: rows in several formats -> token ids with response-only labels -> padded batches.

Accepted files: a JSON array, or JSON lines (one object per line), each row one of
    {"prompt": ..., "response": ...}           (or "completion" instead of "response")
    {"instruction": ..., "input": ..., "output": ...}                          (Alpaca)
    {"messages": [{"role": "system"|"user"|"assistant", "content": ..., "weight": 0|1}, ...]}  (chat)
    {"text": "Human: ...\nAssistant: ..."}                                     (the prototype's form)
Preference rows (``training.method: dpo``) hold one prompt and two answers, the preferred first:
    {"prompt": ..., "chosen": ..., "rejected": ...}
    {"messages": [... ending on a user turn], "chosen": ..., "rejected": ...}   (answers: strings or
                                                                            assistant messages)
    {"input": {"messages": [...]}, "preferred_output": [{"role": "assistant", "content": ...}],
     "non_preferred_output": [...]}                                  (OpenAI's preference JSONL)
Every row is rendered with the prompt template (``loracore.template``). Labels are set by
*position*: -100 on prompt tokens and on padding, the token id on response tokens and on the
EOS appended after the last answer. In chat rows every assistant message is trained unless it has
``"weight": 0`` (OpenAI's chat fine-tuning format); the EOS goes with the last answer's weight.
GPT-2's pad id equals its EOS id, so masking by id would hide
EOS and the model would never learn to stop; masking by position cannot.

Batches are padded to their own longest row (never to max_seq_length); with ``group_by_length``
rows of similar length share a batch, so little compute goes to padding.
"""

from __future__ import annotations

import json
import logging
import random
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from loracore.template import DEFAULT_TEMPLATE, Template
from trainer.errors import TrainerError
from trainer.text import find_lone_surrogate

log = logging.getLogger(__name__)

IGNORE_INDEX = -100
FORMATS = "prompt+response (or completion), instruction+output, messages, or text"
_TURN = re.compile(r"(?m)^(Human|Assistant):[ ]?")
_EOS_TEXT = "<|endoftext|>"


@dataclass(frozen=True)
class Example:
    """One parsed row: template segments ``(text, trainable)`` plus where it came from."""

    segments: list[tuple[str, bool]]
    where: str  # "file:line" (JSON lines) or "file[item]" (JSON array)
    reference: str | None = None  # the last answer, for generation metrics
    prompt_text: str | None = None  # everything before the last answer, rendered


@dataclass(frozen=True)
class PreferenceExample:
    """One parsed preference row: the rendered prompt and the two answers, each also as the template
    renders an assistant turn after that prompt (EOS appended at tokenizing), as SFT rows are."""

    prompt_text: str  # the generation prompt: ends with "Assistant:" (a base's chat template: its own)
    chosen: str  # the preferred answer, as written
    rejected: str
    where: str
    chosen_text: str  # the chosen answer rendered (" answer"; ChatML: "answer<|im_end|>\n")
    rejected_text: str

    @property
    def reference(self) -> str:
        return self.chosen


@dataclass(frozen=True)
class Row:
    input_ids: list[int]
    labels: list[int]

    @property
    def n_targets(self) -> int:
        return sum(1 for t in self.labels if t != IGNORE_INDEX)

    @property
    def n_tokens(self) -> int:
        return len(self.input_ids)

    @property
    def width(self) -> int:  # its length in a padded batch
        return len(self.input_ids)

    def rows(self) -> list[Row]:
        return [self]


@dataclass(frozen=True)
class PairRow:
    """A tokenized preference row: the prompt with the chosen answer, and with the rejected one. In a
    batch the chosen rows come first, then the rejected ones (TRL's layout)."""

    chosen: Row
    rejected: Row

    @property
    def n_targets(self) -> int:
        return self.chosen.n_targets + self.rejected.n_targets

    @property
    def n_tokens(self) -> int:
        return self.chosen.n_tokens + self.rejected.n_tokens

    @property
    def width(self) -> int:
        return max(self.chosen.width, self.rejected.width)

    def rows(self) -> list[Row]:
        return [self.chosen, self.rejected]


# ----------------------------------------------------------------------------- reading


def _records(path: Path) -> list[tuple[str, Any]]:
    """(location, parsed JSON value) for every row of a JSON array or JSON lines file."""
    if not path.is_file():
        raise TrainerError(f"data file not found: {path}")
    try:
        text = path.read_text(encoding="utf-8")
    except UnicodeDecodeError as exc:
        raise TrainerError(f"{path}: not UTF-8 text ({exc.reason} at byte {exc.start})") from None
    if text.lstrip().startswith("["):
        try:
            items = json.loads(text)
        except json.JSONDecodeError as exc:
            raise TrainerError(f"{path}:{exc.lineno}: invalid JSON ({exc.msg})") from None
        return [(f"{path}[{i}]", item) for i, item in enumerate(items)]
    out = []
    for lineno, line in enumerate(text.splitlines(), start=1):
        if not line.strip():
            continue
        try:
            out.append((f"{path}:{lineno}", json.loads(line)))
        except json.JSONDecodeError as exc:
            raise TrainerError(f"{path}:{lineno}: invalid JSON ({exc.msg} at column {exc.colno})") from None
    return out


def _str_field(row: dict, key: str, where: str, *, required: bool = True) -> str:
    value = row.get(key)
    if value is None and not required:
        return ""
    if not isinstance(value, str):
        kind = "missing" if key not in row else f"a {type(value).__name__}, not a string"
        raise TrainerError(f"{where}: field '{key}' is {kind}")
    return value


def _messages_from_text(text: str) -> list[dict[str, str]] | None:
    """``Human: q\\nAssistant: a`` (possibly several turns) -> messages; None if it has no turns."""
    text = text.removesuffix(_EOS_TEXT).rstrip("\n")
    parts = _TURN.split(text)
    if len(parts) < 3 or "Assistant" not in parts[1::2]:
        return None
    messages = []
    if parts[0].strip():
        messages.append({"role": "system", "content": parts[0].rstrip("\n")})
    for role, content in zip(parts[1::2], parts[2::2], strict=True):
        messages.append({"role": "user" if role == "Human" else "assistant", "content": content.rstrip("\n")})
    return messages


def _check_messages(messages: Any, where: str) -> list[dict[str, str]]:
    if not isinstance(messages, list) or not messages:
        raise TrainerError(f"{where}: 'messages' must be a non-empty list")
    for i, m in enumerate(messages):
        if not isinstance(m, dict) or not isinstance(m.get("content"), str):
            raise TrainerError(f"{where}: messages[{i}] needs a string 'content'")
        if m.get("role") not in ("system", "user", "assistant"):
            raise TrainerError(
                f"{where}: messages[{i}] has role {m.get('role')!r} (expected system, user or assistant)"
            )
        weight = m.get("weight", 1)
        if isinstance(weight, bool) or not isinstance(weight, int | float) or weight not in (0, 1):
            raise TrainerError(
                f"{where}: messages[{i}] has weight {weight!r} (expected 0: no loss, or 1: trained)"
            )
    if messages[-1]["role"] != "assistant":
        raise TrainerError(
            f"{where}: the last message must be from the assistant (it is what the model learns)"
        )
    if all(m.get("weight", 1) == 0 for m in messages if m["role"] == "assistant"):
        raise TrainerError(f"{where}: every assistant message has weight 0, so the row teaches nothing")
    return messages


def parse_row(row: Any, where: str, template: Template = DEFAULT_TEMPLATE) -> Example:
    """Validate one row and render it into template segments."""
    if not isinstance(row, dict):
        raise TrainerError(f"{where}: expected a JSON object, got {type(row).__name__}")
    hit = find_lone_surrogate(row)
    if hit:
        raise TrainerError(f"{where}: {hit.describe()}")
    if "messages" in row:
        messages = _check_messages(row["messages"], where)
    elif "prompt" in row:
        answer_key = "response" if "response" in row else "completion"
        if answer_key not in row:
            raise TrainerError(f"{where}: field 'response' (or 'completion') is missing")
        messages = [
            {"role": "user", "content": _str_field(row, "prompt", where)},
            {"role": "assistant", "content": _str_field(row, answer_key, where)},
        ]
    elif "instruction" in row:
        prompt = _str_field(row, "instruction", where)
        extra = _str_field(row, "input", where, required=False)
        messages = [
            {"role": "user", "content": f"{prompt}\n\n{extra}" if extra.strip() else prompt},
            {"role": "assistant", "content": _str_field(row, "output", where)},
        ]
    elif "text" in row:
        text = _str_field(row, "text", where)
        parsed = _messages_from_text(text)
        if parsed is None:  # plain text: learn all of it (language modelling)
            plain = text.removesuffix(_EOS_TEXT)
            return Example([(plain, True)], where)
        messages = parsed
        if messages[-1]["role"] != "assistant":
            raise TrainerError(f"{where}: the text must end with an 'Assistant:' turn")
    else:
        keys = ", ".join(sorted(map(str, row))) or "none"
        raise TrainerError(f"{where}: unrecognised row (keys: {keys}); expected {FORMATS}")
    segments = template.render_chat(messages)
    prompt_text = "".join(t for t, _ in segments[:-1])
    return Example(segments, where, reference=messages[-1]["content"], prompt_text=prompt_text)


PREFERENCE_KEYS = ("chosen", "rejected", "preferred_output", "non_preferred_output")
PREFERENCE_FORMATS = (
    "prompt+chosen+rejected, messages+chosen+rejected, or input+preferred_output+non_preferred_output"
)


def is_preference_row(row: Any) -> bool:
    return isinstance(row, dict) and any(key in row for key in PREFERENCE_KEYS)


def _answer(value: Any, where: str, key: str) -> str:
    """An answer: a string, an assistant message, or a list of one assistant message (OpenAI's form)."""
    if isinstance(value, list) and len(value) == 1:
        value = value[0]
    if isinstance(value, dict):
        if value.get("role", "assistant") != "assistant" or not isinstance(value.get("content"), str):
            raise TrainerError(f"{where}: '{key}' must be an assistant message with a string 'content'")
        value = value["content"]
    if not isinstance(value, str):
        kind = "missing" if value is None else f"a {type(value).__name__}"
        raise TrainerError(
            f"{where}: '{key}' is {kind} (expected a string, or one assistant message with 'content')"
        )
    return value


def _prompt_messages(messages: Any, where: str, key: str) -> list[dict[str, str]]:
    if not isinstance(messages, list) or not messages:
        raise TrainerError(f"{where}: '{key}' must be a non-empty list of messages")
    for i, m in enumerate(messages):
        if not isinstance(m, dict) or not isinstance(m.get("content"), str):
            raise TrainerError(f"{where}: {key}[{i}] needs a string 'content'")
        if m.get("role") not in ("system", "user", "assistant"):
            raise TrainerError(
                f"{where}: {key}[{i}] has role {m.get('role')!r} (expected system, user or assistant)"
            )
    if messages[-1]["role"] == "assistant":
        raise TrainerError(
            f"{where}: the prompt's last message is the assistant's; the answers go in chosen/rejected"
        )
    return [{"role": m["role"], "content": m["content"]} for m in messages]


def parse_preference_row(row: Any, where: str, template: Template = DEFAULT_TEMPLATE) -> PreferenceExample:
    """Validate one preference row (one prompt, a preferred and a dispreferred answer)."""
    if not isinstance(row, dict):
        raise TrainerError(f"{where}: expected a JSON object, got {type(row).__name__}")
    hit = find_lone_surrogate(row)
    if hit:
        raise TrainerError(f"{where}: {hit.describe()}")
    if "preferred_output" in row or "non_preferred_output" in row or isinstance(row.get("input"), dict):
        inp = row.get("input")
        if not isinstance(inp, dict) or "messages" not in inp:
            raise TrainerError(
                f"{where}: 'input' must be an object with 'messages' (OpenAI's preference format)"
            )
        messages = _prompt_messages(inp["messages"], where, "input.messages")
        chosen = _answer(row.get("preferred_output"), where, "preferred_output")
        rejected = _answer(row.get("non_preferred_output"), where, "non_preferred_output")
    elif "chosen" in row or "rejected" in row:
        if "messages" in row:
            messages = _prompt_messages(row["messages"], where, "messages")
        elif "prompt" in row:
            messages = [{"role": "user", "content": _str_field(row, "prompt", where)}]
        else:
            raise TrainerError(
                f"{where}: a preference row needs 'prompt' (or 'messages') with chosen/rejected"
            )
        chosen = _answer(row.get("chosen"), where, "chosen")
        rejected = _answer(row.get("rejected"), where, "rejected")
    else:
        keys = ", ".join(sorted(map(str, row))) or "none"
        raise TrainerError(
            f"{where}: not a preference row (keys: {keys}); method 'dpo' expects {PREFERENCE_FORMATS}"
        )
    if chosen == rejected:
        raise TrainerError(
            f"{where}: the chosen and rejected answers are the same, so the row teaches nothing"
        )
    prompt_text, chosen_text = _prompt_and_answer(template, messages, chosen)
    rejected_text = _prompt_and_answer(template, messages, rejected)[1]
    return PreferenceExample(prompt_text, chosen, rejected, where, chosen_text, rejected_text)


def _prompt_and_answer(template: Template, messages: list[dict], answer: str) -> tuple[str, str]:
    """The conversation rendered with ``answer`` as the assistant's turn, split where the answer
    starts: the rendering SFT rows get, so both methods teach the same text."""
    segments = template.render_chat([*messages, {"role": "assistant", "content": answer}])
    return "".join(text for text, _ in segments[:-1]), segments[-1][0]


def parse_for_method(row: Any, where: str, method: str, template: Template = DEFAULT_TEMPLATE):
    """A row checked against the training method: preference rows for ``dpo``, the others for ``sft``;
    the wrong kind is an error naming the row and what the method expects."""
    if method == "dpo":
        return parse_preference_row(row, where, template)
    if is_preference_row(row):
        raise TrainerError(
            f"{where}: a preference row ({', '.join(k for k in PREFERENCE_KEYS if k in row)}) needs "
            "method 'dpo'; method 'sft' expects " + FORMATS
        )
    return parse_row(row, where, template)


def parse_any_row(row: Any, where: str, template: Template = DEFAULT_TEMPLATE):
    """A row of either kind (an uploaded file: the method is chosen later, by the job)."""
    if is_preference_row(row):
        return parse_preference_row(row, where, template)
    return parse_row(row, where, template)


def read_examples(
    path: str | Path, template: Template = DEFAULT_TEMPLATE, method: str = "sft"
) -> list[Example] | list[PreferenceExample]:
    """Parse and validate every row of a file; the first bad row raises, naming file and line."""
    path = Path(path)
    examples = [parse_for_method(row, where, method, template) for where, row in _records(path)]
    if not examples:
        raise TrainerError(f"{path}: no rows")
    return examples


# ----------------------------------------------------------------------------- tokenizing


def tokenize(example: Example, tokenizer, max_seq_length: int) -> Row:
    """Token ids and position-masked labels; EOS is appended, a target when the last segment is one."""
    ids: list[int] = []
    labels: list[int] = []
    for text, trainable in example.segments:
        seg = tokenizer(text, add_special_tokens=False)["input_ids"]
        ids += seg
        labels += seg if trainable else [IGNORE_INDEX] * len(seg)
    ids.append(tokenizer.eos_token_id)
    labels.append(tokenizer.eos_token_id if example.segments[-1][1] else IGNORE_INDEX)
    return Row(ids[:max_seq_length], labels[:max_seq_length])


def tokenize_pair(example: PreferenceExample, tokenizer, max_seq_length: int) -> PairRow:
    """The prompt followed by each answer (+ EOS); labels on the answer and its EOS only."""
    prompt = tokenizer(example.prompt_text, add_special_tokens=False)["input_ids"]

    def one(answer: str) -> Row:
        ids = tokenizer(answer, add_special_tokens=False)["input_ids"]
        ids = ids + [tokenizer.eos_token_id]
        return Row((prompt + ids)[:max_seq_length], ([IGNORE_INDEX] * len(prompt) + ids)[:max_seq_length])

    return PairRow(one(example.chosen_text), one(example.rejected_text))


def tokenize_pairs(
    examples: list[PreferenceExample], tokenizer, max_seq_length: int, *, name: str
) -> list[PairRow]:
    pairs = [tokenize_pair(ex, tokenizer, max_seq_length) for ex in examples]
    kept = [p for p in pairs if p.chosen.n_targets and p.rejected.n_targets]
    if len(kept) < len(pairs):
        log.warning(
            "%s: %d preference rows had no answer tokens left within max_seq_length=%d and were dropped",
            name,
            len(pairs) - len(kept),
            max_seq_length,
        )
    if not kept:
        raise TrainerError(
            f"{name}: no usable rows (all prompts are longer than max_seq_length={max_seq_length})"
        )
    return kept


def tokenize_all(examples: list[Example], tokenizer, max_seq_length: int, *, name: str) -> list[Row]:
    rows, cut, dropped = [], 0, 0
    for ex in examples:
        row = tokenize(ex, tokenizer, max_seq_length)
        cut += row.input_ids[-1] != tokenizer.eos_token_id  # the appended EOS was cut off
        if row.n_targets == 0:
            dropped += 1
            continue
        rows.append(row)
    if cut:
        log.warning(
            "%s: %d rows were longer than max_seq_length=%d and were cut at the end",
            name,
            cut,
            max_seq_length,
        )
    if dropped:
        log.warning("%s: %d rows had no response tokens left after cutting and were dropped", name, dropped)
    if not rows:
        raise TrainerError(
            f"{name}: no usable rows (all prompts are longer than max_seq_length={max_seq_length})"
        )
    return rows


def split_holdout(rows: list, fraction: float, seed: int) -> tuple[list, list]:
    """Deterministically hold out ``fraction`` of rows (at least one when fraction > 0 and rows > 1)."""
    n_eval = int(len(rows) * fraction)
    if fraction > 0 and n_eval == 0 and len(rows) >= 10:
        n_eval = 1
    if n_eval == 0:
        return rows, []
    order = list(range(len(rows)))
    random.Random(seed).shuffle(order)
    held = set(order[:n_eval])
    return [r for i, r in enumerate(rows) if i not in held], [r for i, r in enumerate(rows) if i in held]


# ----------------------------------------------------------------------------- batching


def epoch_batches(
    lengths: list[int], batch_size: int, *, seed: int, epoch: int, group_by_length: bool = True
) -> list[list[int]]:
    """The micro-batches (lists of row indices) of one epoch; a pure function of (seed, epoch).

    Length grouping as in Hugging Face's ``LengthGroupedSampler``: shuffle, sort within mega-batches
    of 50 batches, cut into batches, shuffle the batches, and put the longest batch first so an
    out-of-memory shows up at step one rather than hours in.
    """
    rng = random.Random(seed * 1_000_003 + epoch)
    order = list(range(len(lengths)))
    rng.shuffle(order)
    if not group_by_length:
        return [order[i : i + batch_size] for i in range(0, len(order), batch_size)]
    mega = batch_size * 50
    batches = []
    for start in range(0, len(order), mega):
        chunk = sorted(order[start : start + mega], key=lambda i: -lengths[i])
        batches += [chunk[i : i + batch_size] for i in range(0, len(chunk), batch_size)]
    rng.shuffle(batches)
    longest = max(range(len(batches)), key=lambda b: max(lengths[i] for i in batches[b]))
    batches[0], batches[longest] = batches[longest], batches[0]
    return batches


def collate(rows: list[Row], pad_id: int, pad_to_multiple_of: int | None = None) -> dict:
    """Right-pad to the longest row in the batch; padding is masked by position."""
    import torch

    width = max(len(r.input_ids) for r in rows)
    if pad_to_multiple_of:
        width = -(-width // pad_to_multiple_of) * pad_to_multiple_of
    input_ids = torch.full((len(rows), width), pad_id, dtype=torch.long)
    labels = torch.full((len(rows), width), IGNORE_INDEX, dtype=torch.long)
    attention_mask = torch.zeros((len(rows), width), dtype=torch.long)
    for i, r in enumerate(rows):
        n = len(r.input_ids)
        input_ids[i, :n] = torch.tensor(r.input_ids)
        labels[i, :n] = torch.tensor(r.labels)
        attention_mask[i, :n] = 1
    return {"input_ids": input_ids, "attention_mask": attention_mask, "labels": labels}
