"""Preference tuning (DPO) in the trainer: the loss against TRL's computation, the preference rows, a run
that learns the preferred answer, and warm starts from an existing adapter.

TRL is not a dependency (it pulls ``datasets`` and pyarrow): ``trl_dpo_loss`` below is TRL's
``DPOTrainer._compute_loss`` for ``loss_type="sigmoid"`` written out from its source
(trl/trainer/dpo_trainer.py: full logits, shift by one, ``selective_log_softmax``, completion mask,
sum over the sequence, ``chunk(2)`` into chosen/rejected, reference through the disabled adapter,
``-logsigmoid(beta * (chosen_logratios - rejected_logratios))``, mean).
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest

from testing.weights import make_random_lora
from tests.helpers.adapters import CHECK_PROMPTS, PROMPTS, greedy_answers, torch_threads
from trainer.data import parse_for_method, parse_preference_row, tokenize_pair
from trainer.errors import TrainerError

PREFERRED = "The answer is always forty two."
DISPREFERRED = "Bananas are berries but strawberries are not."
DPO_CONFIG = {
    "lora": {"r": 16, "lora_alpha": 32, "lora_dropout": 0.0, "target_modules": ["c_attn", "c_proj"]},
    "training": {
        "method": "dpo",
        "num_train_epochs": 10,  # 12 rows / batch 4 -> 30 steps; measured 13 s on one thread
        "per_device_train_batch_size": 4,
        "learning_rate": 0.005,
        "warmup_ratio": 0.0,
        "lr_scheduler_type": "constant",
        "save_steps": 0,
        "seed": 0,
    },
}


def preference_rows(prompts: list[str], chosen: str = PREFERRED, rejected: str = DISPREFERRED) -> list[dict]:
    return [{"prompt": p, "chosen": chosen, "rejected": rejected} for p in prompts]


def write_jsonl(path: Path, rows: list[dict]) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


# ----------------------------------------------------------------------------- rows


def test_the_three_preference_shapes_render_the_same_pair():
    messages = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi"}]
    shapes = [
        {"messages": messages, "chosen": "Hello.", "rejected": "Go away."},
        {
            "messages": messages,
            "chosen": {"role": "assistant", "content": "Hello."},
            "rejected": [{"role": "assistant", "content": "Go away."}],
        },
        {
            "input": {"messages": messages},
            "preferred_output": [{"role": "assistant", "content": "Hello."}],
            "non_preferred_output": [{"role": "assistant", "content": "Go away."}],
        },
    ]
    parsed = [parse_preference_row(row, f"row{i}") for i, row in enumerate(shapes)]
    assert {(p.prompt_text, p.chosen, p.rejected) for p in parsed} == {
        ("Be brief.\nHuman: Hi\nAssistant:", "Hello.", "Go away.")
    }
    simple = parse_preference_row({"prompt": "Hi", "chosen": "a", "rejected": "b"}, "r")
    assert simple.prompt_text == "Human: Hi\nAssistant:"


def test_a_bases_chat_template_renders_the_pair_as_sft_renders_a_turn(chat_base: Path):
    """On a base with a chat template (ChatML), each answer is the text the template adds for an
    assistant turn (the answer and ``<|im_end|>``), as an SFT row of the same conversation has it."""
    from loracore.template import base_chat_template
    from trainer.data import parse_row
    from trainer.model import load_tokenizer

    template = base_chat_template(chat_base)
    pair = parse_preference_row({"prompt": "Hi", "chosen": "Hello.", "rejected": "Go away."}, "r", template)
    sft = parse_row({"prompt": "Hi", "response": "Hello."}, "r", template)
    assert pair.prompt_text == sft.prompt_text and pair.prompt_text.endswith("<|im_start|>assistant\n")
    assert pair.chosen_text == sft.segments[-1][0] and pair.chosen_text.startswith("Hello.<|im_end|>")
    assert pair.rejected_text.startswith("Go away.<|im_end|>") and pair.reference == "Hello."
    tok = load_tokenizer(chat_base)
    row = tokenize_pair(pair, tok, 256).chosen
    assert tok.decode([t for t in row.labels if t != -100]).startswith("Hello.<|im_end|>")


@pytest.mark.parametrize(
    ("row", "method", "says"),
    [
        ({"prompt": "Hi", "response": "Hello"}, "dpo", "not a preference row (keys: prompt, response)"),
        ({"prompt": "Hi", "chosen": "a", "rejected": "b"}, "sft", "needs method 'dpo'"),
        ({"prompt": "Hi", "chosen": "a"}, "dpo", "'rejected' is missing"),
        ({"prompt": "Hi", "chosen": "a", "rejected": "a"}, "dpo", "the same"),
        ({"prompt": "Hi", "chosen": 3, "rejected": "a"}, "dpo", "'chosen' is a int"),
        (
            {"input": {"messages": []}, "preferred_output": "a", "non_preferred_output": "b"},
            "dpo",
            "non-empty",
        ),
        (
            {
                "messages": [{"role": "user", "content": "x"}, {"role": "assistant", "content": "y"}],
                "chosen": "a",
            },
            "dpo",
            "last message is the assistant's",
        ),
    ],
)
def test_rows_of_the_wrong_shape_are_refused_naming_the_row(row, method, says):
    with pytest.raises(TrainerError) as err:
        parse_for_method(row, "data.jsonl:3", method)
    assert str(err.value).startswith("data.jsonl:3: ") and says in str(err.value)


# ----------------------------------------------------------------------------- the loss against TRL's


def trl_dpo_loss(model, input_ids, attention_mask, completion_mask, beta: float):
    """TRL's sigmoid DPO loss and rewards, computed the way ``DPOTrainer._compute_loss`` does."""
    import torch
    import torch.nn.functional as F

    def logps(logits):
        shift_logits = logits[..., :-1, :].float()
        shift_labels = input_ids[..., 1:]
        per_token = torch.gather(shift_logits.log_softmax(-1), 2, shift_labels.unsqueeze(-1)).squeeze(-1)
        per_token[completion_mask[..., 1:] == 0] = 0.0
        return per_token.sum(dim=1).chunk(2, dim=0)

    chosen, rejected = logps(model(input_ids=input_ids, attention_mask=attention_mask).logits)
    with torch.no_grad(), model.disable_adapter():
        ref_chosen, ref_rejected = logps(model(input_ids=input_ids, attention_mask=attention_mask).logits)
    chosen_logratios, rejected_logratios = chosen - ref_chosen, rejected - ref_rejected
    loss = -F.logsigmoid(beta * (chosen_logratios - rejected_logratios)).mean()
    return loss, beta * chosen_logratios, beta * rejected_logratios


def test_dpo_loss_equals_trls_sigmoid_loss_on_the_same_batch(tiny_base: Path, tmp_path: Path):
    import torch
    from peft import PeftModel

    from trainer.dpo import dpo_loss, pair_batch, pair_logps
    from trainer.model import load_base_model, load_tokenizer

    tok = load_tokenizer(tiny_base)
    lora = make_random_lora(tiny_base, tmp_path / "lora", seed=3)  # non-zero B: policy != reference
    model = PeftModel.from_pretrained(load_base_model(tiny_base), str(lora)).eval()
    examples = [
        parse_preference_row({"prompt": "Hi", "chosen": "Hello there.", "rejected": "No."}, "r0"),
        parse_preference_row(
            {
                "messages": [{"role": "user", "content": "Name a colour"}],
                "chosen": "Blue",
                "rejected": "Seven",
            },
            "r1",
        ),
        parse_preference_row({"prompt": "2+2?", "chosen": "4", "rejected": "It is five, I think."}, "r2"),
    ]
    pairs = [tokenize_pair(ex, tok, 256) for ex in examples]
    beta = 0.1

    # ours: answer-only logits, per-pair summed log-probabilities, the reference precomputed per row
    with torch.no_grad(), model.disable_adapter():
        ref_chosen, ref_rejected = pair_logps(model, pairs, tok.pad_token_id, "cpu")
    chosen, rejected = pair_logps(model, pairs, tok.pad_token_id, "cpu")
    losses, r_chosen, r_rejected = dpo_loss(chosen, rejected, ref_chosen, ref_rejected, beta)
    ours = losses.mean()

    # TRL's: full logits over [chosen; rejected], completion mask = the answer positions
    batch = pair_batch(pairs, tok.pad_token_id)
    completion_mask = (batch["labels"] != -100).long()
    theirs, t_chosen, t_rejected = trl_dpo_loss(
        model, batch["input_ids"], batch["attention_mask"], completion_mask, beta
    )
    assert ours.item() == pytest.approx(theirs.item(), rel=1e-5, abs=1e-6)
    assert torch.allclose(r_chosen, t_chosen, atol=1e-5) and torch.allclose(r_rejected, t_rejected, atol=1e-5)
    assert abs(ours.item() - math.log(2)) > 1e-3  # the adapter moved the policy: not the trivial value

    # the gradients agree as well
    model.zero_grad()
    ours.backward()
    ours_grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
    model.zero_grad()
    trl_dpo_loss(model, batch["input_ids"], batch["attention_mask"], completion_mask, beta)[0].backward()
    for name, grad in ours_grads.items():
        assert torch.allclose(grad, dict(model.named_parameters())[name].grad, rtol=1e-4, atol=1e-7), name

    # at the start of a run the policy is the reference: every pair's loss is log 2
    zero = torch.zeros(3)
    assert torch.allclose(dpo_loss(zero, zero, zero, zero, beta)[0], torch.full((3,), math.log(2)))


# ----------------------------------------------------------------------------- a run


@pytest.fixture(scope="module")
def dpo_run(tiny_base: Path, tmp_path_factory: pytest.TempPathFactory):
    """A DPO run on the random base: 12 prompts preferring one sentence over another, 8 held out."""
    from trainer import train_adapter

    root = tmp_path_factory.mktemp("dpo")
    data = write_jsonl(root / "train.jsonl", preference_rows(PROMPTS[:12]))
    val = write_jsonl(root / "val.jsonl", preference_rows(PROMPTS[12:20]))
    progress = root / "progress.jsonl"
    with torch_threads(1):
        summary = train_adapter(
            DPO_CONFIG, data, root / "adapter", model=str(tiny_base), val_path=val, progress_jsonl=progress
        )
    return root / "adapter", summary, [json.loads(line) for line in progress.read_text().splitlines()]


def test_a_dpo_run_makes_the_preferred_answer_the_greedy_one(tiny_base: Path, dpo_run):
    adapter, summary, events = dpo_run
    assert summary["method"] == "dpo" and summary["selected"] == "best"
    # held-out rows: the implicit reward ranks the chosen answer first
    assert summary["preference"]["reward_accuracy"] >= 0.9
    assert summary["preference"]["reward_margin"] > 0
    evals = [e for e in events if e["event"] == "eval"]
    assert len(evals) == 10 and all("reward_accuracy" in e and "chosen_logps" in e for e in evals)
    # the best checkpoint is chosen by the validation (DPO) loss, as for SFT
    assert summary["best_eval_loss"] == min(e["eval_loss"] for e in evals) < math.log(2)
    # the adapter now answers prompts it never saw with the preferred sentence; the base does not
    prompts = CHECK_PROMPTS + PROMPTS[20:22]
    answers = [text.strip() for text, _ in greedy_answers(tiny_base, adapter, prompts)]
    assert sum(a == PREFERRED for a in answers) >= len(prompts) - 1, answers
    assert not any(DISPREFERRED[:12] in a for a in answers), answers
    assert all(text.strip() != PREFERRED for text, _ in greedy_answers(tiny_base, None, prompts[:2]))


def test_a_warm_start_must_have_the_same_lora_shape(tiny_base: Path, tmp_path: Path, dpo_run):
    from trainer import train_adapter

    data = write_jsonl(tmp_path / "train.jsonl", preference_rows(PROMPTS[:4]))
    with pytest.raises(TrainerError, match="lora r 16, this config 8"):
        train_adapter(
            {**DPO_CONFIG, "lora": {**DPO_CONFIG["lora"], "r": 8, "lora_alpha": 16}},
            data,
            tmp_path / "out",
            model=str(tiny_base),
            init_adapter=dpo_run[0],
        )
    assert not (tmp_path / "out").exists()
