"""Teacher-forced log-probabilities of target tokens after their prompt (edit metrics, MC benchmarks)."""

from __future__ import annotations

import inspect
from typing import Any, Sequence

import torch
from tqdm.auto import tqdm

from crispedit.evaluation.generation import eval_mode, model_device
from crispedit.formatting import collate


def accepts_logits_to_keep(model) -> bool:
    """Whether `model.forward` can project only some positions onto the vocabulary (transformers >= 4.50)."""
    try:
        return "logits_to_keep" in inspect.signature(model.forward).parameters
    except (TypeError, ValueError):
        return False


def target_predictions(models: Sequence[Any], seqs: Sequence[tuple[list[int], list[int]]], pad_id: int,
                       batch_size: int = 16, show_progress: bool = False,
                       desc: str = "teacher-forced") -> list[list[tuple[list[int], list[float]]]]:
    """For each model and each (prompt_ids, target_ids): the argmax token and the log-prob of the
    target token at every target position, given the true prefix (one right-padded pass per batch).

    Only the positions that predict target tokens are projected onto the vocabulary when the model
    supports `logits_to_keep` (the vocabulary projection dominates memory for long prompts).
    """
    for i, (p, t) in enumerate(seqs):
        if not p or not t:
            raise ValueError(f"sequence {i}: prompt and target must both have at least one token")
    out: list[list[Any]] = [[None] * len(seqs) for _ in models]
    order = sorted(range(len(seqs)), key=lambda i: (len(seqs[i][0]), len(seqs[i][1])))
    batches = [order[i:i + batch_size] for i in range(0, len(order), batch_size)]
    with eval_mode(*models):
        for idx in tqdm(batches, desc=desc, disable=not show_progress, leave=False):
            batch = collate([seqs[i][0] + seqs[i][1] for i in idx], pad_id, padding_side="right")
            lo = min(len(seqs[i][0]) for i in idx) - 1
            hi = max(len(seqs[i][0]) + len(seqs[i][1]) for i in idx) - 1
            for mi, model in enumerate(models):
                dev = model_device(model)
                kwargs: dict[str, Any] = {}
                offset = 0
                if accepts_logits_to_keep(model):
                    kwargs["logits_to_keep"] = torch.arange(lo, hi, device=dev)
                    offset = lo
                logits = model(input_ids=batch["input_ids"].to(dev),
                               attention_mask=batch["attention_mask"].to(dev), **kwargs).logits
                for row, i in enumerate(idx):
                    p, t = seqs[i]
                    lg = logits[row, len(p) - 1 - offset:len(p) + len(t) - 1 - offset].float()
                    lp = torch.log_softmax(lg, -1).gather(-1, torch.tensor(t, device=lg.device)[:, None])[:, 0]
                    out[mi][i] = (lg.argmax(-1).tolist(), lp.tolist())
    return out
