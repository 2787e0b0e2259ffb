"""K-FAC statistics collected by several processes (torchrun) and summed into one result.

The statistics are float64 *sums* plus integer token counts (see stats.py), so a data-parallel
collection is exact by construction: every rank collects over a disjoint shard of the sequences and a
SUM all-reduce adds the shards. The result equals the single-process result up to floating-point
round-off (the order of additions differs) for every label mode: sampled labels are drawn per sequence
from a stream seeded by (seed, the sequence's index in the whole corpus) — see `collect.sequence_seed` —
so a sequence gets the same labels whichever rank collects it and however many ranks there are.

Only rank 0 (`is_main`) should write caches and reports; the other ranks hold the same sums.
"""

from __future__ import annotations

import hashlib
import json
import os
from dataclasses import dataclass
from datetime import timedelta
from typing import Any, Sequence

import torch
import torch.distributed as dist
from torch import nn

from crispedit.config import CurvatureConfig
from crispedit.curvature.collect import collect_lm_stats
from crispedit.curvature.stats import KFACStats
from crispedit.data.corpus import shard
from crispedit.errors import CrispEditError

__all__ = [
    "DistContext",
    "init_distributed",
    "shutdown",
    "is_main",
    "all_reduce_stats",
    "collect_lm_stats_distributed",
]


@dataclass(frozen=True)
class DistContext:
    """Where this process stands in a (possibly single-process) run.

    `backend` is None for a single process; `initialised_here` says whether `init_distributed`
    created the process group (and `shutdown` may therefore destroy it)."""

    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    device: torch.device = torch.device("cpu")
    backend: str | None = None
    initialised_here: bool = False


def is_main(ctx: DistContext) -> bool:
    """True on the rank that writes caches, reports and progress bars (rank 0)."""
    return ctx.rank == 0


def _env_int(name: str, default: int | None = None) -> int:
    value = os.environ.get(name)
    if value is None or value.strip() == "":
        if default is None:
            raise CrispEditError(f"environment variable {name} is not set; launch distributed runs with torchrun")
        return default
    try:
        return int(value)
    except ValueError:
        raise CrispEditError(f"environment variable {name} must be an integer, got {value!r}") from None


def _resolve_device(device: str | None, local_rank: int, distributed: bool) -> torch.device:
    """The compute device: CUDA when requested (or, with no request, when available), else the given one.
    Under a multi-process launch each rank takes cuda:LOCAL_RANK."""
    want = device if device is not None else ("cuda" if torch.cuda.is_available() else "cpu")
    try:
        dev = torch.device(want)
    except (RuntimeError, TypeError) as e:
        raise CrispEditError(f"invalid device {want!r}: {e}") from None
    if dev.type != "cuda":
        return dev
    if not torch.cuda.is_available():
        raise CrispEditError(f"device {want!r} was requested but CUDA is not available")
    if distributed:
        count = torch.cuda.device_count()
        if local_rank >= count:
            raise CrispEditError(f"LOCAL_RANK {local_rank} has no GPU: this node has {count} CUDA device(s); "
                                 f"start at most {count} processes per node")
        dev = torch.device("cuda", local_rank)
        torch.cuda.set_device(dev)
    return dev


def init_distributed(device: str | None = None, timeout: timedelta | None = None) -> DistContext:
    """Join the torchrun process group if there is one; otherwise describe a single process.

    A group that the caller already initialised is adopted (and left alone by `shutdown`). With
    WORLD_SIZE > 1 in the environment and no group yet, the default group is initialised from the
    env:// variables (MASTER_ADDR, MASTER_PORT, RANK, WORLD_SIZE): NCCL on CUDA, gloo otherwise.
    LOCAL_RANK defaults to RANK (single node) when torchrun did not set it.
    """
    if dist.is_available() and dist.is_initialized():
        rank, world = dist.get_rank(), dist.get_world_size()
        local_rank = _env_int("LOCAL_RANK", rank)
        dev = _resolve_device(device, local_rank, world > 1)
        return DistContext(rank, world, local_rank, dev, str(dist.get_backend()), initialised_here=False)

    world = _env_int("WORLD_SIZE", 1)
    if world <= 1:
        return DistContext(0, 1, 0, _resolve_device(device, 0, False), None, initialised_here=False)
    if not dist.is_available():
        raise CrispEditError("WORLD_SIZE > 1 but this PyTorch build has no torch.distributed support")
    rank = _env_int("RANK")
    if not 0 <= rank < world:
        raise CrispEditError(f"RANK {rank} is outside [0, WORLD_SIZE={world})")
    local_rank = _env_int("LOCAL_RANK", rank)
    for var in ("MASTER_ADDR", "MASTER_PORT"):
        if not os.environ.get(var):
            raise CrispEditError(f"environment variable {var} is not set; launch distributed runs with torchrun")
    dev = _resolve_device(device, local_rank, True)
    backend = "nccl" if dev.type == "cuda" else "gloo"
    _import_world_default_modules()
    kwargs: dict[str, Any] = {"backend": backend, "init_method": "env://", "rank": rank, "world_size": world}
    if timeout is not None:
        kwargs["timeout"] = timeout
    dist.init_process_group(**kwargs)
    return DistContext(rank, world, local_rank, dev, backend, initialised_here=True)


def _import_world_default_modules() -> None:
    """Import, before the process group exists, the torch modules that bind `group.WORLD` as a default
    argument when they are first imported.

    `torch.distributed.nn.functional` declares `def broadcast(tensor, src, group=group.WORLD)` and the
    like. Imported after `init_process_group` (torch._dynamo imports it, and transformers imports
    torch._dynamo when it builds a model), those defaults keep the default process group alive for good:
    `destroy_process_group` can no longer free it, its threads (pt_gloo_runloop, gloo_tcp_loop, rank 0's
    TCPStore server) run on into interpreter shutdown, and tearing them down there, in whatever order
    finalisation picks, now and then aborts the finished process ("terminate called without an active
    exception") after all its output was written. Imported first, the defaults are None."""
    try:
        import torch.distributed.nn  # noqa: F401
    except ImportError:  # builds without it have nothing to hold the group either
        pass


def shutdown(ctx: DistContext) -> None:
    """Destroy the process group, but only if `init_distributed` created it."""
    if ctx.initialised_here and dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()


# ---------------------------------------------------------------------------------------------
# all-reduce


def _comm_device(ctx: DistContext) -> torch.device:
    """NCCL reduces CUDA tensors on this rank's GPU; gloo reduces CPU tensors."""
    return ctx.device if ctx.backend == "nccl" else torch.device("cpu")


def _layout(stats: KFACStats) -> list[list[Any]]:
    return [[name, s.d_in, s.d_out, s.A_sink is not None] for name, s in stats.items()]


def _layout_hash(layout: list[list[Any]]) -> int:
    digest = hashlib.sha256(json.dumps(layout).encode("utf-8")).digest()
    return int.from_bytes(digest[:8], "big", signed=True)


def _describe_layout(layout: list[list[Any]], limit: int = 4) -> str:
    items = [f"{n} ({d_out}x{d_in}{', sink' if sink else ''})" for n, d_in, d_out, sink in layout]
    more = f", ... ({len(items) - limit} more)" if len(items) > limit else ""
    return f"{len(items)} target(s): " + ", ".join(items[:limit]) + more


def _check_same_layout(stats: KFACStats, ctx: DistContext, comm: torch.device) -> None:
    """Raise on every rank (so none is left waiting in a collective) if the ranks' target lists differ.

    Only a hash of the layout crosses the wire (a fixed-size int64 tensor, no pickled objects)."""
    layout = _layout(stats)
    mine = torch.tensor([_layout_hash(layout)], dtype=torch.int64, device=comm)
    gathered = [torch.empty_like(mine) for _ in range(ctx.world_size)]
    dist.all_gather(gathered, mine)
    hashes = [int(t.item()) for t in gathered]
    if len(set(hashes)) > 1:
        differ = [r for r, h in enumerate(hashes) if h != hashes[0]]
        raise CrispEditError(
            f"rank {ctx.rank}: K-FAC statistics cannot be summed across ranks: the target layers of rank(s) "
            f"{differ} differ from those of rank 0 (names, shapes, order or sink setting); every rank must "
            f"collect the same targets in the same order. This rank holds {_describe_layout(layout)}")


def _all_reduce_into(t: torch.Tensor, comm: torch.device) -> None:
    """SUM all-reduce of `t` in place, through a buffer on the communication device when needed."""
    if t.device == comm and t.is_contiguous():
        dist.all_reduce(t, op=dist.ReduceOp.SUM)
        return
    buf = t.detach().to(comm).contiguous()
    dist.all_reduce(buf, op=dist.ReduceOp.SUM)
    t.copy_(buf)


def all_reduce_stats(stats: KFACStats, ctx: DistContext) -> KFACStats:
    """Sum A, S, A_sink and the token counts n, n_sink over all ranks, in place; returns `stats`.

    Every rank must call this with the same target layers in the same order (checked first).
    A single-process context returns `stats` untouched."""
    if ctx.world_size <= 1:
        return stats
    comm = _comm_device(ctx)
    _check_same_layout(stats, ctx, comm)
    for s in stats.layers.values():
        _all_reduce_into(s.A, comm)
        _all_reduce_into(s.S, comm)
        if s.A_sink is not None:
            _all_reduce_into(s.A_sink, comm)
    counts = torch.tensor([[s.n, s.n_sink] for s in stats.layers.values()], dtype=torch.int64,
                          device=comm).reshape(-1, 2)
    dist.all_reduce(counts, op=dist.ReduceOp.SUM)
    for s, (n, n_sink) in zip(stats.layers.values(), counts.tolist()):
        s.n, s.n_sink = int(n), int(n_sink)
    return stats


# ---------------------------------------------------------------------------------------------
# collection


def collect_lm_stats_distributed(
    model: nn.Module,
    sequences: Sequence[Sequence[int]],
    target_names: Sequence[str],
    cfg: CurvatureConfig | None = None,
    ctx: DistContext | None = None,
    **kw: Any,
) -> KFACStats:
    """`collect_lm_stats` split over the ranks of `ctx`: each rank takes its round-robin shard of
    `sequences` and the shards' sums are all-reduced, so every rank returns the full statistics.

    Every rank must pass the same `sequences` and `target_names` and a model with the same weights,
    placed on `ctx.device`. Keyword arguments go to `collect_lm_stats`; with `progress=True` the bar is
    shown on rank 0 only. A `stats=` argument (sequential editing, extension) is added to *after* the
    reduction, so existing sums are not multiplied by the world size. Each sequence keeps its index in `sequences`
    for its sampled labels, so the result is the single-process one for any number of ranks.
    """
    ctx = ctx if ctx is not None else DistContext()
    cfg = cfg if cfg is not None else CurvatureConfig()
    base: KFACStats | None = kw.pop("stats", None)
    progress = bool(kw.pop("progress", False)) and is_main(ctx)
    indices = shard(range(len(sequences)), ctx.rank, ctx.world_size)
    local = collect_lm_stats(model, [sequences[i] for i in indices], target_names, cfg, progress=progress,
                             indices=indices, **kw)
    all_reduce_stats(local, ctx)
    if base is None:
        return local
    return base.add_(local)
