"""Training a MEND hypernetwork (Mitchell et al. 2022, Algorithm 1) on edit requests of a TRAIN split.

Each step samples `edits_per_step` requests, takes the gradient factors (u, δ) of their edit loss on the
frozen base model, maps them through g_φ to the edit W̃ = W − α Σ δ̃ ũᵀ, and updates φ and α by Adam on

    L = c_edit · mean NLL of the target after the prompt and after its rephrases, under W̃
      + c_loc · KL( p_W(· | locality text) ‖ p_W̃(· | locality text) )   (mean over the locality tokens)

which is differentiable in φ through W̃ alone (first order: the factors come from the base model). The
normalisation statistics are updated with every step's factors before they are used, as in MEND.

Defaults: MEND's c_edit 0.1, c_loc 1, α₀ = 1e-4, rank 1920, two residual blocks, last three MLP layers;
the outer learning rates (1e-4 for φ and α) are larger than MEND's (1e-6 / 1e-4) so that a bounded CPU run
learns something, and `max_seconds` bounds the run. Run as a module:

    python -m crispedit.baselines.mend_train --model smollm2-135m-instruct \
        --data ../shared/data/counterfact/counterfact-train.json --out runs/mend --max-seconds 1200
"""

from __future__ import annotations

import argparse
import hashlib
import logging
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Sequence

import torch
from torch import nn
from torch.func import functional_call
from transformers.pytorch_utils import Conv1D

from crispedit.baselines.common import frozen_model
from crispedit.baselines.mend import MendNet, edit_batch, gradient_factors, per_request_nll, save_hypernet
from crispedit.config import ConfigBase, option
from crispedit.data.records import EditRequest
from crispedit.errors import CrispEditError
from crispedit.formatting import PromptFormat, collate, encode_pair
from crispedit.models.runtime import pad_id_of
from crispedit.models.targets import DEFAULT_TARGETS, layer_io_dims, resolve_targets, weight_matrix

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class MendTrainConfig(ConfigBase):
    """How a MEND hypernetwork is trained (defaults: MEND's, except the outer learning rates; see above)."""

    layers: str | None = option(None, "layers to edit (names, ranges or regex); default: the last three MLP "
                                      "down-projections", metavar="SPEC")
    rank: int = option(1920, "rank of the hypernetwork's low-rank blocks", low=1)
    n_blocks: int = option(2, "residual low-rank blocks (MEND: n_hidden + 1 = 2)", low=1)
    edit_lr: float = option(1e-4, "initial per-layer edit step α", low=0.0, low_open=True)
    lr: float = option(1e-4, "Adam learning rate of the hypernetwork", low=0.0, low_open=True)
    lr_lr: float = option(1e-4, "Adam learning rate of the per-layer steps α", low=0.0, low_open=True)
    c_edit: float = option(0.1, "weight of the edit loss", low=0.0)
    c_loc: float = option(1.0, "weight of the locality KL", low=0.0)
    edits_per_step: int = option(4, "requests edited together in one training step", low=1)
    steps: int = option(1000, "maximum training steps", low=1)
    max_seconds: float | None = option(None, "stop after this many seconds", low=0.0, low_open=True)
    grad_clip: float = option(100.0, "gradient-norm clip of the outer update", low=0.0, low_open=True)
    seed: int = option(0, "seed of the initialisation and the sampling", low=0)
    log_every: int = option(25, "record the running losses every this many steps", low=1)


def default_mend_targets(model: nn.Module, count: int = 3) -> list[str]:
    """The last `count` MLP down-projections, from the architecture table (MEND edits the last layers)."""
    model_type = getattr(getattr(model, "config", None), "model_type", None)
    template = DEFAULT_TARGETS.get(model_type)
    if template is None:
        raise CrispEditError(f"no default MEND layers for model type {model_type!r}; choose them with `layers`")
    names = resolve_targets(model, "re:" + template.replace(".", r"\.").replace("{}", r"\d+"))
    return names[-count:]


def _edited_params(model: nn.Module, targets: Sequence[str], updates: dict[str, torch.Tensor]) -> dict[str, Any]:
    out = {}
    for n in targets:
        m = model.get_submodule(n)
        W = weight_matrix(m) + updates[n].to(weight_matrix(m).dtype)
        out[f"{n}.weight"] = W.T if isinstance(m, Conv1D) else W
    return out


def _locality_batch(tokenizer, requests: Sequence[EditRequest], device) -> dict[str, torch.Tensor] | None:
    seqs = []
    for r in requests:
        for loc in r.locality:
            if loc.answer and loc.answer.strip():
                pair = encode_pair(tokenizer, loc.prompt, loc.answer, PromptFormat("raw"), add_eos=False)
                seqs.append(pair.input_ids)
            else:
                seqs.append(list(tokenizer(loc.prompt, add_special_tokens=True)["input_ids"]))
    if not seqs:
        return None
    b = collate(seqs, pad_id_of(tokenizer), padding_side="right")
    return {k: v.to(device) for k, v in b.items()}


def _outer_requests(requests: Sequence[EditRequest]) -> list[EditRequest]:
    """The edit itself and its rephrases, all with the new target."""
    out = []
    for r in requests:
        out.append(r)
        out.extend(EditRequest(prompt=q, target=r.target) for q in r.rephrases)
    return out


def train_mend(model: nn.Module, tokenizer, requests: Sequence[EditRequest], cfg: MendTrainConfig = MendTrainConfig(),
               data: dict[str, Any] | None = None, progress: bool = False) -> tuple[MendNet, dict[str, Any]]:
    """Train a MEND hypernetwork for `model` on `requests` (a train split); returns it and its record."""
    from crispedit.curvature.api import model_fingerprint

    if len(requests) < cfg.edits_per_step:
        raise CrispEditError(f"MEND training needs at least {cfg.edits_per_step} requests, got {len(requests)}")
    targets = resolve_targets(model, cfg.layers) if cfg.layers is not None else default_mend_targets(model)
    device = next(model.parameters()).device
    torch.manual_seed(cfg.seed)
    net = MendNet([(n, *layer_io_dims(model.get_submodule(n))) for n in targets], rank=cfg.rank,
                  n_blocks=cfg.n_blocks, edit_lr=cfg.edit_lr).to(device)
    lr_param = net.edit_lrs
    others = [p for p in net.parameters() if p is not lr_param]
    opt = torch.optim.Adam([{"params": others, "lr": cfg.lr}, {"params": [lr_param], "lr": cfg.lr_lr}])
    gen = torch.Generator().manual_seed(cfg.seed)
    order: list[int] = []
    curve: list[dict[str, float]] = []
    window: list[tuple[float, float, float, float]] = []
    t0, c0 = time.perf_counter(), time.process_time()
    step = 0
    stopped = "steps"
    with frozen_model(model):
        net.train()
        while step < cfg.steps:
            if cfg.max_seconds is not None and time.perf_counter() - t0 >= cfg.max_seconds:
                stopped = "max_seconds"
                break
            if len(order) < cfg.edits_per_step:
                order += torch.randperm(len(requests), generator=gen).tolist()
            batch_reqs = [requests[i] for i in order[: cfg.edits_per_step]]
            del order[: cfg.edits_per_step]

            factors = gradient_factors(model, edit_batch(tokenizer, batch_reqs, device), targets)
            net.observe(factors)
            updates = net.updates(factors)
            params = _edited_params(model, targets, updates)

            outer = edit_batch(tokenizer, _outer_requests(batch_reqs), device)
            with torch.no_grad():
                pre_nll = per_request_nll(model(input_ids=outer["input_ids"],
                                                attention_mask=outer["attention_mask"]).logits, outer["targets"]).mean()
            post = functional_call(model, params, (), {"input_ids": outer["input_ids"],
                                                       "attention_mask": outer["attention_mask"]})
            l_edit = per_request_nll(post.logits, outer["targets"]).mean()
            l_loc = torch.zeros((), device=device)
            loc = _locality_batch(tokenizer, batch_reqs, device)
            if loc is not None:
                with torch.no_grad():
                    base_lp = torch.log_softmax(model(**loc).logits.float(), -1)
                post_lp = torch.log_softmax(functional_call(model, params, (), dict(loc)).logits.float(), -1)
                kl = (base_lp.exp() * (base_lp - post_lp)).sum(-1)
                mask = loc["attention_mask"].float()
                l_loc = (kl * mask).sum() / mask.sum()
            loss = cfg.c_edit * l_edit + cfg.c_loc * l_loc
            if not torch.isfinite(loss):
                raise CrispEditError(f"MEND training diverged at step {step + 1} (loss {float(loss)})")
            opt.zero_grad()
            loss.backward()
            torch.nn.utils.clip_grad_norm_(net.parameters(), cfg.grad_clip)
            opt.step()
            step += 1
            window.append((float(loss.detach()), float(l_edit.detach()), float(l_loc.detach()), float(pre_nll)))
            if step % cfg.log_every == 0:
                m = [sum(x[i] for x in window) / len(window) for i in range(4)]
                curve.append({"step": step, "seconds": time.perf_counter() - t0, "loss": m[0], "edit_nll": m[1],
                              "loc_kl": m[2], "pre_edit_nll": m[3]})
                window = []
                if progress:
                    log.info("MEND step %d: loss %.4f, edit NLL %.3f (before %.3f), locality KL %.4f",
                             step, m[0], m[1], m[3], m[2])
    seconds = time.perf_counter() - t0
    net.eval()
    record = {
        "model": model_fingerprint(model, targets),
        "training": {
            "config": cfg.to_dict(), "data": data or {}, "n_requests": len(requests),
            "steps": step, "stopped": stopped, "seconds": seconds, "cpu_seconds": time.process_time() - c0,
            "seconds_per_step": seconds / max(step, 1), "threads": torch.get_num_threads(),
            "device": str(device), "curve": curve,
            "edit_lrs": [float(x) for x in net.edit_lrs.detach()],
        },
    }
    return net, record


def file_sha256(path: str | Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def main(argv: Sequence[str] | None = None) -> int:
    """Train a hypernetwork from the command line (a thin shell over `train_mend`)."""
    from crispedit.cli.common import add_config_options, config_from_args
    from crispedit.data.readers import load_requests
    from crispedit.models.loading import load_model

    p = argparse.ArgumentParser(prog="python -m crispedit.baselines.mend_train", description=__doc__.split("\n")[0])
    p.add_argument("--model", required=True)
    p.add_argument("--data", required=True, help="edit requests of a TRAIN split (never the edit split)")
    p.add_argument("--out", required=True)
    p.add_argument("--limit", type=int, default=None)
    p.add_argument("--device", default="cpu")
    p.add_argument("--force", action="store_true")
    add_config_options(p, MendTrainConfig)
    args = p.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    cfg = config_from_args(args, MendTrainConfig)
    if Path(args.out).exists() and not args.force:
        raise SystemExit(f"error: {args.out} exists (choose another folder, or --force)")
    requests = load_requests(args.data, limit=args.limit)
    model, tok = load_model(args.model, device=args.device)
    data = {"path": str(args.data), "sha256": file_sha256(args.data), "limit": args.limit}
    net, record = train_mend(model, tok, requests, cfg, data=data, progress=True)
    save_hypernet(args.out, net, record, overwrite=args.force)
    t = record["training"]
    print(f"MEND: {t['steps']} steps in {t['seconds']:.0f} s ({t['seconds_per_step']:.2f} s/step) -> {args.out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

