"""The path of the weights: the learning-rate schedule (its step budget is exactly the batches the epochs cut,
the lr follows the documented formula, a decayed run moves the weights less far while it still trains the edit),
Adam's second moment kept per target (a step along the gradient, normalised by its RMS over the kept
coordinates) and a decoupled decay of ΔW (which bounds Adam's random walk at its stationary scale): the levers on
how far Adam moves coordinates the edit does not need."""

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


def test_default_epochs_reach_the_step_floor_in_whole_epochs_and_given_epochs_are_exact():
    import math

    from crispedit.editing.engine import batches_per_epoch, planned_epochs, planned_steps

    few = EditConfig()  # 39 requests x 5 training variants: 7 batches of 32 per epoch
    assert batches_per_epoch(195, few) == 7
    assert planned_epochs(195, few) == math.ceil(400 / 7) == 58 and planned_steps(195, few) == 406
    assert planned_epochs(1, few) == 400  # one sequence: one batch per epoch
    assert planned_epochs(500, few) == 25 and planned_steps(500, few) == 400  # 16 batches: the paper's 25 epochs
    assert planned_epochs(5000, few) == 25  # past the floor, nothing changes
    assert planned_epochs(195, EditConfig(min_steps=0)) == 25
    assert planned_epochs(195, EditConfig(epochs=3)) == 3  # a given epoch count is not extended
    assert planned_steps(195, EditConfig(max_steps=50)) == 50
    with pytest.raises(ValueError, match="min_steps"):
        EditConfig(min_steps=-1)


def test_the_step_floor_runs_whole_epochs_and_early_stopping_still_ends_it(byte_bpe_tokenizer):
    from crispedit.editing.engine import edit

    tok = byte_bpe_tokenizer
    common = dict(method="ft", lr=2e-2, batch_size=2, edit_positions="all", prefixes=0, contexts=("raw",))
    # REQUESTS x raw = 3 sequences -> 2 batches per epoch; a floor of 60 steps -> 30 epochs, not the default 25
    res = edit(tiny_llama(tok), tok, REQUESTS, TARGETS, EditConfig(min_steps=60, early_stop_loss=1e-9, **common))
    assert (res.steps, res.epochs, res.stopped) == (60, 30, "epochs")
    assert res.delta.record["config"]["epochs"] is None and res.delta.record["config"]["min_steps"] == 60
    given = edit(tiny_llama(tok), tok, REQUESTS, TARGETS, EditConfig(epochs=2, early_stop_loss=1e-9, **common))
    assert (given.steps, given.epochs) == (4, 2)
    stopped = edit(tiny_llama(tok), tok, REQUESTS, TARGETS, EditConfig(min_steps=400, early_stop_loss=1.0, **common))
    assert stopped.stopped == "early_stop" and stopped.steps < 400


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


def _random_projector(d_out: int = 6, d_in: int = 5, seed: int = 0):
    from crispedit.curvature.projector import KroneckerProjector

    g = torch.Generator().manual_seed(seed)
    U_S = torch.linalg.qr(torch.randn(d_out, d_out, generator=g, dtype=torch.float64))[0]
    U_A = torch.linalg.qr(torch.randn(d_in, d_in, generator=g, dtype=torch.float64))[0]
    keep = torch.rand(d_out, d_in, generator=g) > 0.4
    return KroneckerProjector(U_S, U_A, keep, dtype=torch.float64), g


def test_layer_scaled_adam_steps_along_the_gradient_normalised_by_its_kept_rms():
    from crispedit.editing.optim import ProjectedAdam

    P, g = _random_projector()
    grad = torch.randn(6, 5, generator=g, dtype=torch.float64)
    layer = ProjectedAdam({"w": (6, 5)}, {"w": P}, lr=0.1, dtype=torch.float64, scale="layer", eps=1e-300)
    coord = ProjectedAdam({"w": (6, 5)}, {"w": P}, lr=0.1, dtype=torch.float64, eps=1e-300)
    Gt = P.rotate_masked(grad)  # the masked gradient in the eigenbasis
    rms = float(Gt[P.keep].square().mean().sqrt())
    u = layer.step({"w": grad})["w"]
    assert torch.allclose(u, P.unrotate_masked(0.1 * Gt / rms), atol=1e-12)  # first step: lr·g/rms(g)
    assert torch.allclose(P(u), u, atol=1e-12)  # in the kept subspace
    assert torch.allclose(coord.step({"w": grad})["w"], P.unrotate_masked(0.1 * torch.sign(Gt)), atol=1e-12)
    # the same mean square step per kept coordinate as Adam's sign step, spread by the gradient's magnitude
    assert float(P.rotate_masked(u)[P.keep].square().mean()) == pytest.approx(0.01, rel=1e-10)
    # later steps: bias-corrected running moments, the second one a single number per layer
    grad2 = torch.randn(6, 5, generator=g, dtype=torch.float64)
    G2 = P.rotate_masked(grad2)
    m = (0.9 * 0.1 * Gt + 0.1 * G2) / (1 - 0.9**2)
    v = (0.999 * 0.001 * Gt[P.keep].square().mean() + 0.001 * G2[P.keep].square().mean()) / (1 - 0.999**2)
    assert torch.allclose(layer.step({"w": grad2})["w"], P.unrotate_masked(0.1 * m / v.sqrt()), atol=1e-12)


@pytest.mark.parametrize("option", [{"adam_scale": "layer"}, {"delta_decay": 2.0}])
def test_an_edit_with_a_shorter_path_still_trains(byte_bpe_tokenizer, option):
    from crispedit.editing.engine import edit

    model = tiny_llama(byte_bpe_tokenizer)
    ec = EditConfig(method="ft", lr=2e-2, epochs=6, batch_size=2, edit_positions="all", prefixes=0,
                    contexts=("raw",), early_stop_loss=1e-9, **option)
    res = edit(model, byte_bpe_tokenizer, REQUESTS, TARGETS, ec)
    assert res.epoch_losses[-1] < 0.5 * res.epoch_losses[0]
    assert res.delta.record["config"][next(iter(option))] == next(iter(option.values()))


def test_lora_refuses_the_layer_scale():
    from crispedit.errors import ConfigError

    with pytest.raises(ConfigError, match="adam_scale"):
        EditConfig(method="lora", adam_scale="layer")


def test_spread_of_kept_tells_a_gaussian_walk_from_a_concentrated_change():
    from crispedit.editing.engine import spread_of_kept

    g = torch.Generator().manual_seed(0)
    walk = torch.randn(200_000, generator=g, dtype=torch.float64) * 0.2
    s = spread_of_kept(walk)
    assert s["kept_coordinate_rms"] == pytest.approx(0.2, rel=0.01)
    assert s["top_tenth_energy_share"] == pytest.approx(0.44, abs=0.01)  # E[x²; |x| > z₀.₉₅] / E[x²] for a Gaussian
    few = torch.zeros(1000, dtype=torch.float64)
    few[:50] = 1.0
    assert spread_of_kept(few) == {"kept_coordinate_rms": pytest.approx(50**0.5 / 1000**0.5),
                                   "top_tenth_energy_share": pytest.approx(1.0)}


def test_delta_decay_bounds_adams_random_walk_at_its_stationary_scale():
    """Pure-noise gradients: without decay each kept coordinate walks to lr·√T; with a decoupled decay it settles
    at √(lr/(2·decay)) (stationary variance of x ← (1−λ)x − u with λ = lr·decay and Adam's u of size lr)."""
    from crispedit.editing.optim import ProjectedAdam

    P, g = _random_projector(40, 30, seed=1)
    lr, decay, steps = 1e-2, 2.0, 3000
    walks = {}
    for d in (0.0, decay):
        opt = ProjectedAdam({"w": (40, 30)}, {"w": P}, lr=lr, dtype=torch.float64)
        delta = {"w": torch.zeros(40, 30, dtype=torch.float64)}
        gen = torch.Generator().manual_seed(7)
        for _ in range(steps):
            opt.apply({"w": torch.randn(40, 30, generator=gen, dtype=torch.float64)}, delta, decay=d)
        assert torch.allclose(P(delta["w"]), delta["w"], atol=1e-10)  # still in the kept subspace
        walks[d] = float(P.rotate(delta["w"])[P.keep].square().mean().sqrt())
    assert walks[0.0] == pytest.approx(lr * steps**0.5, rel=0.2)
    assert walks[decay] == pytest.approx((lr / (2 * decay)) ** 0.5, rel=0.2)


def test_delta_decay_is_validated():
    from crispedit.errors import ConfigError

    with pytest.raises(ConfigError, match="delta_decay"):
        EditConfig(delta_decay=-1.0)
    with pytest.raises(ConfigError, match="delta_decay"):
        EditConfig(lr=0.01, delta_decay=100.0)
    with pytest.raises(ConfigError, match="delta_decay"):
        EditConfig(method="lora", delta_decay=1.0)
