"""The learning-rate schedule: its step budget is exactly the batches the epochs cut, the lr follows the
documented formula, and a decayed run moves the weights less far while it still trains the edit (Adam moves each
coordinate about lr per step, so the schedule is the lever on the path's length)."""

from __future__ import annotations

import pytest
import torch
from test_edit_replay import REQUESTS, TARGETS, tiny_llama

from crispedit.editing.config import EditConfig



def test_planned_steps_is_what_an_epoch_cuts_times_the_epochs():
    from crispedit.editing.engine import epoch_batches, planned_steps

    g = torch.Generator().manual_seed(0)
    for n, batch, window in [(1, 32, 4), (100, 32, 4), (1500, 32, 4), (97, 8, 0), (130, 7, 3), (64, 32, 1)]:
        lengths = torch.randint(3, 40, (n,), generator=g).tolist()
        per_epoch = len(epoch_batches(lengths, batch, g, window))
        cfg = EditConfig(batch_size=batch, length_window=window, epochs=3)
        assert planned_steps(n, cfg) == 3 * per_epoch
    assert planned_steps(1500, EditConfig(max_steps=10)) == 10


def test_a_decaying_lr_follows_its_formula_and_shortens_the_path(byte_bpe_tokenizer):
    import math

    from crispedit.editing.engine import edit, scheduled_lr

    cos = EditConfig(lr=2e-3, lr_schedule="cosine")
    assert scheduled_lr(cos, 0, 10) == pytest.approx(2e-3)
    assert scheduled_lr(cos, 5, 10) == pytest.approx(1e-3)
    assert scheduled_lr(cos, 9, 10) == pytest.approx(1e-3 * (1 + math.cos(0.9 * math.pi)))
    assert scheduled_lr(EditConfig(lr=2e-3, lr_schedule="linear"), 9, 10) == pytest.approx(2e-4)
    assert scheduled_lr(EditConfig(lr=2e-3), 9, 10) == 2e-3
    tok = byte_bpe_tokenizer

    def run(schedule: str):
        model = tiny_llama(tok)
        ec = EditConfig(method="ft", lr=2e-2, epochs=6, batch_size=2, edit_positions="all", prefixes=0,
                        contexts=("raw",), lr_schedule=schedule, early_stop_loss=1e-9)
        res = edit(model, tok, REQUESTS, TARGETS, ec)
        norm = sum(float(d.norm() ** 2) for d in res.delta.deltas.values()) ** 0.5
        return res, norm

    const, n_const = run("constant")
    decayed, n_decayed = run("cosine")
    assert const.steps == decayed.steps == 12
    sched = decayed.delta.record["lr_schedule"]
    assert sched["kind"] == "cosine" and sched["budget_steps"] == 12
    assert sched["final_lr"] == pytest.approx(scheduled_lr(EditConfig(lr=2e-2, lr_schedule="cosine"), 11, 12))
    assert const.delta.record["lr_schedule"]["final_lr"] == 2e-2
    assert n_decayed < 0.85 * n_const  # a shorter path
    assert decayed.epoch_losses[-1] < 0.5 * decayed.epoch_losses[0]  # that still trains the edit


def test_an_unknown_lr_schedule_is_refused():
    from crispedit.errors import ConfigError

    with pytest.raises(ConfigError, match="lr_schedule"):
        EditConfig(lr_schedule="step")
