"""MEND: editing by a learned transform of the fine-tuning gradient (Mitchell et al., "Fast Model Editing at
Scale", ICLR 2022).

The gradient of a linear layer's loss is a sum of rank-one terms, ∇W = Σ_t δ_t u_tᵀ (u_t the layer's input at
position t, δ_t the loss gradient with respect to its output). MEND maps each pair through a small network
g_φ — inputs normalised by running statistics of training pairs, then residual low-rank blocks
x ← x + relu(s_l ⊙ (U V x + b) + o_l) shared by all layers of one shape, with a per-layer scale s_l and
offset o_l — into (ũ_t, δ̃_t), and edits

    W̃ = W − α_l Σ_t δ̃_t ũ_tᵀ           (α_l a learned per-layer step, initialised to `edit_lr`).

This module holds the network, its file format and the edit; `mend_train` trains it. A batch of requests
is edited with one pseudo-gradient: the edit loss is the sum over requests of each request's mean target
token NLL, so each request's factors have the scale of a single edit, as in training.

File format (no pickle): `hypernet.safetensors` (φ, the normalisation statistics, α) and `hypernet.json`
(format, targets and shapes, network sizes, the base model's identity and target-weight fingerprint, and the
training record: data file and hash, steps, seconds, losses).
"""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Any, Sequence

import torch
from safetensors.torch import load_file, save_file
from torch import nn

from crispedit import __version__
from crispedit.baselines.common import Timer, WeightEditor, chunks, frozen_model, next_token_targets, \
    upcast
from crispedit.baselines.config import MendConfig
from crispedit.data.records import EditRequest, check_requests
from crispedit.editing.delta import EditDelta
from crispedit.errors import CrispEditError
from crispedit.formatting import PromptFormat, collate, encode_pair
from crispedit.io import atomic_dir, read_format_record
from crispedit.models.runtime import pad_id_of
from crispedit.models.targets import has_layer

FORMAT = "crispedit-mend"
FORMAT_VERSION = 1
TENSORS = "hypernet.safetensors"
RECORD = "hypernet.json"


# ---------------------------------------------------------------------------------------------------- network

class LowRankResidual(nn.Module):
    """x + relu(s_l ⊙ (U V x + b) + o_l): starts as the identity (U = 0)."""

    def __init__(self, dim: int, rank: int, n_modes: int):
        super().__init__()
        r = min(rank, dim)
        self.U = nn.Parameter(torch.zeros(dim, r))
        self.V = nn.Parameter(torch.randn(r, dim) / dim ** 0.5)
        self.bias = nn.Parameter(torch.zeros(dim))
        self.mode_scale = nn.Parameter(torch.ones(n_modes, dim))
        self.mode_shift = nn.Parameter(torch.zeros(n_modes, dim))

    def forward(self, x: torch.Tensor, mode: int) -> torch.Tensor:
        pre = (x @ self.V.T) @ self.U.T + self.bias
        pre = pre * self.mode_scale[mode] + self.mode_shift[mode]
        return x + pre.clamp(min=0)


class GradientTransform(nn.Module):
    """g_φ for all target layers of one shape `(d_in, d_out)`: normalisation then `n_blocks` residual blocks."""

    def __init__(self, d_in: int, d_out: int, rank: int, n_blocks: int, n_modes: int):
        super().__init__()
        self.d_in, self.d_out = d_in, d_out
        dim = d_in + d_out
        self.blocks = nn.ModuleList([LowRankResidual(dim, rank, n_modes) for _ in range(n_blocks)])
        self.register_buffer("count", torch.zeros((), dtype=torch.float64))
        self.register_buffer("mean", torch.zeros(dim, dtype=torch.float64))
        self.register_buffer("m2", torch.zeros(dim, dtype=torch.float64))

    def observe(self, x: torch.Tensor) -> None:
        """Add rows `[m, d_in + d_out]` to the running statistics (exact pooled merge)."""
        x = x.detach().double()
        m = x.shape[0]
        if m == 0:
            return
        mean_b = x.mean(0)
        m2_b = ((x - mean_b) ** 2).sum(0)
        n0 = float(self.count)
        n = n0 + m
        d = mean_b - self.mean
        self.mean.add_(d * (m / n))
        self.m2.add_(m2_b + d ** 2 * (n0 * m / n))
        self.count.fill_(n)

    def normalize(self, x: torch.Tensor) -> torch.Tensor:
        if float(self.count) < 2:
            raise CrispEditError("the MEND normaliser has seen fewer than two gradient factors; train it first")
        std = (self.m2 / (self.count - 1)).sqrt()
        return ((x.double() - self.mean) / (std + 1e-7)).to(x.dtype)

    def forward(self, u: torch.Tensor, delta: torch.Tensor, mode: int) -> tuple[torch.Tensor, torch.Tensor]:
        x = self.normalize(torch.cat([u, delta], -1))
        for b in self.blocks:
            x = b(x, mode)
        return x[:, : self.d_in], x[:, self.d_in :]


class MendNet(nn.Module):
    """The hypernetwork for a list of target layers: one `GradientTransform` per shape, one α per layer."""

    def __init__(self, targets: Sequence[tuple[str, int, int]], rank: int = 1920, n_blocks: int = 2,
                 edit_lr: float = 1e-4):
        super().__init__()
        self.targets = [(n, int(a), int(b)) for n, a, b in targets]
        shapes: dict[tuple[int, int], list[str]] = {}
        for n, d_in, d_out in self.targets:
            shapes.setdefault((d_in, d_out), []).append(n)
        self.shape_members = shapes
        self.transforms = nn.ModuleDict({f"{a}x{b}": GradientTransform(a, b, rank, n_blocks, len(ns))
                                         for (a, b), ns in shapes.items()})
        self.edit_lrs = nn.Parameter(torch.full((len(self.targets),), float(edit_lr)))
        self.rank, self.n_blocks = rank, n_blocks

    def transform_of(self, name: str) -> tuple[GradientTransform, int]:
        for (a, b), ns in self.shape_members.items():
            if name in ns:
                return self.transforms[f"{a}x{b}"], ns.index(name)
        raise KeyError(name)

    def observe(self, factors: dict[str, tuple[torch.Tensor, torch.Tensor]]) -> None:
        for n, (u, d) in factors.items():
            self.transform_of(n)[0].observe(torch.cat([u, d], -1))

    def pseudo_gradients(self, factors: dict[str, tuple[torch.Tensor, torch.Tensor]]) -> dict[str, torch.Tensor]:
        """Σ_t δ̃_t ũ_tᵀ per target `[d_out, d_in]` from factors {name: (u `[m, d_in]`, δ `[m, d_out]`)}."""
        out = {}
        dtype = self.edit_lrs.dtype
        for n, (u, d) in factors.items():
            g, mode = self.transform_of(n)
            ut, dt = g(u.to(dtype), d.to(dtype), mode)
            out[n] = dt.T @ ut
        return out

    def updates(self, factors: dict[str, tuple[torch.Tensor, torch.Tensor]]) -> dict[str, torch.Tensor]:
        """ΔW = −α_l Σ_t δ̃_t ũ_tᵀ per target."""
        pg = self.pseudo_gradients(factors)
        return {n: -self.edit_lrs[i] * pg[n] for i, (n, _, _) in enumerate(self.targets) if n in pg}


# ---------------------------------------------------------------------------------------------------- factors

def edit_batch(tokenizer, requests: Sequence[EditRequest], device) -> dict[str, torch.Tensor]:
    """Prompt + target (no EOS, as MEND's data) as a right-padded batch with next-token targets."""
    pairs = [encode_pair(tokenizer, r.prompt, r.target, PromptFormat("raw"), add_eos=False) for r in requests]
    b = collate([p.input_ids for p in pairs], pad_id_of(tokenizer), labels=[p.labels for p in pairs],
                padding_side="right")
    return {"input_ids": b["input_ids"].to(device), "attention_mask": b["attention_mask"].to(device),
            "targets": next_token_targets(b["labels"]).to(device)}


def per_request_nll(logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """Mean target-token NLL of each sequence `[B]` (targets −100 = not scored)."""
    mask = targets != -100
    lp = torch.log_softmax(upcast(logits), -1)
    nll = -lp.gather(-1, targets.clamp_min(0)[..., None])[..., 0] * mask
    return nll.sum(1) / mask.sum(1).clamp_min(1)


def gradient_factors(model: nn.Module, batch: dict[str, torch.Tensor], targets: Sequence[str]
                     ) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
    """(u, δ) per target at every position whose output gradient is non-zero, for the loss Σ_i mean-NLL_i."""
    inputs: dict[str, torch.Tensor] = {}
    leaves: dict[str, torch.Tensor] = {}

    def hook(name):
        def fn(_m, inp, out):
            inputs[name] = inp[0].detach()
            leaves[name] = torch.zeros_like(out, requires_grad=True)
            return out + leaves[name]
        return fn

    handles = [model.get_submodule(n).register_forward_hook(hook(n)) for n in targets]
    try:
        logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
    finally:
        for h in handles:
            h.remove()
    loss = per_request_nll(logits, batch["targets"]).sum()
    grads = torch.autograd.grad(loss, [leaves[n] for n in targets])
    out = {}
    for n, g in zip(targets, grads):
        u = inputs[n].reshape(-1, inputs[n].shape[-1])
        d = g.reshape(-1, g.shape[-1])
        nz = (d != 0).any(-1) & (u != 0).any(-1)
        out[n] = (u[nz], d[nz])
    return out


# ---------------------------------------------------------------------------------------------------- files

def save_hypernet(path: str | Path, net: MendNet, record: dict[str, Any], overwrite: bool = False) -> Path:
    tensors = {k: v.detach().cpu().contiguous() for k, v in net.state_dict().items()}
    rec = dict(record, format=FORMAT, format_version=FORMAT_VERSION, crispedit_version=__version__,
               targets=[{"name": n, "d_in": a, "d_out": b} for n, a, b in net.targets],
               network={"rank": net.rank, "n_blocks": net.n_blocks})
    path = Path(path)
    if overwrite and path.exists() and any(path.iterdir()):
        read_hypernet_record(path)  # replace only a hypernetwork folder crispedit wrote
    with atomic_dir(path, overwrite=overwrite, require_marker=False) as tmp:
        save_file(tensors, str(tmp / TENSORS), metadata={"format": FORMAT})
        (tmp / RECORD).write_text(json.dumps(rec, indent=2) + "\n")
    return Path(path)


def read_hypernet_record(path: str | Path) -> dict[str, Any]:
    path = Path(path)
    rec = path / RECORD
    if not rec.is_file():
        raise CrispEditError(f"{path} is not a MEND hypernetwork folder (no {RECORD}); train one with "
                             "crispedit.baselines.mend_train")
    record = read_format_record(rec, FORMAT)
    if record.get("format_version") != FORMAT_VERSION:
        raise CrispEditError(f"{rec}: field 'format_version' is {record.get('format_version')!r}, this crispedit "
                             f"reads {FORMAT_VERSION}")
    return record


def load_hypernet(path: str | Path) -> tuple[MendNet, dict[str, Any]]:
    path = Path(path)
    record = read_hypernet_record(path)
    net = MendNet([(t["name"], t["d_in"], t["d_out"]) for t in record["targets"]],
                  rank=record["network"]["rank"], n_blocks=record["network"]["n_blocks"])
    try:
        tensors = load_file(str(path / TENSORS))
    except Exception as e:  # noqa: BLE001 - any unreadable tensor file is a user error
        raise CrispEditError(f"{path / TENSORS}: cannot read ({e})") from None
    missing, unexpected = net.load_state_dict(tensors, strict=False)
    if missing or unexpected:
        raise CrispEditError(f"{path / TENSORS}: tensors do not match {RECORD} (missing {missing[:3]}, "
                             f"unexpected {unexpected[:3]})")
    return net, record


def check_hypernet_model(record: dict[str, Any], model: nn.Module, where: str) -> None:
    """Refuse a model other than the one the hypernetwork was trained on (identity or target weights)."""
    from crispedit.curvature.api import model_fingerprint
    from crispedit.curvature.cache import compare_fingerprints

    targets = [t["name"] for t in record["targets"]]
    missing = [t for t in targets if not has_layer(model, t)]
    if missing:
        raise CrispEditError(f"{where}: the model has no layer(s) {missing} that this hypernetwork edits")
    diffs = compare_fingerprints(record["model"], model_fingerprint(model, targets))
    if diffs:
        raise CrispEditError(f"{where} was trained for another model ({'; '.join(diffs)})")


# ---------------------------------------------------------------------------------------------------- editing

def mend_updates(model: nn.Module, tokenizer, net: MendNet, requests: Sequence[EditRequest], batch_size: int = 16
                 ) -> dict[str, torch.Tensor]:
    """ΔW per target for one batch edit of `requests` (factors gathered over forward batches, one update)."""
    device = next(model.parameters()).device
    targets = [n for n, _, _ in net.targets]
    acc: dict[str, list[tuple[torch.Tensor, torch.Tensor]]] = {n: [] for n in targets}
    for s in range(0, len(requests), batch_size):
        f = gradient_factors(model, edit_batch(tokenizer, requests[s : s + batch_size], device), targets)
        for n in targets:
            acc[n].append(f[n])
    factors = {n: (torch.cat([u for u, _ in v]).cpu(), torch.cat([d for _, d in v]).cpu()) for n, v in acc.items()}
    net = net.eval()
    with torch.no_grad():
        return {n: u.double() for n, u in net.updates(factors).items()}


def run_mend(model: nn.Module, tokenizer, requests: Sequence[EditRequest], cfg: MendConfig, curvature=None,
             net: MendNet | None = None, net_record: dict[str, Any] | None = None,
             progress: bool = False) -> EditDelta:
    """Edit `model` in place with a trained MEND hypernetwork (from `cfg.hypernet`, or `net` directly)."""
    check_requests(requests)
    t0 = time.perf_counter()
    timer = Timer()
    if net is None:
        if cfg.hypernet is None:
            raise CrispEditError("method 'mend' needs a trained hypernetwork (MendConfig.hypernet)")
        with timer("load"):
            net, net_record = load_hypernet(cfg.hypernet)
        check_hypernet_model(net_record, model, cfg.hypernet)
    targets = [n for n, _, _ in net.targets]
    with frozen_model(model), WeightEditor(model, targets) as editor:
        for chunk in chunks(requests, cfg.chunk_size):
            with timer("edit"):
                ups = mend_updates(model, tokenizer, net, chunk, cfg.batch_size)
            for n, dW in ups.items():
                editor.add_(n, dW)
        info = {"targets_edited": targets,
                "hypernet": None if net_record is None else {
                    "path": cfg.hypernet, "training": net_record.get("training"),
                    "edit_lrs": [float(x) for x in net.edit_lrs.detach()]}}
        return editor.finish(requests, "mend", cfg, time.perf_counter() - t0, timer.totals, curvature, info)

