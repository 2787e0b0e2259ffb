"""The MNIST → Fashion-MNIST sweep: projected fine-tuning of LeNet-5's head for every (method, γ).

Every run starts from the same pretrained head, sees the same Fashion-MNIST batches (same seed) and uses
the same optimiser (SGD with momentum on the projected gradient: each step's gradient is projected onto
the γ-approximate null space of the MNIST loss curvature, so the momentum buffer, a sum of projected
gradients, stays in that subspace). When the fine-tuned weights have moved more than `drift` (relative
norm change) since the projector was computed, the curvature is recomputed at the current weights and the
momentum buffer is projected onto the new subspace. The decomposition at θ0 does not depend on γ and is
computed once per method.
"""

from __future__ import annotations

import copy
import math
import os
import platform
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Sequence

import torch
from torch import nn
from tqdm.auto import tqdm

from crispedit.io import write_json
from crispedit.study.curvatures import CURVATURE_METHODS, Basis, compute_basis, num_threads, tuned_params
from crispedit.study.data import StudyData, load_study_data
from crispedit.study.lenet import Head, PretrainConfig, features, load_or_pretrain

METHODS = CURVATURE_METHODS + ("ft",)
FULL_KS = (0.1, 0.5, 1.0, 1.5, 2.0, 2.5, 3.0, 4.0, 5.5, 7.0)
QUICK_KS = (0.5, 2.0, 5.0)
JSON_NAME = "study_mnist.json"
PNG_NAME = "study_mnist.png"


@dataclass(frozen=True)
class FinetuneConfig:
    epochs: int = 1
    batch_size: int = 128
    lr: float = 0.02
    momentum: float = 0.0  # plain projected SGD, as in the paper's PGD
    drift: float = 0.25  # recompute the projector when ‖θ − θ_last‖ / ‖θ_last‖ exceeds this
    seed: int = 0


@dataclass(frozen=True)
class StudyConfig:
    pretrain: PretrainConfig = field(default_factory=PretrainConfig)
    finetune: FinetuneConfig = field(default_factory=FinetuneConfig)
    ks: tuple[float, ...] = FULL_KS
    methods: tuple[str, ...] = METHODS
    curvature_size: int | None = None  # MNIST training digits used for the capability curvature (None: all)
    fashion_train_size: int | None = None  # Fashion-MNIST training images used for fine-tuning (None: all)
    mnist_train_size: int | None = None  # MNIST digits used for pretraining (None: all 10,000)
    min_pretrain_acc: float | None = 0.985


def full_config() -> StudyConfig:
    """The configuration of the committed sweep (docs/study-mnist.md)."""
    return StudyConfig(pretrain=PretrainConfig(hidden=16), curvature_size=2000)


def quick_config() -> StudyConfig:
    """A reduced sweep for tests: small head, short pretraining, data subsets, three γ."""
    return StudyConfig(
        pretrain=PretrainConfig(hidden=8, epochs=3, batch_size=64, lr=3e-3, shift=0),
        finetune=FinetuneConfig(epochs=2, batch_size=32, lr=0.01, drift=0.5),
        ks=QUICK_KS, curvature_size=500, fashion_train_size=6000, mnist_train_size=4000, min_pretrain_acc=None)


def gamma_of(k: float) -> float:
    return 1.0 - 10.0 ** (-k)


@dataclass
class Features:
    """Frozen trunk features of every split (the fine-tuned head only ever sees these)."""

    curv_x: torch.Tensor
    curv_y: torch.Tensor
    fashion_x: torch.Tensor
    fashion_y: torch.Tensor
    mnist_test_x: torch.Tensor
    mnist_test_y: torch.Tensor
    fashion_test_x: torch.Tensor
    fashion_test_y: torch.Tensor


@torch.no_grad()
def head_accuracy(head: Head, x: torch.Tensor, y: torch.Tensor) -> float:
    return float((head(x).argmax(-1) == y).double().mean())


def _flat(params: Sequence[torch.Tensor]) -> torch.Tensor:
    return torch.cat([p.detach().reshape(-1) for p in params])


def finetune(head0: Head, method: str, gamma: float | None, basis0: Basis | None, feats: Features,
             cfg: FinetuneConfig, threads: int | None = None) -> dict:
    """One projected fine-tuning run on Fashion-MNIST; returns the point's record. The steps run on one
    thread; `threads` is used for recomputing a dense curvature matrix (None: the current setting)."""
    threads = threads if threads is not None else torch.get_num_threads()
    with num_threads(1):
        return _finetune(head0, method, gamma, basis0, feats, cfg, threads)


def _finetune(head0: Head, method: str, gamma: float | None, basis0: Basis | None, feats: Features,
              cfg: FinetuneConfig, threads: int) -> dict:
    t0 = time.perf_counter()
    head = copy.deepcopy(head0)
    for p in head.parameters():
        p.requires_grad_(False)
    params = tuned_params(head)
    for p in params:
        p.requires_grad_(True)
    proj = basis0.projector(gamma) if basis0 is not None else None
    kept0 = proj.kept_fraction if proj is not None else 1.0
    anchor = _flat(params)
    bufs = [torch.zeros_like(p) for p in params]
    gen = torch.Generator().manual_seed(cfg.seed)
    recomputes, recompute_s = 0, 0.0
    n = len(feats.fashion_y)
    for _ in range(cfg.epochs):
        perm = torch.randperm(n, generator=gen)
        for i in range(0, n, cfg.batch_size):
            idx = perm[i:i + cfg.batch_size]
            loss = nn.functional.cross_entropy(head(feats.fashion_x[idx]), feats.fashion_y[idx])
            grads = list(torch.autograd.grad(loss, params))
            if proj is not None:
                grads = proj(grads)
            with torch.no_grad():
                for p, b, g in zip(params, bufs, grads):
                    b.mul_(cfg.momentum).add_(g)
                    p.sub_(cfg.lr * b)
            if not math.isfinite(float(loss.detach())):
                raise FloatingPointError(f"{method} γ={gamma}: loss became {float(loss.detach())}")
            if proj is not None:
                cur = _flat(params)
                if float((cur - anchor).norm()) > cfg.drift * float(anchor.norm()):
                    tr = time.perf_counter()
                    proj = compute_basis(method, head, feats.curv_x, feats.curv_y, threads).projector(gamma)
                    recompute_s += time.perf_counter() - tr
                    recomputes += 1
                    anchor = cur
                    with torch.no_grad():
                        for b, pb in zip(bufs, proj(bufs)):
                            b.copy_(pb)
    with torch.no_grad():
        mnist_loss = float(nn.functional.cross_entropy(head(feats.mnist_test_x), feats.mnist_test_y))
    return {
        "mnist_acc": head_accuracy(head, feats.mnist_test_x, feats.mnist_test_y),
        "fashion_acc": head_accuracy(head, feats.fashion_test_x, feats.fashion_test_y),
        "mnist_test_loss": mnist_loss,
        "kept_fraction": kept0,
        "recomputes": recomputes,
        "relative_change": float((_flat(params) - _flat(tuned_params(head0))).norm() / _flat(tuned_params(head0)).norm()),
        "seconds": time.perf_counter() - t0,
        "recompute_seconds": recompute_s,
    }


def prepare(data: StudyData, cfg: StudyConfig, cache_dir: Path | None, progress: bool) -> tuple[Head, Features, dict]:
    t0 = time.perf_counter()
    train = data.mnist_train.subset(cfg.mnist_train_size)
    model, report = load_or_pretrain(train, data.mnist_test, cfg.pretrain, cache_dir, progress, cfg.min_pretrain_acc)
    t1 = time.perf_counter()
    curv = data.mnist_train.subset(cfg.curvature_size)
    fash = data.fashion_train.subset(cfg.fashion_train_size)
    feats = Features(features(model, curv.images), curv.labels, features(model, fash.images), fash.labels,
                     features(model, data.mnist_test.images), data.mnist_test.labels,
                     features(model, data.fashion_test.images), data.fashion_test.labels)
    head = copy.deepcopy(model.head)
    timing = {"pretrain_s": t1 - t0, "pretrain_cached": bool(report.get("cached")),
              "features_s": time.perf_counter() - t1}
    return head, feats, {"pretrain": report, **timing}


def run_study(out_dir: str | os.PathLike, quick: bool = False, progress: bool = True,
              config: StudyConfig | None = None, cache_dir: str | os.PathLike | None = None,
              data: StudyData | None = None, plot: bool = True, threads: int | None = None) -> dict:
    """Run the sweep and write `study_mnist.json` (+ `study_mnist.png`) into out_dir; returns the JSON dict.

    quick: the reduced sweep of `quick_config()` (tests, smoke runs). cache_dir: where the pretrained
    LeNet-5 is cached (default: the crispedit home folder). threads: intra-op threads for pretraining,
    the dense curvature matrices and their eigh (None: torch's current setting); the many small
    fine-tuning steps always run on one thread."""
    threads = threads if threads is not None else torch.get_num_threads()
    t_start = time.perf_counter()
    cfg = config if config is not None else (quick_config() if quick else full_config())
    unknown = [m for m in cfg.methods if m not in METHODS]
    if unknown:
        raise ValueError(f"unknown methods {unknown}; expected some of {METHODS}")
    out = Path(out_dir)
    data = data if data is not None else load_study_data()
    with num_threads(threads):
        head, feats, prep = prepare(data, cfg, Path(cache_dir) if cache_dir is not None else None, progress)
    pre = {"mnist_acc": head_accuracy(head, feats.mnist_test_x, feats.mnist_test_y),
           "fashion_acc": head_accuracy(head, feats.fashion_test_x, feats.fashion_test_y)}
    runs = [(m, k) for m in cfg.methods if m != "ft" for k in cfg.ks] + [("ft", None)] * ("ft" in cfg.methods)
    points, basis_timing, ft_timing = [], {}, {}
    bases: dict[str, Basis] = {}
    bar = tqdm(runs, desc="MNIST→Fashion sweep", disable=not progress)
    for method, k in bar:
        bar.set_postfix(method=method, k=k)
        if method != "ft" and method not in bases:
            bases.clear()  # one method's decomposition at a time (the dense ones are large)
            bases[method] = compute_basis(method, head, feats.curv_x, feats.curv_y, threads)
            basis_timing[method] = bases[method].info
        gamma = gamma_of(k) if k is not None else None
        rec = finetune(head, method, gamma, bases.get(method), feats, cfg.finetune, threads)
        points.append({"method": method, "gamma": gamma, "k": k, **rec})
        ft_timing[method] = ft_timing.get(method, 0.0) + rec["seconds"]
        if progress:
            tqdm.write(f"{method:>22} k={k!s:>4} mnist {rec['mnist_acc']:.4f} fashion {rec['fashion_acc']:.4f} "
                       f"kept {rec['kept_fraction']:.3f} recomputes {rec['recomputes']} ({rec['seconds']:.1f}s)")
    d = sum(p.numel() for p in tuned_params(head))
    result = {
        "points": points,
        "reference": {"pretrained": pre},
        "config": {
            "quick": quick,
            "pretrain": asdict(cfg.pretrain),
            "finetune": asdict(cfg.finetune),
            "ks": list(cfg.ks),
            "methods": list(cfg.methods),
            "tuned_parameters": {"layers": ["head.fc2.weight", "head.fc3.weight"], "count": d,
                                 "biases": "frozen"},
            "curvature_examples": len(feats.curv_y),
            "fashion_train_examples": len(feats.fashion_y),
            "mnist_pretrain_examples": len(data.mnist_train.subset(cfg.mnist_train_size)),
            "threshold_scope": {"hessian": "global", "ggn": "global", "kfac": "global", "ekfac": "global",
                                "activation-covariance": "layer"},
            "kfac_labels": "exact",
            "pretrained_test_acc": prep["pretrain"]["test_acc"],
        },
        "timing": {
            "pretrain_s": prep["pretrain_s"],
            "pretrain_cached": prep["pretrain_cached"],
            "pretrain_train_s": prep["pretrain"].get("seconds"),
            "features_s": prep["features_s"],
            "basis_at_theta0": basis_timing,
            "finetune_s_by_method": ft_timing,
            "total_s": time.perf_counter() - t_start,
            "threads": threads,
            "cpu_count": os.cpu_count(),
            "platform": platform.platform(),
            "torch": torch.__version__,
        },
    }
    from crispedit.study.report import frontier

    result["summary"] = {"best_fashion_acc_at_mnist_acc": frontier(result)}
    write_json(out / JSON_NAME, result)
    if plot:
        from crispedit.study.report import plot_tradeoff

        plot_tradeoff(result, out / PNG_NAME)
    return result
