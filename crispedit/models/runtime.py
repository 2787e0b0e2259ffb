"""Small runtime facts about a model and its tokenizer that every stage needs, written once.

- `pad_id_of`: the id batches are padded with (padding is always masked, so any real token is sound).
- `frozen_parameters`: run with every parameter frozen except the ones being trained, flags restored after.
"""

from __future__ import annotations

import contextlib
from typing import Iterable, Iterator

import torch
from torch import nn


def pad_id_of(tokenizer) -> int:
    """The padding id: the tokenizer's pad token, else its EOS, else 0 (padding is masked, so any is sound)."""
    if tokenizer.pad_token_id is not None:
        return int(tokenizer.pad_token_id)
    if tokenizer.eos_token_id is not None:
        return int(tokenizer.eos_token_id)
    return 0


@contextlib.contextmanager
def frozen_parameters(model: nn.Module, trainable: Iterable[nn.Parameter] = ()) -> Iterator[None]:
    """Set requires_grad=False on every parameter of `model` except `trainable` (True), with gradients enabled;
    every flag is restored on exit, also after an error.

    Curvature collection freezes everything (it differentiates with respect to layer outputs only); editing
    trains the target weights alone."""
    flags = [(p, p.requires_grad) for p in model.parameters()]
    try:
        for p, _ in flags:
            p.requires_grad_(False)
        for p in trainable:
            p.requires_grad_(True)
        with torch.enable_grad():
            yield
    finally:
        for p, f in flags:
            p.requires_grad_(f)


__all__ = ["frozen_parameters", "pad_id_of"]
