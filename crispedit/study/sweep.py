"""The MNIST → Fashion-MNIST sweep: projected fine-tuning of LeNet-5's head for every (method, γ, seed).

The pretrained network is the same for every run (pretraining seed fixed). A fine-tuning *seed* s fixes
two things, shared by every method so that the methods are compared on paired runs: the order of the
Fashion-MNIST batches, and the curvature sample (which MNIST training digits define the capability
curvature). Each run uses plain projected SGD: each step's gradient is projected onto the γ-approximate
null space of the MNIST loss curvature. When the fine-tuned weights have moved more than `drift`
(relative norm change) since the projector was computed, the curvature is recomputed at the current
weights (with the number of directions removed last time as the solver's hint, see
crispedit.study.curvatures.exact_basis). The decomposition at θ0 does not depend on γ: it is computed
once per (method, seed) and serves every γ.

Runs are grouped in tasks, one per (method, seed); `workers` processes (one thread each) run the tasks in
parallel. Results do not depend on the number of workers. Finished tasks are appended to a checkpoint
file in the output folder (removed once the JSON is written), so an interrupted sweep resumes where it
stopped as long as neither its configuration nor the study / curvature code changed.
"""

from __future__ import annotations

import copy
import hashlib
import json
import math
import os
import platform
import queue as queue_mod
import statistics
import time
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Sequence

import torch
from torch import nn
from tqdm.auto import tqdm

from crispedit.io import write_json
from crispedit.study.curvatures import CURVATURE_METHODS, Basis, DenseBasis, compute_basis, num_threads, tuned_params
from crispedit.study.data import StudyData, load_study_data
from crispedit.study.lenet import Head, PretrainConfig, features, load_or_pretrain

METHODS = CURVATURE_METHODS + ("ft",)
FULL_KS = (0.1, 0.5, 1.0, 1.5, 2.0, 2.5, 3.0, 4.0, 5.5, 7.0)
QUICK_KS = (0.5, 2.0, 5.0)
PAPER_HIDDEN = 84
PNG_NAME = "study_mnist.png"
STAT_KEYS = ("mnist_acc", "fashion_acc", "mnist_test_loss", "kept_fraction", "recomputes", "relative_change",
             "seconds")


def json_name(hidden: int) -> str:
    """study_mnist.json for the paper's head (84 hidden units), study_mnist_h{H}.json otherwise."""
    return "study_mnist.json" if hidden == PAPER_HIDDEN else f"study_mnist_h{hidden}.json"


JSON_NAME = json_name(PAPER_HIDDEN)


@dataclass(frozen=True)
class FinetuneConfig:
    epochs: int = 1
    batch_size: int = 128
    lr: float = 0.02
    momentum: float = 0.0  # plain projected SGD, as in the paper's PGD
    drift: float = 0.25  # recompute the projector when ‖θ − θ_last‖ / ‖θ_last‖ exceeds this


@dataclass(frozen=True)
class StudyConfig:
    pretrain: PretrainConfig = field(default_factory=PretrainConfig)
    finetune: FinetuneConfig = field(default_factory=FinetuneConfig)
    ks: tuple[float, ...] = FULL_KS
    methods: tuple[str, ...] = METHODS
    seeds: tuple[int, ...] = (0, 1, 2)
    curvature_size: int = 2000  # MNIST training digits per curvature sample (drawn per seed)
    fashion_train_size: int | None = None  # Fashion-MNIST training images used for fine-tuning (None: all)
    mnist_train_size: int | None = None  # MNIST digits used for pretraining (None: all 10,000)
    min_pretrain_acc: float | None = 0.985


def full_config(hidden: int = PAPER_HIDDEN, seeds: int = 3) -> StudyConfig:
    """The configuration of the committed sweeps (docs/study-mnist.md): the paper's head (84) or the
    small one (16), `seeds` fine-tuning seeds."""
    if seeds < 1:
        raise ValueError(f"need at least one seed, got {seeds}")
    return StudyConfig(pretrain=PretrainConfig(hidden=hidden), seeds=tuple(range(seeds)))


def quick_config() -> StudyConfig:
    """A reduced sweep for tests: small head, short pretraining, data subsets, three γ, two seeds."""
    return StudyConfig(
        pretrain=PretrainConfig(hidden=8, epochs=3, batch_size=64, lr=3e-3, shift=0),
        finetune=FinetuneConfig(epochs=2, batch_size=32, lr=0.01, drift=0.5),
        ks=QUICK_KS, seeds=(0, 1), curvature_size=500, fashion_train_size=6000, mnist_train_size=4000,
        min_pretrain_acc=None)


def gamma_of(k: float) -> float:
    return 1.0 - 10.0 ** (-k)


@dataclass
class Features:
    """Frozen trunk features of every split (the fine-tuned head only ever sees these)."""

    mnist_train_x: torch.Tensor  # the pool the curvature samples are drawn from
    mnist_train_y: torch.Tensor
    fashion_x: torch.Tensor
    fashion_y: torch.Tensor
    mnist_test_x: torch.Tensor
    mnist_test_y: torch.Tensor
    fashion_test_x: torch.Tensor
    fashion_test_y: torch.Tensor

    def curvature_sample(self, size: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
        """`size` MNIST training digits drawn without replacement by `seed` (the whole pool if smaller)."""
        n = len(self.mnist_train_y)
        idx = torch.randperm(n, generator=torch.Generator().manual_seed(seed))[: min(size, n)]
        return self.mnist_train_x[idx], self.mnist_train_y[idx]


@torch.no_grad()
def head_accuracy(head: Head, x: torch.Tensor, y: torch.Tensor) -> float:
    return float((head(x).argmax(-1) == y).double().mean())


def _flat(params: Sequence[torch.Tensor]) -> torch.Tensor:
    return torch.cat([p.detach().reshape(-1) for p in params])


def finetune(head0: Head, method: str, gamma: float | None, basis0: Basis | None, feats: Features,
             curv: tuple[torch.Tensor, torch.Tensor], cfg: FinetuneConfig, seed: int) -> dict:
    """One projected fine-tuning run on Fashion-MNIST (one thread); returns the run's record."""
    with num_threads(1):
        return _finetune(head0, method, gamma, basis0, feats, curv, cfg, seed)


def _finetune(head0: Head, method: str, gamma: float | None, basis0: Basis | None, feats: Features,
              curv: tuple[torch.Tensor, torch.Tensor], cfg: FinetuneConfig, seed: int) -> dict:
    t0 = time.perf_counter()
    head = copy.deepcopy(head0)
    for p in head.parameters():
        p.requires_grad_(False)
    params = tuned_params(head)
    for p in params:
        p.requires_grad_(True)
    proj = basis0.projector(gamma) if basis0 is not None and gamma is not None else None
    kept0 = proj.kept_fraction if proj is not None else 1.0
    anchor = _flat(params)
    bufs = [torch.zeros_like(p) for p in params]
    gen = torch.Generator().manual_seed(seed)
    recomputes, recompute_s, solvers = 0, 0.0, {}
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
                raise FloatingPointError(f"{method} γ={gamma} seed {seed}: loss became {float(loss.detach())}")
            if proj is not None:
                cur = _flat(params)
                if float((cur - anchor).norm()) > cfg.drift * float(anchor.norm()):
                    tr = time.perf_counter()
                    hint = getattr(proj, "n_removed", None)
                    basis = compute_basis(method, head, curv[0], curv[1], 1, gammas=(gamma,), hint=hint)
                    if isinstance(basis, DenseBasis):
                        solvers[basis.spectrum.solver] = solvers.get(basis.spectrum.solver, 0) + 1
                    proj = basis.projector(gamma)
                    del basis
                    recompute_s += time.perf_counter() - tr
                    recomputes += 1
                    anchor = cur
                    with torch.no_grad():
                        for b, pb in zip(bufs, proj(bufs)):
                            b.copy_(pb)
    with torch.no_grad():
        mnist_loss = float(nn.functional.cross_entropy(head(feats.mnist_test_x), feats.mnist_test_y))
    rec = {
        "seed": seed,
        "mnist_acc": head_accuracy(head, feats.mnist_test_x, feats.mnist_test_y),
        "fashion_acc": head_accuracy(head, feats.fashion_test_x, feats.fashion_test_y),
        "mnist_test_loss": mnist_loss,
        "kept_fraction": kept0,
        "recomputes": recomputes,
        "relative_change": float((_flat(params) - _flat(tuned_params(head0))).norm() / _flat(tuned_params(head0)).norm()),
        "seconds": time.perf_counter() - t0,
        "recompute_seconds": recompute_s,
    }
    if solvers:
        rec["recompute_solvers"] = solvers
    return rec


# ------------------------------------------------------------------------------------------ tasks

@dataclass
class _Context:
    cfg: StudyConfig
    head: Head
    feats: Features


_CTX: _Context | None = None
_QUEUE = None


def _run_task(method: str, seed: int, ctx: _Context, report=None) -> dict:
    """All runs of one (method, seed): the θ0 decomposition (shared by every γ), then one run per k.
    Also records the task's CPU time (this process, one thread): the time it would take on an idle core."""
    t0, c0 = time.perf_counter(), time.process_time()
    cfg = ctx.cfg
    curv = ctx.feats.curvature_sample(cfg.curvature_size, seed)
    basis, basis_info = None, None
    if method != "ft":
        with num_threads(1):
            basis = compute_basis(method, ctx.head, curv[0], curv[1], 1, gammas=tuple(gamma_of(k) for k in cfg.ks))
        basis_info = basis.info
    runs = []
    for k in (cfg.ks if method != "ft" else (None,)):
        gamma = gamma_of(k) if k is not None else None
        rec = finetune(ctx.head, method, gamma, basis, ctx.feats, curv, cfg.finetune, seed)
        rec = {"method": method, "k": k, "gamma": gamma, **rec}
        runs.append(rec)
        if report is not None:
            report(rec)
    return {"method": method, "seed": seed, "runs": runs, "basis_at_theta0": basis_info,
            "seconds": time.perf_counter() - t0, "cpu_s": time.process_time() - c0, "pid": os.getpid()}


def _worker_init(ctx: _Context, q) -> None:
    for var in ("OMP_NUM_THREADS", "MKL_NUM_THREADS", "OPENBLAS_NUM_THREADS"):
        os.environ[var] = "1"  # before scipy's OpenBLAS is loaded in this process
    torch.set_num_threads(1)
    global _CTX, _QUEUE
    _CTX, _QUEUE = ctx, q


def _worker_task(method: str, seed: int) -> dict:
    assert _CTX is not None
    return _run_task(method, seed, _CTX, report=lambda rec: _QUEUE.put(_short(rec)))


def _short(rec: dict) -> dict:
    return {k: rec[k] for k in ("method", "k", "seed", "mnist_acc", "fashion_acc", "kept_fraction", "recomputes",
                                "seconds")}


def _task_order(cfg: StudyConfig) -> list[tuple[str, int]]:
    """Heaviest first (Hessian, GGN), so that parallel workers finish together."""
    weight = {"hessian": 0, "ggn": 1}
    tasks = [(m, s) for m in cfg.methods for s in cfg.seeds]
    return sorted(tasks, key=lambda t: (weight.get(t[0], 2), cfg.methods.index(t[0]), t[1]))


def fingerprint(cfg: StudyConfig) -> str:
    """Hash of the configuration and of the code that computes a run (crispedit/study, crispedit/curvature):
    a checkpointed task is reused only when both are unchanged."""
    h = hashlib.sha256(json.dumps(asdict(cfg), sort_keys=True, default=str).encode())
    root = Path(__file__).resolve().parent
    for path in sorted(root.glob("*.py")) + sorted((root.parent / "curvature").glob("*.py")):
        h.update(path.name.encode())
        h.update(path.read_bytes())
    return h.hexdigest()[:16]


def _load_checkpoint(path: Path | None, fp: str) -> dict[tuple[str, int], dict]:
    done: dict[tuple[str, int], dict] = {}
    if path is None or not path.is_file():
        return done
    for line in path.read_text().splitlines():
        try:
            rec = json.loads(line)
        except json.JSONDecodeError:  # a line cut short by an interruption
            continue
        if rec.get("fingerprint") == fp:
            done[(rec["result"]["method"], int(rec["result"]["seed"]))] = {**rec["result"], "from_checkpoint": True}
    return done


def run_tasks(ctx: _Context, workers: int, progress: bool, checkpoint: Path | None = None) -> list[dict]:
    """Run every (method, seed) task, `workers` at a time. checkpoint: a JSON-lines file where each finished
    task is appended (with the `fingerprint` of config and code); tasks found there are not run again."""
    tasks = _task_order(ctx.cfg)
    fp = fingerprint(ctx.cfg)
    done = _load_checkpoint(checkpoint, fp)
    todo = [t for t in tasks if t not in done]
    n_runs = sum(len(ctx.cfg.ks) if m != "ft" else 1 for m, _ in todo)
    bar = tqdm(total=n_runs, desc=f"MNIST→Fashion sweep (h={ctx.head.fc2.out_features})", disable=not progress)
    if progress and done:
        tqdm.write(f"reusing {len(done)} finished tasks from {checkpoint}")

    def show(rec: dict) -> None:
        bar.update(1)
        if progress:
            tqdm.write(f"{rec['method']:>22} k={rec['k']!s:>4} seed {rec['seed']} mnist {rec['mnist_acc']:.4f} "
                       f"fashion {rec['fashion_acc']:.4f} kept {rec['kept_fraction']:.3f} "
                       f"recomputes {rec['recomputes']} ({rec['seconds']:.1f}s)")

    def record(res: dict) -> None:
        done[(res["method"], res["seed"])] = res
        if checkpoint is not None:
            checkpoint.parent.mkdir(parents=True, exist_ok=True)
            with open(checkpoint, "a") as f:
                f.write(json.dumps({"fingerprint": fp, "result": res}) + "\n")

    try:
        if workers <= 1 or not todo:
            for m, s in todo:
                record(_run_task(m, s, ctx, report=show))
        else:
            import multiprocessing as mp
            from concurrent.futures import ProcessPoolExecutor

            mctx = mp.get_context("spawn")
            q = mctx.Queue()
            with ProcessPoolExecutor(max_workers=min(workers, len(todo)), mp_context=mctx,
                                     initializer=_worker_init, initargs=(ctx, q)) as pool:
                pending = {pool.submit(_worker_task, m, s) for m, s in todo}
                while pending:
                    try:
                        show(q.get(timeout=0.5))
                    except queue_mod.Empty:
                        pass
                    for f in [f for f in pending if f.done()]:
                        pending.discard(f)
                        record(f.result())  # re-raises a worker's error (finished tasks are kept)
            while True:
                try:
                    show(q.get_nowait())
                except queue_mod.Empty:
                    break
    finally:
        bar.close()
    return [done[t] for t in tasks]


# ------------------------------------------------------------------------------------------ aggregation

def stats(values: Sequence[float]) -> dict[str, float]:
    """Mean, sample standard deviation (0 for one value), min and max."""
    v = [float(x) for x in values]
    return {"mean": statistics.fmean(v), "std": statistics.stdev(v) if len(v) > 1 else 0.0,
            "min": min(v), "max": max(v)}


def aggregate(runs: list[dict]) -> list[dict]:
    """One point per (method, k): its seeds, mean/std/min/max of every metric, and the runs themselves."""
    groups: dict[tuple[str, float | None], list[dict]] = {}
    for r in runs:
        groups.setdefault((r["method"], r["k"]), []).append(r)
    points = []
    for (method, k), rs in groups.items():
        rs = sorted(rs, key=lambda r: r["seed"])
        pt = {"method": method, "k": k, "gamma": rs[0]["gamma"], "seeds": [r["seed"] for r in rs]}
        pt.update({key: stats([r[key] for r in rs]) for key in STAT_KEYS})
        pt["runs"] = [{key: v for key, v in r.items() if key not in ("method", "k", "gamma")} for r in rs]
        points.append(pt)
    order = {m: i for i, m in enumerate(METHODS)}
    points.sort(key=lambda p: (order.get(p["method"], 99), p["k"] is None, p["k"] or 0.0))
    return points


# ------------------------------------------------------------------------------------------ entry point

def prepare(data: StudyData, cfg: StudyConfig, cache_dir: Path | None, progress: bool) -> tuple[Head, Features, dict]:
    t0 = time.perf_counter()
    train = data.mnist_train.subset(cfg.mnist_train_size)
    model, report = load_or_pretrain(train, data.mnist_test, cfg.pretrain, cache_dir, progress, cfg.min_pretrain_acc)
    t1 = time.perf_counter()
    fash = data.fashion_train.subset(cfg.fashion_train_size)
    feats = Features(features(model, data.mnist_train.images), data.mnist_train.labels,
                     features(model, fash.images), fash.labels,
                     features(model, data.mnist_test.images), data.mnist_test.labels,
                     features(model, data.fashion_test.images), data.fashion_test.labels)
    head = copy.deepcopy(model.head)
    timing = {"pretrain_s": t1 - t0, "pretrain_cached": bool(report.get("cached")),
              "features_s": time.perf_counter() - t1}
    return head, feats, {"pretrain": report, **timing}


def run_study(out_dir: str | os.PathLike, quick: bool = False, progress: bool = True,
              config: StudyConfig | None = None, cache_dir: str | os.PathLike | None = None,
              data: StudyData | None = None, plot: bool = True, threads: int | None = None,
              hidden: int | None = None, seeds: int | None = None) -> dict:
    """Run the sweep and write its JSON (`json_name(hidden)`) and `study_mnist.png` into out_dir; returns
    the JSON dict.

    quick: the reduced sweep of `quick_config()` (tests, smoke runs). hidden / seeds: the head's width and
    the number of fine-tuning seeds of the full sweep (default 84 and 3). cache_dir: where the pretrained
    LeNet-5 is cached (default: the crispedit home folder). threads: CPU cores to use — that many worker
    processes with one thread each (default: torch's current thread count). The figure has one row per
    study_mnist*.json in out_dir (this sweep and, e.g., the other head size)."""
    threads = max(1, int(threads if threads is not None else torch.get_num_threads()))
    t_start = time.perf_counter()
    if config is not None:
        cfg = config
    elif quick:
        cfg = quick_config()
    else:
        cfg = full_config(hidden if hidden is not None else PAPER_HIDDEN, seeds if seeds is not None else 3)
    if config is not None or quick:
        if hidden is not None:
            cfg = replace(cfg, pretrain=replace(cfg.pretrain, hidden=hidden))
        if seeds is not None:
            cfg = replace(cfg, seeds=tuple(range(seeds)))
    unknown = [m for m in cfg.methods if m not in METHODS]
    if unknown:
        raise ValueError(f"unknown methods {unknown}; expected some of {METHODS}")
    if not cfg.seeds:
        raise ValueError("need at least one seed")
    out = Path(out_dir)
    data = data if data is not None else load_study_data()
    with num_threads(threads):
        head, feats, prep = prepare(data, cfg, Path(cache_dir) if cache_dir is not None else None, progress)
    pre = {"mnist_acc": head_accuracy(head, feats.mnist_test_x, feats.mnist_test_y),
           "fashion_acc": head_accuracy(head, feats.fashion_test_x, feats.fashion_test_y)}
    t_sweep = time.perf_counter()
    checkpoint = out / f".{json_name(cfg.pretrain.hidden)}.partial.jsonl"
    results = run_tasks(_Context(cfg, head, feats), threads, progress, checkpoint)
    sweep_s = time.perf_counter() - t_sweep
    cpu_by_worker: dict[int, float] = {}
    for res in results:
        cpu_by_worker[res["pid"]] = cpu_by_worker.get(res["pid"], 0.0) + res["cpu_s"]
    runs = [r for res in results for r in res["runs"]]
    d = sum(p.numel() for p in tuned_params(head))
    finetune_s: dict[str, float] = {}
    recompute_s: dict[str, float] = {}
    for r in runs:
        finetune_s[r["method"]] = finetune_s.get(r["method"], 0.0) + r["seconds"]
        recompute_s[r["method"]] = recompute_s.get(r["method"], 0.0) + r["recompute_seconds"]
    result = {
        "hidden": cfg.pretrain.hidden,
        "points": aggregate(runs),
        "reference": {"pretrained": pre},
        "config": {
            "quick": quick,
            "pretrain": asdict(cfg.pretrain),
            "finetune": asdict(cfg.finetune),
            "ks": list(cfg.ks),
            "methods": list(cfg.methods),
            "seeds": list(cfg.seeds),
            "seed_meaning": "fine-tuning batch order and curvature sample; pretraining seed fixed",
            "tuned_parameters": {"layers": ["head.fc2.weight", "head.fc3.weight"], "count": d,
                                 "biases": "frozen"},
            "curvature_examples": min(cfg.curvature_size, len(feats.mnist_train_y)),
            "curvature_pool": len(feats.mnist_train_y),
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
            "sweep_s": sweep_s,
            "sweep_cpu_s_by_worker": sorted(cpu_by_worker.values(), reverse=True),
            "sweep_cpu_s_total": sum(cpu_by_worker.values()),
            "tasks_from_checkpoint": sum(bool(res.get("from_checkpoint")) for res in results),
            "cpu_note": "CPU seconds of each worker process (one thread each): on idle cores the parallel part "
                        "would take about the largest of them (the same tasks per worker) and at best "
                        "total / workers (perfect balance)",
            "basis_at_theta0": {f"{res['method']}/seed{res['seed']}": res["basis_at_theta0"] for res in results
                                if res["basis_at_theta0"] is not None},
            "task_s": {f"{res['method']}/seed{res['seed']}": res["seconds"] for res in results},
            "task_cpu_s": {f"{res['method']}/seed{res['seed']}": res["cpu_s"] for res in results},
            "finetune_s_by_method": finetune_s,
            "recompute_s_by_method": recompute_s,
            "total_s": time.perf_counter() - t_start,
            "workers": threads,
            "threads_per_worker": 1,
            "cpu_count": os.cpu_count(),
            "load_average_at_end": list(os.getloadavg()) if hasattr(os, "getloadavg") else None,
            "platform": platform.platform(),
            "torch": torch.__version__,
        },
    }
    from crispedit.study.report import summarise

    result["summary"] = summarise(result)
    write_json(out / json_name(cfg.pretrain.hidden), result)
    checkpoint.unlink(missing_ok=True)
    if plot:
        from crispedit.study.report import plot_study, sibling_results

        plot_study(sibling_results(out, result), out / PNG_NAME)
    return result
