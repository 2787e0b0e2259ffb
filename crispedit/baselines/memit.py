"""MEMIT: closed-form mass editing of MLP down-projections (Meng et al., "Mass-Editing Memory in a
Transformer", ICLR 2023).

For edited layers l_1 < … < l_L (down-projections `W [d_out, d_in]`, d_out = the residual width):

1. target values z_i at the output of block l_L, subject's last token (`values.optimize_values`);
2. for each layer l_j in order, on the model already carrying the updates of l_1 … l_{j−1}:
   keys K = [k_1 … k_n] `[d_in, n]` (down-projection inputs at the subject's last token, averaged over
   context prefixes), residuals R = (z − h_{l_L}) / (L − j + 1) `[d_out, n]` (the remaining error spread
   evenly over the remaining layers), and the update

        ΔW = R Kᵀ (λ C + K Kᵀ)⁻¹,

   the minimiser of ‖ΔW K − R‖² + λ tr(ΔW C ΔWᵀ): the normal equations ΔW (λC + KKᵀ) = R Kᵀ.

C = E[k kᵀ] is the second moment of the layer's inputs over a general text corpus, which is exactly the
K-FAC input factor A of the curvature cache over the capability corpus, so one cache serves CrispEdit and
MEMIT. MEMIT's statistics include every token, so the default uses the sink-inclusive A
(`LayerStats.full_input_factor()`): the first position's large activations then enter C as they enter
MEMIT's own covariance, and the update avoids disturbing them; `covariance="without_sink"` uses the A
without the first position instead. λ (`mom2_weight`) is MEMIT's "mom2_update_weight".

The sequential variant edits chunk after chunk, each on the model edited so far (C stays the base's).
"""

from __future__ import annotations

import logging
import time
from typing import Any, Callable, Sequence

import torch
from torch import nn

from crispedit.baselines.common import Timer, WeightEditor, chunks, frozen_model
from crispedit.baselines.keys import block_of, check_down_projections, check_subjects, \
    generate_context_prefixes, layer_number, subject_keys, subject_outputs
from crispedit.baselines.values import optimize_values
from crispedit.baselines.config import Covariance, LocateEditConfig, MemitConfig  # noqa: F401 - re-exported
from crispedit.data.records import EditRequest, check_requests
from crispedit.editing.delta import EditDelta
from crispedit.errors import CrispEditError

log = logging.getLogger(__name__)


def memit_solve(K: torch.Tensor, R: torch.Tensor, C: torch.Tensor, lam: float) -> torch.Tensor:
    """ΔW = R Kᵀ (λC + KKᵀ)⁻¹ in float64.

    Args:
        K: keys `[d_in, n]`.  R: residuals `[d_out, n]`.  C: key second moment `[d_in, d_in]`.  lam: λ.

    Returns:
        ΔW `[d_out, d_in]` (float64).
    """
    K, R, C = K.double(), R.double(), C.double()
    M = lam * C + K @ K.T
    return torch.linalg.solve(M, K @ R.T).T


def key_covariance(curvature, name: str, covariance: str = "all_tokens", full_rank: bool = False) -> torch.Tensor:
    """C = E[kkᵀ] of a down-projection from the curvature cache (float64 `[d_in, d_in]`).

    Raises:
        CrispEditError: with `full_rank`, when the cache holds fewer tokens than C has dimensions (C is then
            singular, and MEMIT's λC + KKᵀ cannot be inverted).
    """
    s = curvature.stats[name]
    n = s.n + (s.n_sink if covariance == "all_tokens" else 0)
    if full_rank and n < s.d_in:
        raise CrispEditError(f"the curvature cache holds {n} tokens for {name}, fewer than its {s.d_in} inputs: "
                             "MEMIT's key covariance is singular; collect more text (crispedit curvature --samples)")
    C = s.full_input_factor() if covariance == "all_tokens" else s.factors()[0]
    return C.double().cpu()


def resolve_cache_targets(method: str, model: nn.Module, curvature, targets: Sequence[str] | None) -> list[str]:
    """The edited layers: the cache's targets, or a subset of them; down-projections only, one per block,
    returned in depth order."""
    if curvature is None:
        raise CrispEditError(f"method {method!r} needs a curvature cache: its key covariance E[kkᵀ] is the cache's "
                             "input factor A", hint={"curvature": ...})
    chosen = list(curvature.targets) if targets is None else list(targets)
    missing = [t for t in chosen if t not in curvature.targets]
    if missing:
        raise CrispEditError(f"target(s) {missing} are not in the curvature cache, which covers {curvature.targets}")
    model_type = getattr(getattr(model, "config", None), "model_type", None)
    check_down_projections(method, chosen, model_type)
    blocks = [block_of(t) for t in chosen]
    if len(set(blocks)) != len(blocks):
        raise CrispEditError(f"{method} edits one down-projection per decoder block; got {chosen}")
    return sorted(chosen, key=layer_number)


# A layer solver gets (layer position j, layer name, K [d_in, n], R [d_out, n]) and returns ΔW [d_out, d_in].
LayerSolver = Callable[[int, str, torch.Tensor, torch.Tensor], torch.Tensor]


def locate_then_edit(model: nn.Module, tokenizer, requests: Sequence[EditRequest], targets: Sequence[str],
                     cfg: LocateEditConfig, editor: WeightEditor, solve: LayerSolver, timer: Timer,
                     prefixes: Sequence[str], index_offset: int = 0,
                     after_chunk: Callable[[Sequence[EditRequest]], None] | None = None,
                     progress: bool = False) -> dict[str, Any]:
    """One chunk of MEMIT-style editing (values at the last layer, then layer by layer); returns facts for
    the record."""
    z_block = block_of(targets[-1])
    with timer("values"):
        values = optimize_values(model, tokenizer, requests, z_block, prefixes, cfg.value_settings(), index_offset)
    d_out = editor.base[targets[-1]].shape[0]
    if values.z.shape[1] != d_out:
        raise CrispEditError(f"{targets[-1]} writes {d_out} features but block {z_block} outputs "
                             f"{values.z.shape[1]}: it is not a down-projection into the residual stream")
    layers = []
    for j, name in enumerate(targets):
        t0 = time.perf_counter()
        with timer("keys"):
            K = subject_keys(model, tokenizer, requests, [name], prefixes)[name].T  # [d_in, n]
            cur = subject_outputs(model, tokenizer, requests, z_block)  # [n, d_model]
        R = ((values.z - cur) / (len(targets) - j)).T  # [d_out, n]
        with timer("solve"):
            dW = solve(j, name, K, R)
        editor.add_(name, dW)
        layers.append({"layer": name, "residual_norm": float(R.norm(dim=0).mean() * (len(targets) - j)),
                       "update_norm": float(dW.norm()), "seconds": time.perf_counter() - t0})
        if progress:
            log.info("%s: %d keys, mean residual %.3f, ‖ΔW‖ %.4f", name, K.shape[1],
                     layers[-1]["residual_norm"], layers[-1]["update_norm"])
    final = subject_outputs(model, tokenizer, requests, z_block)
    if after_chunk is not None:
        with timer("keys"):
            after_chunk(requests)
    n = len(requests)
    return {"n": n, "layers": layers,
            "value_nll_mean": sum(values.final_nll) / n, "value_loss_mean": sum(values.final_loss) / n,
            "value_steps_mean": sum(values.steps) / n,
            "z_error_after_mean": float((values.z - final).norm(dim=1).mean()),
            "z_delta_mean": float((values.z - values.init).norm(dim=1).mean())}


def context_prefixes(model, tokenizer, cfg: LocateEditConfig) -> list[str]:
    if cfg.context_prefixes == 0:
        return []
    per, rem = divmod(cfg.context_prefixes, 5)
    from crispedit.baselines.keys import CONTEXT_STARTS

    starts = CONTEXT_STARTS * per + CONTEXT_STARTS[:rem]
    return generate_context_prefixes(model, tokenizer, n_per_start=1, length=cfg.context_length, starts=starts,
                                     seed=cfg.seed)


def run_memit(model: nn.Module, tokenizer, requests: Sequence[EditRequest], curvature, cfg: MemitConfig,
              targets: Sequence[str] | None = None, progress: bool = False) -> EditDelta:
    """Edit `model` in place with MEMIT (batch, or sequential with `cfg.chunk_size`) and return the delta."""
    check_requests(requests)
    check_subjects(requests)
    targets = resolve_cache_targets("memit", model, curvature, targets)
    t0 = time.perf_counter()
    timer = Timer()
    C = {n: key_covariance(curvature, n, cfg.covariance, full_rank=True) for n in targets}

    def solve(_j: int, name: str, K: torch.Tensor, R: torch.Tensor) -> torch.Tensor:
        return memit_solve(K, R, C[name], cfg.mom2_weight)

    with frozen_model(model), WeightEditor(model, targets) as editor:
        with timer("prefixes"):
            prefixes = context_prefixes(model, tokenizer, cfg)
        chunk_log = []
        offset = 0
        for chunk in chunks(requests, cfg.chunk_size):
            chunk_log.append(locate_then_edit(model, tokenizer, chunk, targets, cfg, editor, solve, timer, prefixes,
                                              offset, progress=progress))
            offset += len(chunk)
        return editor.finish(requests, "memit", cfg, time.perf_counter() - t0, timer.totals, curvature,
                             {"targets_edited": targets, "context_prefixes": prefixes, "chunks": chunk_log})
