"""LoRA through the edit loop: the delta is exactly s·B·A, the adapters' gradients are the chain rule of ∂L/∂W
(checked against autograd through W₀ + s·B·A), and an edit converges; LocBF-FT's sequence-mean loss."""

from __future__ import annotations

import torch

from crispedit.editing.config import EditConfig
from crispedit.editing.engine import edit
from crispedit.editing.lora import LoRAAdam
from tests.test_editing import REQUESTS, TARGETS, setup, weights  # noqa: F401


def test_adapter_gradients_are_the_chain_rule_of_the_weight_gradient():
    torch.manual_seed(0)
    d_out, d_in, r = 5, 7, 3
    W0, X, Y = torch.randn(d_out, d_in, dtype=torch.float64), torch.randn(11, d_in, dtype=torch.float64), \
        torch.randn(11, d_out, dtype=torch.float64)
    opt = LoRAAdam({"w": (d_out, d_in)}, rank=r, alpha=6.0, lr=1e-2, dtype=torch.float64, seed=1)
    opt.B["w"] = torch.randn(d_out, r, dtype=torch.float64)  # a non-zero B so that ∂L/∂A is not zero
    A = opt.A["w"].clone().requires_grad_(True)
    B = opt.B["w"].clone().requires_grad_(True)
    loss = ((X @ (W0 + opt.scale * B @ A).T - Y) ** 2).sum()
    gA, gB = torch.autograd.grad(loss, [A, B])
    W = (W0 + opt.delta("w")).requires_grad_(True)
    (G,) = torch.autograd.grad(((X @ W.T - Y) ** 2).sum(), [W])
    assert torch.allclose(opt.scale * G @ opt.A["w"].T, gB, rtol=1e-12)
    assert torch.allclose(opt.scale * opt.B["w"].T @ G, gA, rtol=1e-12)
    # one step moves A and B by Adam's first step (lr · sign of the gradient) and the delta is s·B·A
    A0, B0 = opt.A["w"].clone(), opt.B["w"].clone()
    deltas = {"w": torch.zeros(d_out, d_in, dtype=torch.float64)}
    opt.apply({"w": G}, deltas)
    assert torch.allclose(opt.A["w"], A0 - 1e-2 * torch.sign(gA), atol=1e-9)
    assert torch.allclose(opt.B["w"], B0 - 1e-2 * torch.sign(gB), atol=1e-9)
    assert torch.equal(deltas["w"], opt.scale * opt.B["w"] @ opt.A["w"])


def test_lora_initialisation_matches_peft_conventions():
    opt = LoRAAdam({"w": (6, 400)}, rank=4, alpha=8.0, seed=0)
    assert opt.scale == 2.0
    assert torch.count_nonzero(opt.B["w"]) == 0  # ΔW starts at zero
    bound = 1 / 400 ** 0.5
    assert float(opt.A["w"].abs().max()) <= bound and float(opt.A["w"].abs().max()) > 0.9 * bound


def test_lora_edit_converges_with_a_rank_limited_delta(setup):
    model, tok, cur = setup
    base = weights(model)
    cfg = EditConfig(method="lora", lr=2e-2, epochs=60, batch_size=4, early_stop_loss=0.05, lora_rank=2,
                     lora_alpha=4.0)
    res = edit(model, tok, REQUESTS, TARGETS, cfg, progress=False)
    assert res.epoch_losses[-1] < 0.3 * res.epoch_losses[0]
    for n in TARGETS:
        d = res.delta.deltas[n].double()
        s = torch.linalg.svdvals(d)
        assert float(s[2:].max()) < 1e-4 * float(s[0])  # rank ≤ 2 (float32 round-off aside)
        assert torch.allclose(weights(model)[n].double(), base[n].double() + d, atol=1e-5)
    res.delta.revert(model)
    assert all(torch.equal(weights(model)[n], base[n]) for n in TARGETS)


def test_sequence_mean_loss_weights_each_sequence_once(setup):
    model, tok, cur = setup
    # one training sequence per request, all in the first batch: the first step sees every request unedited
    one = dict(contexts=("raw",), prefixes=0, epochs=1, batch_size=4, lr=1e-2)
    a = edit(model, tok, REQUESTS, TARGETS, EditConfig(method="locbf-ft", loss_reduction="sequence", **one),
             progress=False)
    a.delta.revert(model)
    b = edit(model, tok, REQUESTS, TARGETS, EditConfig(method="ft", **one), progress=False)
    b.delta.revert(model)
    # same first-step losses in expectation differ only in weighting; the per-request losses agree exactly
    assert a.request_losses[0] == b.request_losses[0]
    seq_mean = sum(a.request_losses[0]) / len(REQUESTS)
    assert abs(a.step_losses[0] - seq_mean) < 1e-6
