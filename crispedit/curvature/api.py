"""`Curvature`: the capability curvature of a set of target layers, computed once and reused for many edits.

`collect_curvature(model, corpus, CurvatureConfig(...))` is the one call that builds it; `Curvature.load`
reads a cache, `extend_from_corpus` adds corpus it has not seen, `merge` adds another cache, `projectors` gives
the per-target projectors an edit is constrained by, and `summary()` says what it holds.
"""

from __future__ import annotations

import datetime as _dt
import logging
import time
from pathlib import Path
from typing import Any, Mapping, Sequence

import torch
from torch import nn

from crispedit.config import CurvatureConfig
from crispedit.curvature.cache import check_finite_stats, compare_fingerprints, load_cache, save_cache
from crispedit.curvature.collect import collect_lm_stats
from crispedit.curvature.eigen import LayerEigen, eigendecompose, sym_eigh, top_energy_fraction
from crispedit.curvature.energy import energy_rank
from crispedit.curvature.masks import build_masks, joint_keep_mask, mask_report
from crispedit.curvature.projector import InputNullspaceProjector, KroneckerProjector
from crispedit.curvature.stats import KFACStats
from crispedit.errors import CacheMismatchError, CrispEditError

logger = logging.getLogger(__name__)
PROJECTION_KINDS = ("kfac", "ekfac", "nscl")
SUMMARY_GAMMAS = (0.5, 0.9, 0.99, 0.999)


def model_fingerprint(model: nn.Module, targets: Sequence[str]) -> dict[str, Any]:
    """Identity of the model plus two hashes: the targeted weights (`weights_sha256`) and every weight
    (`model_weights_sha256`) — A depends on the layers below a target, S and sampled labels on those above."""
    from crispedit.models.fingerprint import all_weights_fingerprint, model_identity, weights_fingerprint

    ident = dict(model_identity(model))
    ident["weights_sha256"] = weights_fingerprint(model, list(targets))
    ident["model_weights_sha256"] = all_weights_fingerprint(model)
    return ident


def factor_memory_bytes(model: nn.Module, targets: Sequence[str], sink: bool = True) -> tuple[int, str]:
    """Memory the curvature of `targets` needs at its peak (bytes), and the largest factor in words: the
    float64 sums A, S (and A_sink), the eigenbases U_A, U_S kept beside them, and the workspace of the
    largest eigendecomposition (a copy of the matrix and its eigenvectors)."""
    from crispedit.models.targets import layer_io_dims

    total, peak, largest, where = 0, 0, 0, ""
    for n in targets:
        d_in, d_out = layer_io_dims(model.get_submodule(n))
        total += 8 * ((3 if sink else 2) * d_in * d_in + 2 * d_out * d_out)
        d = max(d_in, d_out)
        peak = max(peak, 8 * 2 * d * d)
        if d > largest:
            largest, where = d, f"{n}: {'S' if d_out >= d_in else 'A'} is {d}x{d} float64 = {8 * d * d / 1e9:.1f} GB"
    return total + peak, where


def available_memory(device: torch.device | str) -> int | None:
    """Bytes that can still be allocated on `device` (MemAvailable for the CPU), None if unknown."""
    dev = torch.device(device)
    if dev.type == "cuda":
        free, _ = torch.cuda.mem_get_info(dev)
        return int(free)
    if dev.type != "cpu":
        return None
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemAvailable:"):
                return int(line.split()[1]) * 1024
    except (OSError, ValueError, IndexError):
        pass
    return None


def check_factor_memory(model: nn.Module, targets: Sequence[str], sink: bool = True) -> None:
    """Refuse, before collecting, targets whose factors do not fit in the memory available now."""
    need, largest = factor_memory_bytes(model, targets, sink)
    device = next(model.parameters()).device
    have = available_memory(device)
    if have is not None and need > have:
        raise CrispEditError(f"the curvature of {len(targets)} target(s) needs about {need / 1e9:.1f} GB of "
                             f"{device.type.upper()} memory, {have / 1e9:.1f} GB is available (largest factor "
                             f"{largest})", hint={"targets": ...}, hint_text="choose smaller layers ({fix})")


def nscl_keep_columns(e: LayerEigen, gamma: float) -> torch.Tensor:
    """Input directions kept by the activation-covariance (Adam-NSCL) baseline: remove the top eigenvectors
    of A holding γ of its trace (and any sink directions)."""
    lam = e.lam_A[e.n_sink :]
    keep = torch.ones(e.d_in, dtype=torch.bool, device=lam.device)
    keep[: e.n_sink] = False
    total = float(lam.sum())
    if total > 0 and gamma > 0:
        k = energy_rank(lam, gamma, total) + 1
        keep[e.n_sink : e.n_sink + k] = False
    return keep


class Curvature:
    """K-FAC statistics of the target layers (float64 sums and token counts), their eigenbases, and a JSON record
    of how they were made (model fingerprint, targets, collection settings, corpora).

    Build one with `collect_curvature` (or `Curvature.compute`), read one with `Curvature.load`. Sums rather than
    means are kept, so `extend` and `merge` add exactly; both return a new object."""

    def __init__(self, stats: KFACStats, eigen: dict[str, LayerEigen], record: dict[str, Any]):
        self.stats = stats
        self.eigen = eigen
        self.record = record
        self._masks: dict[tuple[str, float, str], dict[str, torch.Tensor]] = {}  # (kind, γ, scope)
        self._ekfac: dict[str, Any] | None = None  # EK-FAC eigenvalues once `correct_eigenvalues` ran

    @property
    def targets(self) -> list[str]:
        return list(self.stats.layers)

    @property
    def config(self) -> CurvatureConfig:
        """The collection settings the statistics were summed with (unknown keys of newer records dropped)."""
        return CurvatureConfig.from_dict(self.record.get("collection", {}), source="curvature record 'collection'")

    # ------------------------------------------------------------------ building
    @classmethod
    def compute(cls, model: nn.Module, targets: Sequence[str], sequences: Sequence[Sequence[int]],
                corpus: Mapping[str, Any], cfg: CurvatureConfig | None = None, pad_id: int = 0,
                dist=None, progress: bool = False) -> "Curvature":
        """Collect statistics over `sequences` (described by the record entry `corpus`) and decompose them.

        Args:
            targets: resolved module paths (`cfg.targets` is not consulted here; see `collect_curvature`).
            pad_id: any token id (padding is masked).
            dist: a `DistContext` to share the work between torchrun ranks.
            progress: show a progress bar (default False).
        """
        cfg = cfg if cfg is not None else CurvatureConfig()
        if not sequences:
            raise CrispEditError("the capability corpus is empty: no sequences to collect curvature from")
        t0 = time.perf_counter()
        check_factor_memory(model, targets, sink=cfg.sink_tokens > 0)
        stats = _collect(model, targets, sequences, cfg, pad_id, dist, progress, None)
        record = {
            "model": model_fingerprint(model, targets),
            "targets": [{"name": n, "d_in": s.d_in, "d_out": s.d_out} for n, s in stats.items()],
            "collection": cfg.collection_record(),
            "corpora": [dict(corpus, n_sequences=len(sequences))],
            "model_dtype": str(next(model.parameters()).dtype).replace("torch.", ""),
            "stats_dtype": "float64",
            "created": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
        }
        cur = cls.from_stats(stats, record)
        logger.info("K-FAC for %d layer(s), %s tokens, %.1f s", len(stats.layers), f"{stats.n_tokens:,}",
                    time.perf_counter() - t0)
        return cur

    @classmethod
    def from_stats(cls, stats: KFACStats, record: dict[str, Any]) -> "Curvature":
        sink_energy = record.get("collection", {}).get("sink_energy", CurvatureConfig.sink_energy)
        check_finite_stats(stats)
        eigen = {n: eigendecompose(s, sink_energy=sink_energy) for n, s in stats.items()}
        record = dict(record)
        record["n_tokens"] = stats.n_tokens
        record["summary"] = summarize(stats, eigen)
        return cls(stats, eigen, record)

    def extend(self, model: nn.Module, sequences: Sequence[Sequence[int]], corpus: Mapping[str, Any],
               pad_id: int = 0, dist=None, progress: bool = False, checked: bool = False) -> "Curvature":
        """Add statistics of more text (same model, same settings) and re-decompose. `checked=True` says the
        caller has already verified the model (`check_model`). To pick sequences the cache has not seen, use
        `extend_from_corpus`."""
        if not checked:
            self.check_model(model)
        cfg = self.config
        cfg = cfg.replace(seed=cfg.seed + 1000 * len(self.record["corpora"]))
        stats = _collect(model, self.targets, sequences, cfg, pad_id, dist, progress, self.stats.clone())
        record = dict(self.record, corpora=self.record["corpora"] + [dict(corpus, n_sequences=len(sequences))])
        return Curvature.from_stats(stats, record)

    def extend_from_corpus(self, model: nn.Module, tokenizer, n_samples: int, *, source: str | None = None,
                           max_length: int | None = None, heldout_fraction: float | None = None,
                           seed: int | None = None, text_field: str | None = None, progress: bool = False,
                           dist=None) -> "Curvature":
        """Add `n_samples` chunks of a corpus that this curvature has not summed yet; settings left None are
        inherited from the cache (see `crispedit.curvature.extend`)."""
        from crispedit.curvature.extend import extend_from_corpus, plan_extension

        plan = plan_extension(self.record, n_samples, source=source, max_length=max_length,
                              heldout_fraction=heldout_fraction, seed=seed, text_field=text_field)
        return extend_from_corpus(self, model, tokenizer, plan, dist=dist, progress=progress)

    def merge(self, other: "Curvature") -> "Curvature":
        """Sum of two caches' statistics (same model, targets and collection settings)."""
        diffs = compare_fingerprints(self.record["model"], other.record["model"])
        if self.targets != other.targets:
            diffs.append(f"targets: {self.targets} vs {other.targets}")
        for k in ("labels", "sink_tokens"):
            a, b = self.record["collection"].get(k), other.record["collection"].get(k)
            if a != b:
                diffs.append(f"collection.{k}: {a!r} vs {b!r}")
        if diffs:
            raise CacheMismatchError("cannot merge curvature caches that differ in: " + "; ".join(diffs), diffs=diffs)
        twice = _shared_corpora(self.record, other.record)
        if not twice and all(torch.equal(self.stats[n].A, other.stats[n].A) and self.stats[n].n == other.stats[n].n
                             for n in self.targets):
            twice = ["identical statistics (the same cache twice?)"]
        if twice:
            raise CacheMismatchError("cannot merge: both caches hold " + "; ".join(twice) + " — merging would count "
                                     "those tokens twice", diffs=twice)
        stats = self.stats.clone().add_(other.stats)
        record = dict(self.record, corpora=self.record["corpora"] + other.record["corpora"])
        return Curvature.from_stats(stats, record)

    def select(self, targets: Sequence[str], model: nn.Module | None = None) -> "Curvature":
        """The curvature of a subset of this cache's targets (K-FAC blocks and their eigenbases are per layer, so
        the subset is exact): one cache collected over many layers serves any choice among them. With `model`, the
        record's weights fingerprint is recomputed for the subset (after checking the whole cache matches it)."""
        missing = [t for t in targets if t not in self.stats.layers]
        if missing:
            raise CrispEditError(f"the curvature cache does not cover {missing}; it covers {self.targets}")
        stats = KFACStats({t: self.stats[t] for t in targets})
        eigen = {t: self.eigen[t] for t in targets}
        record = dict(self.record)
        record["targets"] = [t for t in self.record["targets"] if t["name"] in set(targets)]
        record["targets"].sort(key=lambda t: list(targets).index(t["name"]))
        record["selected_from"] = [t["name"] for t in self.record["targets"]]
        if model is not None:
            self.check_model(model)
            record["model"] = model_fingerprint(model, targets)
        record["summary"] = {t: v for t, v in (self.record.get("summary") or {}).items() if t in set(targets)}
        return Curvature(stats, eigen, record)

    def summary(self, path: str | Path | None = None) -> str:
        """What this curvature holds and what it implies for editing (the text `crispedit curvature-info`
        prints)."""
        from crispedit.curvature.summary import format_summary

        record = self.record if "kept" in self.record else dict(self.record, kept=self.kept_report())
        return format_summary(record, Path(path) if path is not None else None)

    # ------------------------------------------------------------------ projections
    def masks(self, gamma: float, scope: str = "layer") -> dict[str, torch.Tensor]:
        """Keep-masks (d_out, d_in) per target at threshold γ; built once per (γ, scope) and reused (the edit,
        its diagnostics and the run record all ask). Treat them as read-only."""
        key = ("kfac", float(gamma), str(scope))
        if key not in self._masks:
            self._masks[key] = build_masks(self.eigen, gamma, scope)
        return self._masks[key]

    def correct_eigenvalues(self, model: nn.Module, sequences: Sequence[Sequence[int]], pad_id: int = 0,
                            progress: bool = False) -> dict[str, Any]:
        """Re-estimate the eigenvalues in this curvature's Kronecker eigenbases from per-sequence weight gradients
        of `model` on `sequences` (EK-FAC, `ekfac.collect_ekfac_lm`; give it the cache's own sequences,
        `extend.curvature_sequences`), so that `projectors(kind="ekfac")` can rank directions by them. Returns a
        record of the pass (sequences, seconds)."""
        from crispedit.curvature.ekfac import collect_ekfac_lm

        t0 = time.perf_counter()
        self._ekfac = collect_ekfac_lm(model, sequences, self.eigen, self.config, pad_id, progress)
        self._masks = {k: v for k, v in self._masks.items() if k[0] != "ekfac"}
        return {"sequences": len(sequences), "seconds": round(time.perf_counter() - t0, 2)}

    @property
    def corrected_eigenvalues(self) -> dict[str, Any] | None:
        """The EK-FAC eigenvalues per target (`EKFACEigen`), or None before `correct_eigenvalues`."""
        return self._ekfac

    def ekfac_masks(self, gamma: float, scope: str = "layer") -> dict[str, torch.Tensor]:
        """Keep-masks from the corrected eigenvalues (after `correct_eigenvalues`)."""
        from crispedit.curvature.ekfac import ekfac_masks

        if self._ekfac is None:
            raise CrispEditError("EK-FAC masks need corrected eigenvalues: call correct_eigenvalues first")
        key = ("ekfac", float(gamma), str(scope))
        if key not in self._masks:
            self._masks[key] = ekfac_masks(self._ekfac, gamma, scope)
        return self._masks[key]

    def projectors(self, gamma: float, scope: str = "layer", kind: str = "kfac",
                   dtype: torch.dtype = torch.float32, device: torch.device | str | None = None) -> dict[str, Any]:
        """Per-target projectors onto the kept subspace: `kfac` (CrispEdit), `ekfac` (the same eigenbasis ranked by
        corrected eigenvalues; after `correct_eigenvalues`) or `nscl` (null space of A)."""
        if not 0.0 < gamma < 1.0:
            raise CrispEditError(f"gamma must be in (0, 1), got {gamma}")
        if kind in ("kfac", "ekfac"):
            masks = self.masks(gamma, scope) if kind == "kfac" else self.ekfac_masks(gamma, scope)
            check_kept(masks, gamma, kind)
            return {n: KroneckerProjector(self.eigen[n].U_S, self.eigen[n].U_A, m, dtype=dtype, device=device)
                    for n, m in masks.items()}
        if kind == "nscl":
            keep = {n: nscl_keep_columns(e, gamma) for n, e in self.eigen.items()}
            check_kept(keep, gamma, kind)
            return {n: InputNullspaceProjector(e.U_A, keep[n], dtype=dtype, device=device)
                    for n, e in self.eigen.items()}
        raise CrispEditError(f"unknown projection kind {kind!r}; expected one of {PROJECTION_KINDS}")

    def joint_projectors(self, constraints: Sequence[tuple[KFACStats, float]], dtype: torch.dtype = torch.float32,
                         device: torch.device | str | None = None) -> dict[str, KroneckerProjector]:
        """Per-target projectors in this curvature's eigenbasis that keep only directions low in every
        (statistics, γ) constraint's energy (`masks.joint_keep_mask`): e.g. the capability at γ and the edits
        so far at their own γ, so that neither displaces the other as they would under one threshold."""
        masks = {n: joint_keep_mask(self.eigen[n], [(stats[n], g) for stats, g in constraints]) for n in self.targets}
        check_kept(masks, max(g for _, g in constraints), "kfac")
        return {n: KroneckerProjector(self.eigen[n].U_S, self.eigen[n].U_A, m, dtype=dtype, device=device)
                for n, m in masks.items()}

    def kept_report(self, gammas: Sequence[float] = SUMMARY_GAMMAS) -> dict[str, Any]:
        """Fraction of directions kept per target, per-layer and global thresholds (and the NSCL baseline)."""
        out: dict[str, Any] = {}
        for g in gammas:
            per = self.masks(g, "layer")
            glob = self.masks(g, "global")
            out[str(g)] = {
                n: {"layer": mask_report(self.eigen[n], per[n]), "global": mask_report(self.eigen[n], glob[n]),
                    "nscl_kept_fraction": float(nscl_keep_columns(self.eigen[n], g).double().mean())}
                for n in self.targets
            }
        return out

    # ------------------------------------------------------------------ persistence
    def save(self, path: str | Path, overwrite: bool = True, compact_sink: bool = True) -> Path:
        """Write the cache folder (see cache.py). `compact_sink=False` keeps the sink sums whole instead of as a
        low-rank factor (exact to the bit rather than to round-off: sequential states need that)."""
        record = dict(self.record)
        record["kept"] = self.kept_report()
        return save_cache(path, self.stats, self.eigen, record, overwrite=overwrite, compact_sink=compact_sink)

    @classmethod
    def load(cls, path: str | Path, model: nn.Module | None = None, allow_mismatch: bool = False,
             device: str | torch.device = "cpu") -> "Curvature":
        stats, eigen, record = load_cache(path, device=device)
        cur = cls(stats, eigen, record)
        if model is not None and not allow_mismatch:
            cur.check_model(model, where=str(path))
        return cur

    def check_model(self, model: nn.Module, where: str = "curvature cache") -> dict[str, Any]:
        """Refuse a model whose identity, targeted weights or layer shapes differ from the cache's; returns the
        model's fingerprint (`weights_sha256` and identity), so callers need not compute it again.

        Raises:
            CacheMismatchError: listing the differing fields (`.diffs`).
        """
        from crispedit.models.targets import layer_io_dims

        diffs = []
        for t in self.record["targets"]:
            try:
                d_in, d_out = layer_io_dims(model.get_submodule(t["name"]))
            except AttributeError:
                diffs.append(f"target {t['name']}: not in the model")
                continue
            if (d_in, d_out) != (t["d_in"], t["d_out"]):
                diffs.append(f"target {t['name']}: cache ({t['d_out']}x{t['d_in']}) model ({d_out}x{d_in})")
        ident: dict[str, Any] = {}
        if not diffs:
            ident = model_fingerprint(model, self.targets)
            diffs = compare_fingerprints(self.record["model"], ident)
        if diffs:
            raise CacheMismatchError(f"{where} does not match this model ({'; '.join(diffs)})", diffs=diffs,
                                     hint={"allow_mismatch": True},
                                     hint_text="recompute it, or pass {fix} to use it anyway")
        return ident


def check_kept(masks: dict[str, torch.Tensor], gamma: float, kind: str) -> None:
    """An edit confined to an empty subspace changes nothing (ΔW = 0) yet would "succeed": refuse it, and warn
    about single targets that cannot move."""
    import warnings

    from crispedit.errors import CrispEditWarning

    empty = [n for n, m in masks.items() if not bool(m.any())]
    if masks and len(empty) == len(masks):
        raise CrispEditError(f"nothing is editable at γ={gamma} ({kind} projection): the kept subspace of every "
                             "target is empty; raise γ, or check the cache (curvature info)")
    if empty:
        warnings.warn(f"at γ={gamma} the kept subspace of {', '.join(empty)} is empty: those layers will not "
                      "change", CrispEditWarning, stacklevel=3)


def _corpus_key(c: dict[str, Any]) -> str | None:
    for k in ("fingerprint", "sequences_sha256", "requests_sha256"):
        if c.get(k):
            return f"{k}:{c[k]}"
    return None


def _shared_corpora(a: dict[str, Any], b: dict[str, Any]) -> list[str]:
    """Corpora (by fingerprint) present in both records."""
    keys = {_corpus_key(c): c for c in a.get("corpora", []) if _corpus_key(c)}
    return [f"corpus {c.get('source')} (fingerprint {_corpus_key(c).split(':')[1][:12]})"
            for c in b.get("corpora", []) if _corpus_key(c) in keys]


def _collect(model, targets, sequences, cfg: CurvatureConfig, pad_id, dist, progress, stats) -> KFACStats:
    if dist is not None and dist.world_size > 1:
        from crispedit.curvature.distributed import collect_lm_stats_distributed

        return collect_lm_stats_distributed(model, sequences, list(targets), cfg, dist,
                                            batch_size=cfg.batch_size, max_tokens=cfg.max_tokens, pad_id=pad_id,
                                            stats=stats)
    return collect_lm_stats(model, sequences, list(targets), cfg, batch_size=cfg.batch_size,
                            max_tokens=cfg.max_tokens, pad_id=pad_id, stats=stats, progress=progress)


def summarize(stats: KFACStats, eigen: dict[str, LayerEigen]) -> dict[str, Any]:
    """Per-target facts worth seeing before editing: dominance of the top eigenvalue (with and without the
    sink positions), clamped negative eigenvalues, sink directions removed, token counts."""
    out = {}
    for n, s in stats.items():
        e = eigen[n]
        row = {
            "d_in": s.d_in, "d_out": s.d_out, "tokens": s.n, "sink_tokens": s.n_sink,
            "sink_directions_removed": e.n_sink,
            "A_top1_energy": top_energy_fraction(e.lam_A, 1),
            "S_top1_energy": top_energy_fraction(e.lam_S, 1),
            "A_clamped_negative": e.clamped_A, "S_clamped_negative": e.clamped_S,
        }
        if s.A_sink is not None and s.n_sink > 0:
            lam_full, _, _ = sym_eigh(s.full_input_factor())
            row["A_top1_energy_if_sink_kept"] = top_energy_fraction(lam_full, 1)
            a_norm = float(torch.sqrt(torch.trace(s.A) / max(s.n, 1)))
            sink_norm = float(torch.sqrt(torch.trace(s.A_sink) / s.n_sink))
            row["rms_activation_norm"] = a_norm
            row["rms_sink_activation_norm"] = sink_norm
        out[n] = row
    return out


def collect_curvature(model: nn.Module, corpus, config: CurvatureConfig | None = None, *, pad_id: int = 0,
                      dist=None, progress: bool = False) -> Curvature:
    """The capability curvature of `model` over `corpus` at the layers `config.targets` selects.

    Args:
        model: a causal LM (any device; statistics are float64).
        corpus: a `CapabilityCorpus` (`build_corpus(tokenizer, ...)`): its sequences are collected over and its
            description goes into the record.
        config: collection settings and targets (default `CurvatureConfig()`: the model type's default targets,
            sampled labels, first-token sinks kept apart).
        pad_id: any token id (padding is masked).
        dist: a `DistContext` to share the work between torchrun ranks.
        progress: show a progress bar (default False).

    Returns:
        The `Curvature` (save it with `.save(path)`).

    Raises:
        NoTargetModulesError: `config.targets` selects no Linear/Conv1D layer.
        CrispEditError: the corpus is empty.
    """
    from crispedit.curvature.extend import corpus_record
    from crispedit.models.targets import resolve_targets

    cfg = config if config is not None else CurvatureConfig()
    targets = resolve_targets(model, cfg.targets)
    return Curvature.compute(model, targets, corpus.sequences, corpus_record(corpus), cfg, pad_id=pad_id, dist=dist,
                             progress=progress)
