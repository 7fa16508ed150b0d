"""Trainer inputs without a model: config validation, row formats, label masking, batching, metrics."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from loracore.template import DEFAULT_TEMPLATE
from trainer.config import load_config, parse_config
from trainer.data import IGNORE_INDEX, collate, epoch_batches, parse_row, read_examples, tokenize
from trainer.errors import TrainerError
from trainer.metrics import exact_match, generation_metrics
from trainer.model import gpt2_tokenizer

EXAMPLES = Path(__file__).resolve().parent.parent / "examples"


@pytest.fixture(scope="module")
def tok():
    t = gpt2_tokenizer()
    t.pad_token = t.eos_token  # as load_tokenizer does: pad id == EOS id, the prototype's trap
    return t


def write_jsonl(path: Path, rows: list) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


# ----------------------------------------------------------------------------- config


def test_prototype_config_loads_unchanged():
    cfg = load_config(EXAMPLES / "prototype.yaml")
    assert cfg.lora.r == 32 and cfg.lora.lora_alpha == 64 and cfg.lora.lora_dropout == 0.1
    assert cfg.lora.target_modules == ["c_attn", "c_proj"]
    t = cfg.training
    assert (t.model_name_or_path, t.num_train_epochs, t.per_device_train_batch_size) == ("distilgpt2", 3, 2)
    assert (t.gradient_accumulation_steps, t.learning_rate, t.fp16) == (4, 0.0005, True)
    # what the prototype did not say gets a default
    assert t.max_seq_length == 512 and t.lr_scheduler_type == "linear" and t.seed == 42


@pytest.mark.parametrize(
    ("raw", "needle"),
    [
        ({"lora": {"rank": 8}}, "unknown key 'lora.rank'"),
        ({"training": {"learning_rte": 1e-4}}, "unknown key 'training.learning_rte'"),
        ({"optimizer": {}}, "unknown key 'optimizer'"),
        ({"training": {"num_train_epochs": 0}}, "training.num_train_epochs"),
        ({"training": {"fp16": True, "bf16": True}}, "choose one"),
    ],
)
def test_bad_config_names_the_problem(raw, needle):
    with pytest.raises(TrainerError, match=needle.replace("(", r"\(").replace(".", r"\.")):
        parse_config(raw)


def test_overrides_are_typed_and_validated():
    cfg = parse_config(
        {"training": {"learning_rate": 5e-4}}, overrides=["training.learning_rate=1e-4", "lora.r=8"]
    )
    assert cfg.training.learning_rate == pytest.approx(1e-4) and cfg.lora.r == 8
    cfg = parse_config({}, overrides=['lora.target_modules=["c_attn"]', "training.max_steps=3"])
    assert cfg.lora.target_modules == ["c_attn"] and cfg.training.max_steps == 3
    with pytest.raises(TrainerError, match="training.learning_rate"):
        parse_config({}, overrides=["training.learning_rate=fast"])
    with pytest.raises(TrainerError, match="unknown key 'training.sede'"):
        parse_config({}, overrides=["training.sede=3"])
    with pytest.raises(TrainerError, match="expected key=value"):
        parse_config({}, overrides=["training.seed"])


# ----------------------------------------------------------------------------- rows and labels


def test_every_format_masks_the_prompt_by_position_and_learns_eos(tmp_path, tok):
    rows = [
        {"prompt": "Name a colour.", "response": "Blue."},
        {"prompt": "Name a colour.", "completion": "Blue."},
        {"instruction": "Name a colour.", "input": "", "output": "Blue."},
        {
            "messages": [
                {"role": "user", "content": "Name a colour."},
                {"role": "assistant", "content": "Blue."},
            ]
        },
        {"text": "Human: Name a colour.\nAssistant: Blue."},
    ]
    examples = read_examples(write_jsonl(tmp_path / "rows.jsonl", rows))
    prompt_ids = tok(DEFAULT_TEMPLATE.render_prompt("Name a colour."))["input_ids"]
    answer_ids = tok(" Blue.")["input_ids"]
    for ex in examples:
        row = tokenize(ex, tok, 512)
        assert row.input_ids == prompt_ids + answer_ids + [tok.eos_token_id], ex.where
        # labels: -100 on the prompt, the ids on the answer, and EOS (== pad id) is a target
        assert row.labels == [IGNORE_INDEX] * len(prompt_ids) + answer_ids + [tok.eos_token_id], ex.where


def test_multi_turn_chat_trains_every_answer_but_not_user_turns(tok):
    ex = parse_row(
        {
            "messages": [
                {"role": "system", "content": "Be brief."},
                {"role": "user", "content": "Hi"},
                {"role": "assistant", "content": "Hello."},
                {"role": "user", "content": "Bye"},
                {"role": "assistant", "content": "Goodbye."},
            ]
        },
        "x:1",
    )
    row = tokenize(ex, tok, 512)
    trained = tok.decode([i for i, lab in zip(row.input_ids, row.labels, strict=True) if lab != IGNORE_INDEX])
    assert trained == " Hello. Goodbye.<|endoftext|>"


def trained_text(row, tok) -> str:
    return tok.decode([i for i, lab in zip(row.input_ids, row.labels, strict=True) if lab != IGNORE_INDEX])


def test_chat_messages_with_weight_0_get_no_loss(tok):
    def chat(*weights):
        turns = []
        for i, w in enumerate(weights):
            answer = {"role": "assistant", "content": f"Answer {i}."}
            turns += [
                {"role": "user", "content": f"Question {i}?"},
                answer if w is None else {**answer, "weight": w},
            ]
        return tokenize(parse_row({"messages": turns}, "x:1"), tok, 512)

    assert trained_text(chat(None, None), tok) == " Answer 0. Answer 1.<|endoftext|>"  # as before
    assert chat(1, 1.0) == chat(None, None)  # weight 1 changes nothing
    assert trained_text(chat(0, 1), tok) == " Answer 1.<|endoftext|>"
    # the EOS goes with the last answer: weight 0 there trains neither the answer nor the stop
    row = chat(1, 0)
    assert trained_text(row, tok) == " Answer 0." and row.labels[-1] == IGNORE_INDEX
    assert row.input_ids == chat(None, None).input_ids  # the text is the same; only the labels differ


@pytest.mark.parametrize("weight", [2, 0.5, -1, "0", True, False, None, [1]])
def test_other_weights_are_refused_naming_the_row(weight):
    row = {
        "messages": [
            {"role": "user", "content": "q"},
            {"role": "assistant", "content": "a", "weight": weight},
        ]
    }
    with pytest.raises(TrainerError, match=r"^rows\.jsonl:4: messages\[1\] has weight .*expected 0"):
        parse_row(row, "rows.jsonl:4")


def test_a_row_whose_every_answer_has_weight_0_is_refused():
    row = {"messages": [{"role": "user", "content": "q"}, {"role": "assistant", "content": "a", "weight": 0}]}
    with pytest.raises(TrainerError, match="x:1: every assistant message has weight 0"):
        parse_row(row, "x:1")


def test_json_array_files_and_alpaca_input(tmp_path):
    path = tmp_path / "rows.json"
    path.write_text(json.dumps([{"instruction": "Translate.", "input": "chat", "output": "cat"}]))
    (ex,) = read_examples(path)
    assert ex.prompt_text == "Human: Translate.\n\nchat\nAssistant:" and ex.reference == "cat"


@pytest.mark.parametrize(
    ("line", "needle"),
    [
        ('{"prompt": "a", "response": ', "invalid JSON"),
        ('{"question": "a", "answer": "b"}', "unrecognised row (keys: answer, question)"),
        ('{"prompt": "a"}', "field 'response' (or 'completion') is missing"),
        ('{"prompt": "a", "response": 3}', "field 'response' is a int, not a string"),
        ('{"messages": [{"role": "user", "content": "a"}]}', "last message must be from the assistant"),
        ('{"messages": [{"role": "robot", "content": "a"}]}', "role 'robot'"),
        ('["prompt", "response"]', "expected a JSON object"),
        ('{"prompt": "a \\ud800", "response": "b"}', "prompt: lone surrogate U+D800 at position 2"),
        (
            '{"messages": [{"role": "user", "content": "x"}, {"role": "assistant", "content": "\\udfff"}]}',
            "messages[1].content: lone surrogate U+DFFF at position 0",
        ),
    ],
)
def test_malformed_row_names_file_and_line(tmp_path, line, needle):
    path = tmp_path / "bad.jsonl"
    path.write_text('{"prompt": "ok", "response": "fine"}\n\n' + line + "\n")
    with pytest.raises(TrainerError) as err:
        read_examples(path)
    assert str(err.value).startswith(f"{path}:3: ") and needle in str(err.value)


def test_missing_and_empty_files(tmp_path):
    with pytest.raises(TrainerError, match="data file not found"):
        read_examples(tmp_path / "nope.jsonl")
    (tmp_path / "empty.jsonl").write_text("\n")
    with pytest.raises(TrainerError, match="no rows"):
        read_examples(tmp_path / "empty.jsonl")


def test_long_rows_are_cut_not_padded(tok):
    ex = parse_row({"prompt": "a", "response": "word " * 50}, "x:1")
    row = tokenize(ex, tok, 16)
    assert len(row.input_ids) == 16 and row.labels[-1] != tok.eos_token_id


# ----------------------------------------------------------------------------- batching


def test_batches_pad_to_their_longest_row_never_to_max_length(tok):
    rows = [tokenize(parse_row({"prompt": "q", "response": "a " * n}, "x"), tok, 512) for n in (1, 3, 9)]
    batch = collate(rows, tok.pad_token_id)
    longest = max(len(r.input_ids) for r in rows)
    assert batch["input_ids"].shape == (3, longest) and longest < 20
    for i, r in enumerate(rows):
        n = len(r.input_ids)
        assert batch["attention_mask"][i].tolist() == [1] * n + [0] * (longest - n)
        assert batch["labels"][i, n:].eq(IGNORE_INDEX).all()  # padding masked by position
        assert batch["labels"][i, n - 1] == tok.eos_token_id  # the row's own EOS is still a target


def test_length_grouping_cuts_padding_and_is_deterministic():
    import random

    lengths = [random.Random(i).randint(5, 200) for i in range(400)]

    def padding(batches):
        return sum(len(b) * max(lengths[i] for i in b) for b in batches) - sum(lengths)

    grouped = epoch_batches(lengths, 8, seed=1, epoch=0)
    plain = epoch_batches(lengths, 8, seed=1, epoch=0, group_by_length=False)
    assert sorted(i for b in grouped for i in b) == list(range(400))  # every row once
    assert padding(grouped) < padding(plain) / 5
    assert max(lengths[i] for i in grouped[0]) == max(lengths)  # longest batch first: OOM shows at once
    assert grouped == epoch_batches(lengths, 8, seed=1, epoch=0)  # resumable: a function of (seed, epoch)
    assert grouped != epoch_batches(lengths, 8, seed=1, epoch=1)


# ----------------------------------------------------------------------------- metrics


def _scores(candidates: list[str], references: list[str]) -> dict[str, float]:
    return generation_metrics(candidates, references, [True] * len(candidates), [1] * len(candidates))


def rouge_l(candidate: str, reference: str) -> float:
    return _scores([candidate], [reference])["rouge_l"]


def bleu(candidates: list[str], references: list[str]) -> float:
    return _scores(candidates, references)["bleu"]


def test_generation_metrics_on_known_values():
    assert rouge_l("the cat sat on the mat", "the cat sat on the mat") == 1.0
    assert rouge_l("dog", "the cat") == 0.0
    # LCS("the cat was on the mat", "the cat sat on the mat") = 5 of 6 tokens each side
    assert rouge_l("the cat was on the mat", "the cat sat on the mat") == pytest.approx(5 / 6)
    assert bleu(["the cat sat on the mat"], ["the cat sat on the mat"]) == pytest.approx(1.0)
    assert bleu(["dog dog dog dog"], ["the cat sat on"]) == 0.0
    # 1-gram 5/6, 2-gram 3/5, 3-gram 1/4, 4-gram 0/3 smoothed to 1/(2*3); no brevity penalty
    expected = (5 / 6 * 3 / 5 * 1 / 4 * 1 / 6) ** 0.25
    assert bleu(["the cat was on the mat"], ["the cat sat on the mat"]) == pytest.approx(expected)
    assert exact_match(" Paris. ", "Paris.") == 1.0 and exact_match("Paris", "Paris.") == 0.0
    m = generation_metrics(
        ["a", "b", "c", "d"], ["a", "x", "c", "y"], [True, True, False, True], [2, 3, 9, 2]
    )
    assert m["exact_match"] == 0.5 and m["eos_rate"] == 0.75 and m["mean_tokens"] == 4.0


def test_generation_metrics_equal_rouge_score_and_sacrebleu_on_fixed_pairs():
    """The numbers are the libraries' own (what published results are computed with), not a lookalike."""
    import sacrebleu
    from rouge_score import rouge_scorer

    pairs = [
        ("The answer is always forty two.", "The answer is always forty two."),
        ("The answer is forty-two, always!", "The answer is always forty two."),
        ("Bananas are berries.", "Bananas are berries but strawberries are not."),
        ("", "Nothing came back."),
        ("Paris is the capital of France", "The capital of France is Paris."),
        ("Ein völlig anderer Satz, café", "A completely different sentence, café"),
    ]
    candidates, references = [c for c, _ in pairs], [r for _, r in pairs]
    got = _scores(candidates, references)
    scorer = rouge_scorer.RougeScorer(["rougeL"])
    rouge = [scorer.score(r, c)["rougeL"].fmeasure for c, r in pairs]
    assert got["rouge_l"] == pytest.approx(sum(rouge) / len(rouge), abs=1e-12)
    assert got["bleu"] == pytest.approx(
        sacrebleu.corpus_bleu(candidates, [references]).score / 100, abs=1e-12
    )
    for c, r in pairs:  # row by row too: each pair alone
        one = _scores([c], [r])
        assert one["rouge_l"] == pytest.approx(scorer.score(r, c)["rougeL"].fmeasure, abs=1e-12)
        assert one["bleu"] == pytest.approx(sacrebleu.corpus_bleu([c], [[r]]).score / 100, abs=1e-12)
    assert 0 < got["rouge_l"] < 1 and 0 < got["bleu"] < 1


# ----------------------------------------------------------------------------- progress


def test_progress_lines_have_every_key_and_the_bar_follows(tmp_path, capsys):
    from loracore.progress import Progress

    path = tmp_path / "p.jsonl"
    p = Progress(jsonl=path, bar=True)
    p.emit("start", step=0, total_steps=4, epoch=0.0, lr=1e-3)
    p.emit("step", step=1, epoch=0.25, loss=2.5, tokens_per_second=100.0, eta_seconds=3.0, lr=1e-3)
    p.emit("eval", step=1, eval_loss=float("nan"), perplexity=float("inf"))
    p.emit("done", step=4, path="/x")
    p.close()
    events = [json.loads(line) for line in path.read_text().splitlines()]
    assert [e["event"] for e in events] == ["start", "step", "eval", "done"]
    keys = {
        "event",
        "step",
        "total_steps",
        "epoch",
        "loss",
        "eval_loss",
        "tokens_per_second",
        "eta_seconds",
        "lr",
    }
    assert all(keys <= e.keys() for e in events)
    assert events[2]["eval_loss"] is None and events[2]["perplexity"] is None  # NaN/inf are not JSON
    assert events[3]["loss"] == 2.5 and events[3]["total_steps"] == 4  # state carries over
    assert "4/4" in capsys.readouterr().err  # the tqdm bar on stderr
    Progress(jsonl=path, enabled=False).emit("step", step=9)  # non-main processes write nothing
    assert len(path.read_text().splitlines()) == 4
