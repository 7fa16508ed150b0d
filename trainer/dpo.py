"""Direct Preference Optimization (Rafailov et al., 2023): the loss, the sequence log-probabilities it
compares, the reference's, and the preference metrics of an evaluation.

The loss is TRL's ``DPOTrainer`` sigmoid loss (``loss_type="sigmoid"``, reverse KL, no label smoothing):
for each pair, with log-probabilities summed over the answer's tokens (its EOS included),

    loss = -logsigmoid(beta * ((pi_chosen - ref_chosen) - (pi_rejected - ref_rejected)))

averaged over the pairs; the implicit rewards are ``beta * (pi - ref)`` per answer. As in TRL, dropout
is switched off for the whole run (``disable_dropout``), so policy and reference see the same network.

The reference is the policy the run starts from, computed once per row before the first step (TRL's
``precompute_ref_log_probs``), with no second copy of the model in memory: a new adapter's reference is
the base with the adapter disabled (PEFT's ``disable_adapter()``); a warm start's is the adapter it
starts from (as TRL does when re-training an existing adapter), read before any step changes it.
"""

from __future__ import annotations

from dataclasses import dataclass

from trainer.data import PairRow, collate


def dpo_loss(policy_chosen, policy_rejected, ref_chosen, ref_rejected, beta: float):
    """(per-pair losses, chosen rewards, rejected rewards) from per-pair summed log-probabilities."""
    import torch.nn.functional as F

    chosen_logratios = policy_chosen - ref_chosen
    rejected_logratios = policy_rejected - ref_rejected
    losses = -F.logsigmoid(beta * (chosen_logratios - rejected_logratios))
    return losses, beta * chosen_logratios.detach(), beta * rejected_logratios.detach()


def sequence_logps(model, batch: dict):
    """Per row of ``batch``: the log-probability of its target tokens (labels != -100), summed, in fp32.

    As in ``trainer.loop.token_loss_sum``, the vocabulary head runs only where the next token is a target.
    """
    import torch
    import torch.nn.functional as F

    labels = batch["labels"]
    targets = labels[:, 1:]
    keep = torch.zeros_like(labels, dtype=torch.bool)
    keep[:, :-1] = targets != -100
    logits = model(
        input_ids=batch["input_ids"], attention_mask=batch["attention_mask"], logits_to_keep=keep
    ).logits
    logits = logits.reshape(-1, logits.size(-1)).float()
    token_logps = -F.cross_entropy(logits, targets[targets != -100], reduction="none")
    row_of = keep.nonzero()[:, 0]  # row-major, the order the kept logits come in
    return torch.zeros(labels.size(0), dtype=token_logps.dtype, device=token_logps.device).index_add(
        0, row_of, token_logps
    )


def pair_batch(pairs: list[PairRow], pad_id: int, pad_to_multiple_of: int | None = None) -> dict:
    """One padded batch: the chosen rows, then the rejected rows (TRL's layout)."""
    return collate([p.chosen for p in pairs] + [p.rejected for p in pairs], pad_id, pad_to_multiple_of)


def pair_logps(model, pairs: list[PairRow], pad_id: int, device, pad_to_multiple_of: int | None = None):
    """(chosen, rejected) summed log-probabilities of each pair under ``model``."""
    batch = {k: v.to(device) for k, v in pair_batch(pairs, pad_id, pad_to_multiple_of).items()}
    logps = sequence_logps(model, batch)
    return logps[: len(pairs)], logps[len(pairs) :]


def reference_logps(
    accelerator, model, pairs: list[PairRow], batch_size: int, pad_id: int, *, adapter_on: bool
):
    """A (chosen, rejected) pair of floats per row under the reference: the model as it is now, with the
    adapter disabled (``adapter_on=False``: the base) or enabled (a warm start's initial adapter)."""
    import contextlib

    import torch

    net = accelerator.unwrap_model(model)
    out: list[tuple[float, float]] = []
    was_training = net.training
    net.eval()
    off = contextlib.nullcontext() if adapter_on else net.disable_adapter()
    with torch.no_grad(), accelerator.autocast(), off:
        for i in range(0, len(pairs), batch_size):
            chosen, rejected = pair_logps(net, pairs[i : i + batch_size], pad_id, accelerator.device)
            out += list(zip(chosen.double().tolist(), rejected.double().tolist(), strict=True))
    net.train(was_training)
    return out


@dataclass
class PreferenceEval:
    """One evaluation of a DPO run over the validation pairs (TRL's names in brackets)."""

    loss: float  # mean DPO loss: the eval loss the best checkpoint is chosen by
    reward_accuracy: float  # share of pairs whose chosen reward exceeds the rejected one (rewards/accuracies)
    reward_margin: float  # mean chosen reward - rejected reward (rewards/margins)
    chosen_reward: float  # (rewards/chosen)
    rejected_reward: float  # (rewards/rejected)
    chosen_logps: float  # mean summed log-probability of the chosen answers under the policy (logps/chosen)
    rejected_logps: float  # (logps/rejected)

    def metrics(self) -> dict[str, float]:
        return {
            "reward_accuracy": self.reward_accuracy,
            "reward_margin": self.reward_margin,
            "chosen_reward": self.chosen_reward,
            "rejected_reward": self.rejected_reward,
            "chosen_logps": self.chosen_logps,
            "rejected_logps": self.rejected_logps,
        }


def evaluate_preferences(
    accelerator,
    model,
    pairs: list[PairRow],
    refs: list[tuple[float, float]],
    *,
    beta: float,
    batch_size: int,
    pad_id: int,
) -> PreferenceEval:
    """The DPO loss and preference metrics over ``pairs`` (sharded across processes, summed back)."""
    import torch

    net = accelerator.unwrap_model(model)
    idx = list(range(accelerator.process_index, len(pairs), accelerator.num_processes))
    # sums of: loss, accuracy, margin, chosen reward, rejected reward, chosen logps, rejected logps, count
    total = torch.zeros(8, dtype=torch.float64, device=accelerator.device)
    net.eval()
    with torch.no_grad(), accelerator.autocast():
        for i in range(0, len(idx), batch_size):
            chunk = idx[i : i + batch_size]
            chosen, rejected = pair_logps(net, [pairs[j] for j in chunk], pad_id, accelerator.device)
            ref = torch.tensor([refs[j] for j in chunk], dtype=chosen.dtype, device=chosen.device)
            losses, r_chosen, r_rejected = dpo_loss(chosen, rejected, ref[:, 0], ref[:, 1], beta)
            for k, v in enumerate(
                (
                    losses,
                    (r_chosen > r_rejected).to(losses.dtype),
                    r_chosen - r_rejected,
                    r_chosen,
                    r_rejected,
                    chosen,
                    rejected,
                )
            ):
                total[k] += v.double().sum()
            total[7] += len(chunk)
    net.train()
    total = accelerator.reduce(total, reduction="sum")
    n = max(float(total[7]), 1.0)
    return PreferenceEval(*(float(total[k]) / n for k in range(7)))


def disable_dropout(model) -> None:
    """p = 0 in every dropout module (base and LoRA), as TRL's ``disable_dropout_in_model``."""
    import torch

    for module in model.modules():
        if isinstance(module, torch.nn.Dropout):
            module.p = 0.0
