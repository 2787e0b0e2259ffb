"""Batch editing (Algorithm 1): fine-tune only the target weights on the edit loss, every step constrained to
the kept subspace of the capability curvature (CrispEdit), the null space of A (Adam-NSCL) or not at all (FT).
All three run through this one loop, so comparisons differ in the projection only."""

from __future__ import annotations

import logging
import math
import time
from dataclasses import dataclass, field
from typing import Any, Mapping, Sequence

import torch
from torch import nn
from tqdm.auto import tqdm

from crispedit.data.records import EditRequest
from crispedit.config import DEFAULT_EPOCHS, PROJECTION_FOR_METHOD, EditConfig  # noqa: F401 - re-exported
from crispedit.editing.batches import build_training, training_contexts
from crispedit.editing.contexts import anchor_prompts
from crispedit.editing.delta import EditDelta, materialize
from crispedit.editing.forward import EditForward, per_sequence_mean
from crispedit.formatting import EncodedPair
from crispedit.editing.lora import LoRAAdam
from crispedit.editing.optim import ProjectedAdam
from crispedit.editing.relinearize import Relinearizer
from crispedit.editing.replay import CapabilityReplay, coarse_kl, with_rest
from crispedit.errors import CrispEditError, DivergenceError
from crispedit.models.runtime import frozen_parameters, pad_id_of
from crispedit.models.targets import as_weight_matrix, weight_matrix

logger = logging.getLogger(__name__)


@dataclass
class EditResult:
    delta: EditDelta
    step_losses: list[float]
    epoch_losses: list[float]
    request_losses: list[list[float]]  # per epoch, per request (mean token NLL of the target)
    step_seconds: list[float]
    steps: int
    epochs: int
    stopped: str
    seconds: float
    diagnostics: dict[str, Any] = field(default_factory=dict)


def projection_kind(cfg: EditConfig) -> str | None:
    """What the run projects with: 'kfac', 'ekfac' (K-FAC's eigenbasis ranked by corrected eigenvalues), 'nscl' or
    None."""
    if cfg.projection == "kfac" and cfg.eigenvalues == "ekfac":
        return "ekfac"
    return cfg.projection


def build_projectors(curvature, cfg: EditConfig, device, model: nn.Module | None = None, tokenizer=None,
                     pad_id: int = 0) -> tuple[dict[str, Any] | None, dict[str, Any] | None]:
    """The run's projectors, and the record of the EK-FAC pass when `cfg.eigenvalues` is 'ekfac' (it runs here,
    on the cache's own sequences at `model`'s current weights, unless the curvature already holds one)."""
    kind = projection_kind(cfg)
    if kind is None:
        return None, None
    if curvature is None:
        raise CrispEditError(f"method {cfg.method!r} needs a curvature", hint={"curvature": ...})
    info = None
    if kind == "ekfac" and curvature.corrected_eigenvalues is None:
        from crispedit.curvature.extend import curvature_sequences

        if model is None or tokenizer is None:
            raise CrispEditError("eigenvalues 'ekfac' needs the model and its tokenizer to correct the eigenvalues")
        seqs = curvature_sequences(tokenizer, curvature.record, "the curvature to correct (eigenvalues ekfac)")
        info = curvature.correct_eigenvalues(model, seqs, pad_id)
        logger.info("EK-FAC eigenvalues from %d sequences in %.1f s", info["sequences"], info["seconds"])
    projs = curvature.projectors(cfg.gamma, cfg.scope, kind=kind, device=device)
    if kind == "ekfac":
        info = dict(info or {}, kept_fraction={n: float(p.kept_fraction) for n, p in projs.items()})
    return projs, info


def edit(model: nn.Module, tokenizer, requests: Sequence[EditRequest], targets: Sequence[str], cfg: EditConfig,
         curvature=None, projectors: Mapping[str, Any] | None = None, progress: bool = False,
         record: dict[str, Any] | None = None, base_fingerprint: str | None = None,
         replay_sequences: Sequence[Sequence[int]] | None = None) -> EditResult:
    """Edit `model` in place and return the delta (with its record). On NaN/inf the weights are restored.
    `base_fingerprint`: the targeted weights' fingerprint when the caller already knows it (not re-hashed).
    `replay_sequences`: the capability chunks of `cfg.replay` (default: `cfg.replay_samples` chunks of the
    curvature corpus's training split)."""
    from crispedit.data.readers import requests_fingerprint
    from crispedit.models.fingerprint import check_untied, weights_fingerprint

    if not requests:
        raise CrispEditError("no edit requests given")
    targets = list(targets)
    check_untied(model, targets)
    device = next(model.parameters()).device
    ekfac_info = None
    if projectors is None:
        projectors, ekfac_info = build_projectors(curvature, cfg, device, model, tokenizer, pad_id_of(tokenizer))
    if curvature is not None and list(curvature.targets) != targets:
        raise CrispEditError(f"the curvature cache covers {curvature.targets}, but the edit targets are {targets}")
    modules = {n: model.get_submodule(n) for n in targets}
    base = {n: weight_matrix(m).clone() for n, m in modules.items()}
    base_fp = base_fingerprint or weights_fingerprint(model, targets)
    deltas = {n: torch.zeros(b.shape, dtype=torch.float32, device=device) for n, b in base.items()}
    shapes = {n: tuple(b.shape) for n, b in base.items()}

    def projected_adam(projs: Mapping[str, Any] | None, lr: float) -> ProjectedAdam:
        return ProjectedAdam(shapes, projs, lr=lr, mode=cfg.projection_mode, device=device, scale=cfg.adam_scale)

    if cfg.method == "lora":
        opt = LoRAAdam(shapes, rank=cfg.lora_rank, alpha=cfg.lora_alpha, lr=cfg.lr, device=device, seed=cfg.seed)
    else:
        opt = projected_adam(projectors, cfg.lr)
    pad_id = pad_id_of(tokenizer)
    relin = None
    if cfg.relinearize:  # the cache's corpus is rebuilt (and checked) before any heavy work
        relin = Relinearizer(tokenizer, curvature, targets, cfg, pad_id)
    contexts = training_contexts(tokenizer, cfg.contexts)
    seqs, prefixes = build_training(model, tokenizer, requests, contexts, cfg.prefixes, cfg.seed, cfg.target_end)
    owner = [s.request for s in seqs]
    gen = torch.Generator().manual_seed(cfg.seed)
    anchors = anchor_prompts(tokenizer, requests, contexts, cfg.anchors, cfg.seed) if cfg.anchors else []
    pairs = [s.pair for s in seqs] + [EncodedPair(list(a.prompt_ids), []) for a in anchors]
    where = cfg.positions_for(len(requests))
    active = training_positions(seqs, where, len(anchors))
    fwd = EditForward(model, targets, pairs, pad_id, cache_prefix=cfg.cache_prefix,
                      logits_at_targets=cfg.target_logits, active=active, base_weights=base if active else None,
                      cache_kv=cfg.cache_positions)
    anchor_kl = AnchorKL(fwd, range(len(seqs), len(pairs)), gen) if anchors else None
    lengths = fwd.run_lengths()[:len(seqs)]  # batches group sequences of similar cost
    replay, replay_corpus = None, None
    if cfg.replay:
        if replay_sequences is None:
            from crispedit.data.corpus import corpus_of_curvature

            corpus = corpus_of_curvature(tokenizer, curvature, "train", cfg.replay_samples, seed=1)
            replay_sequences, replay_corpus = corpus.sequences, corpus.describe()
        replay = CapabilityReplay(model, replay_sequences, pad_id, gen, per_step=cfg.replay,
                                  max_length=cfg.replay_length)

    params = {n: m.weight for n, m in modules.items()}
    frozen = frozen_parameters(model, trainable=params.values())  # only the target weights are trained
    was_training = model.training
    step_losses: list[float] = []
    step_seconds: list[float] = []
    epoch_losses: list[float] = []
    request_losses: list[list[float]] = []
    anchor_losses: list[float] = []
    replay_losses: list[float] = []
    stopped, step = "epochs", 0
    run_positions, padded_positions = 0, 0  # positions the kept layers run, without and with the batches' padding
    budget = planned_steps(len(seqs), cfg)
    if relin is not None:
        relin.plan(budget)
    t0 = time.perf_counter()
    model.eval()  # no dropout: the edit loss is deterministic
    try:
        frozen.__enter__()
        bar = tqdm(range(planned_epochs(len(seqs), cfg)), desc=f"edit ({cfg.method})", disable=not progress,
                   unit="epoch")
        for epoch in bar:
            per_seq_loss = [math.nan] * len(seqs)
            batch_losses = []
            for idx in epoch_batches(lengths, cfg.batch_size, gen, cfg.length_window):
                ts = time.perf_counter()
                run_positions += sum(lengths[i] for i in idx)
                padded_positions += len(idx) * max(lengths[i] for i in idx)
                nll, rows = fwd.token_nll(idx)
                if cfg.loss_reduction == "sequence":  # each sequence counts once, whatever its target length
                    edit_loss = per_sequence_mean(nll, rows, len(idx)).mean()
                else:
                    edit_loss = nll.mean()
                loss = edit_loss
                if anchor_kl is not None:
                    kl = anchor_kl.step(len(idx) * len(anchors) / len(seqs))
                    anchor_losses.append(float(kl.detach()))
                    loss = loss + cfg.anchor_weight * kl
                if replay is not None:
                    rkl = replay.step()
                    replay_losses.append(float(rkl.detach()))
                    loss = loss + cfg.replay_weight * rkl
                step += 1
                if not torch.isfinite(loss):
                    raise DivergenceError(f"step {step}: the edit loss is {float(loss)}")
                opt.lr = scheduled_lr(cfg, step - 1, budget)
                grads = torch.autograd.grad(loss, list(params.values()))
                gmats = {n: as_weight_matrix(modules[n], g) for n, g in zip(params, grads)}
                with torch.no_grad():
                    if cfg.delta_decay:
                        opt.apply(gmats, deltas, decay=cfg.delta_decay)
                    else:
                        opt.apply(gmats, deltas)
                    for n in deltas:
                        if not torch.isfinite(deltas[n]).all():
                            raise DivergenceError(f"step {step}: the update of {n} is not finite")
                        weight_matrix(modules[n]).copy_(materialize(base[n], deltas[n]))
                lv = float(edit_loss.detach())
                step_seconds.append(time.perf_counter() - ts)
                step_losses.append(lv)
                batch_losses.append((lv, len(idx)))
                per_seq = per_sequence_mean(nll.detach(), rows, len(idx)).tolist()
                for i, v in zip(idx, per_seq):
                    per_seq_loss[i] = v
                if cfg.max_steps and step >= cfg.max_steps:
                    stopped = "max_steps"
                    break
                if relin is not None and relin.due(step):  # a new constraint: Adam's moments are in the old basis
                    opt = projected_adam(relin.projectors(model, step, device), opt.lr)
            request_losses.append(_per_request(per_seq_loss, owner, len(requests)))
            em = sum(v * k for v, k in batch_losses) / sum(k for _, k in batch_losses)
            epoch_losses.append(em)
            bar.set_postfix(loss=f"{em:.4f}")
            if stopped == "max_steps":
                break
            if em < cfg.early_stop_loss:
                stopped = "early_stop"
                break
    except BaseException:
        with torch.no_grad():
            for n, m in modules.items():
                weight_matrix(m).copy_(base[n])
        raise
    finally:
        frozen.__exit__(None, None, None)
        model.train(was_training)

    seconds = time.perf_counter() - t0
    rec = dict(record or {})
    rec.update(
        base_weights_sha256=base_fp,
        requests_sha256=requests_fingerprint(list(requests)),
        n_requests=len(requests),
        config=cfg.to_json(),
        step_losses=step_losses,
        epoch_losses=epoch_losses,
        steps=step,
        epochs=len(epoch_losses),
        stopped=stopped,
        lr_schedule={"kind": str(cfg.lr_schedule), "budget_steps": budget, "final_lr": opt.lr},
        seconds=seconds,
        forward=dict(fwd.describe(), padded_share=round(1 - run_positions / padded_positions, 4)
                     if padded_positions else None),
        training_contexts=list(contexts),
        training_sequences=len(seqs),
        prefixes=prefixes,
        anchors={"n": len(anchors), "kl_per_step": anchor_losses} if anchors else None,
        relinearize=None if relin is None else relin.describe(),
        ekfac=ekfac_info,
        replay=None if replay is None else {"chunks": len(replay.sequences), "per_step": replay.per_step,
                                            "corpus": replay_corpus, "kl_per_step": replay_losses},
        edit_positions={"where": where} if active is None else {
            "where": where, "sequences_with_subject": sum(a is not None for a in active[:len(seqs)]),
            "sequences": len(seqs)},
    )
    delta = EditDelta.from_base(model, base, deltas, rec)
    diag = diagnostics(delta.deltas, curvature, cfg)
    delta.record["diagnostics"] = diag
    logger.info("edit (%s): %d request(s), %d step(s), final loss %.4f, %.1f s", cfg.method, len(requests), step,
                epoch_losses[-1] if epoch_losses else math.nan, seconds)
    return EditResult(delta, step_losses, epoch_losses, request_losses, step_seconds, step, len(epoch_losses),
                      stopped, seconds, diag)


def batches_per_epoch(n_sequences: int, cfg: EditConfig) -> int:
    """How many batches `epoch_batches` cuts `n_sequences` into (runs of `length_window` batches)."""
    span = cfg.batch_size * max(cfg.length_window, 1)
    return sum(math.ceil(min(span, n_sequences - w) / cfg.batch_size) for w in range(0, n_sequences, span))


def planned_epochs(n_sequences: int, cfg: EditConfig) -> int:
    """The epoch cap: `cfg.epochs` when given; by default 25, or as many more whole epochs as reach
    `cfg.min_steps` steps. An epoch of a few requests is a few steps (39 requests x 5 training variants = 7
    batches), and what fits an edit set under Adam is a number of steps, not of passes; whole epochs keep every
    request seen equally often."""
    if cfg.epochs is not None:
        return cfg.epochs
    per_epoch = batches_per_epoch(n_sequences, cfg)
    return max(DEFAULT_EPOCHS, math.ceil(cfg.min_steps / per_epoch)) if per_epoch else DEFAULT_EPOCHS


def planned_steps(n_sequences: int, cfg: EditConfig) -> int:
    """The step budget a learning-rate schedule spans: every epoch's batches (what `epoch_batches` cuts for
    `n_sequences`) over `planned_epochs`, capped by `max_steps`. Early stopping may end the run before it."""
    total = batches_per_epoch(n_sequences, cfg) * planned_epochs(n_sequences, cfg)
    return min(total, cfg.max_steps) if cfg.max_steps else total


def scheduled_lr(cfg: EditConfig, step: int, budget: int) -> float:
    """The lr of step `step` (0-based) of `budget`: constant, or decayed towards 0 at the end of the budget
    (cosine: lr·½(1 + cos(π·step/budget)); linear: lr·(1 − step/budget)); past the budget, 0."""
    frac = min(step / max(budget, 1), 1.0)
    if cfg.lr_schedule == "cosine":
        return cfg.lr * 0.5 * (1.0 + math.cos(math.pi * frac))
    if cfg.lr_schedule == "linear":
        return cfg.lr * (1.0 - frac)
    return cfg.lr


def training_positions(seqs: Sequence[Any], where: str, n_extra: int = 0) -> list[tuple[int, ...] | None] | None:
    """Per training sequence (then `n_extra` others, always whole), where the change acts: None = everywhere
    (`where` all, or the subject was not found in that sequence)."""
    if where == "all":
        return None
    pos = [s.subject_positions for s in seqs]
    if where == "subject-last":
        pos = [p[-1:] if p else None for p in pos]
    missing = sum(p is None for p in pos)
    if missing:
        logger.warning("edit positions %s: the subject was not found in %d of %d training sequence(s); the change "
                       "acts at every token there", where, missing, len(pos))
    return pos + [None] * n_extra


class AnchorKL:
    """The anchors' term: mean over a batch of anchors of the KL divergence, base ‖ edited, of the first answer
    token's distribution coarsened to the base model's top-k tokens plus one "any other token" outcome (the base's
    top-k recorded before editing; exact KL of the coarsened distributions, so zero at the base weights and never
    negative). Each call takes the next anchors of a shuffled cycle: every anchor is used about once per epoch."""

    TOP_K = 32

    def __init__(self, fwd: EditForward, indices, gen: torch.Generator, batch_size: int = 64):
        self.fwd, self.indices, self.gen = fwd, list(indices), gen
        ids, logp = [], []
        with torch.no_grad():
            for s in range(0, len(self.indices), batch_size):
                lp = torch.log_softmax(fwd.last_logits(self.indices[s:s + batch_size]).double(), -1)
                top = torch.topk(lp, min(self.TOP_K, lp.shape[-1]), dim=-1)
                ids.append(top.indices)
                logp.append(with_rest(top.values))
        self.top_ids = torch.cat(ids)  # [n_anchors, k]
        self.top_logp = torch.cat(logp)  # [n_anchors, k + 1]: log p_base of the top-k tokens, then of the rest
        self.order: list[int] = []
        self.carry = 0.0

    def step(self, share: float) -> torch.Tensor:
        """The KL term over the next ⌈share⌉ anchors (share carried over between steps)."""
        self.carry += share
        n = max(1, int(self.carry))
        self.carry -= n
        take = []
        while len(take) < n:
            if not self.order:
                self.order = torch.randperm(len(self.indices), generator=self.gen).tolist()
            take.append(self.order.pop())
        take = take[: len(self.indices)]
        logits = self.fwd.last_logits([self.indices[k] for k in take])
        rows = torch.tensor(take, device=logits.device)
        ids, ref = self.top_ids[rows].to(logits.device), self.top_logp[rows].to(logits.device)
        return coarse_kl(ref, ids, logits).mean().float()


def epoch_batches(lengths: Sequence[int], batch_size: int, gen: torch.Generator, window: int = 0) -> list[list[int]]:
    """One epoch's batches: a random order (breadth-first, every sequence once); with `window` > 1, each run of
    `window` batches is sorted by length before it is cut, and the batches are shuffled again, so a batch holds
    sequences of similar length (less padding: training contexts differ in length by a factor of ~4) while every
    batch stays a random draw from a random window."""
    order = torch.randperm(len(lengths), generator=gen).tolist()
    if window <= 1:
        return [order[s:s + batch_size] for s in range(0, len(order), batch_size)]
    span = batch_size * window
    batches = []
    for w in range(0, len(order), span):
        part = sorted(order[w:w + span], key=lambda i: lengths[i])
        batches += [part[s:s + batch_size] for s in range(0, len(part), batch_size)]
    perm = torch.randperm(len(batches), generator=gen).tolist()
    return [batches[i] for i in perm]


def _per_request(per_seq: list[float], owner: list[int], n: int) -> list[float]:
    """Mean loss over each request's training sequences (NaN where none was scored this epoch)."""
    sums, counts = [0.0] * n, [0] * n
    for v, r in zip(per_seq, owner):
        if not math.isnan(v):
            sums[r] += v
            counts[r] += 1
    return [s / c if c else math.nan for s, c in zip(sums, counts)]


def spread_of_kept(kept: torch.Tensor) -> dict[str, float]:
    """How ΔW spreads over its kept eigen-coordinates: their RMS, and the share of ‖ΔW‖² in the largest tenth of
    them (0.44 for Gaussian-distributed coordinates, 1 for a change held by few): whether a few directions carry
    the edit or it is spread over the whole kept subspace (as at 300 CounterFact edits, docs/scale.md)."""
    sq = kept.double().square().flatten()
    if sq.numel() == 0:
        return {"kept_coordinate_rms": 0.0, "top_tenth_energy_share": 0.0}
    top = torch.topk(sq, max(1, sq.numel() // 10)).values.sum()
    return {"kept_coordinate_rms": float(sq.mean().sqrt()),
            "top_tenth_energy_share": float(top / max(float(sq.sum()), 1e-300))}


def kfac_quadratic_form(curvature, target: str, d64: torch.Tensor) -> float:
    """½ vec(ΔW)ᵀ(S⊗A)vec(ΔW) = ½ Σ (S ΔW A) ⊙ ΔW under a curvature's K-FAC factors (A with its sink positions)."""
    _, S = curvature.stats[target].factors()
    A_full = curvature.stats[target].full_input_factor()
    return 0.5 * float(((S.cpu().double() @ d64 @ A_full.cpu().double()) * d64).sum())


def diagnostics(deltas: Mapping[str, torch.Tensor], curvature, cfg: EditConfig) -> dict[str, Any]:
    """How far the edit moved and how much of it is in high-curvature directions, per target:
    ‖ΔW‖, the share of ‖ΔW‖² outside the kept subspace (at the run's γ/scope), how it spreads over the kept
    eigen-coordinates (`spread_of_kept`), and the predicted capability
    loss increase ½ vec(ΔW)ᵀ(S⊗A)vec(ΔW) = ½ Σ (S ΔW A) ⊙ ΔW under the K-FAC model."""
    out: dict[str, Any] = {}
    projs = None
    if curvature is not None:
        kind = "ekfac" if projection_kind(cfg) == "ekfac" and curvature.corrected_eigenvalues is not None else "kfac"
        projs = curvature.projectors(cfg.gamma, cfg.scope, kind=kind, dtype=torch.float64, device="cpu")
    for n, d in deltas.items():
        d64 = d.double().cpu()
        row: dict[str, Any] = {"norm": float(d64.norm())}
        if projs is not None:
            removed = projs[n].removed_part(d64)
            row["removed_energy_fraction"] = float(removed.norm() ** 2 / max(float(d64.norm() ** 2), 1e-300))
            row.update(spread_of_kept(projs[n].rotate(d64)[projs[n].keep]))
            row["kfac_quadratic_form"] = kfac_quadratic_form(curvature, n, d64)
        out[n] = row
    return out
