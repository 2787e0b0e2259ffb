"""Edit requests → padded training batches (prompt + target + EOS, loss on target tokens only: FT-M)."""

from __future__ import annotations

from typing import Sequence

import torch

from crispedit.data.records import EditRequest
from crispedit.formatting import EncodedPair, PromptFormat, collate, encode_pair


def encode_requests(tokenizer, requests: Sequence[EditRequest], context: str = "raw") -> list[EncodedPair]:
    fmt = PromptFormat(context=context)
    return [encode_pair(tokenizer, r.prompt, r.target, fmt, add_eos=True) for r in requests]


def make_batch(pairs: Sequence[EncodedPair], pad_id: int, device: torch.device | str) -> dict[str, torch.Tensor]:
    b = collate([p.input_ids for p in pairs], pad_id, labels=[p.labels for p in pairs], padding_side="right")
    return {k: v.to(device) for k, v in b.items()}


def token_losses(logits: torch.Tensor, labels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-token NLL of HF-style labels (shifted inside) and the mask of scored tokens."""
    lg = logits[:, :-1].float()
    tgt = labels[:, 1:]
    mask = tgt != -100
    nll = torch.nn.functional.cross_entropy(lg.reshape(-1, lg.shape[-1]), tgt.clamp_min(0).reshape(-1),
                                            reduction="none").view_as(tgt)
    return nll * mask, mask
