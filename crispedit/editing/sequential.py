"""CrispEdit-Seq (Algorithm 2): edits arrive in chunks; after each chunk the K-FAC statistics of that chunk's
edit sequences (prompt + target + EOS, loss over the whole sequence as in the paper's Appendix E) are added to
the accumulated capability statistics, so earlier edits become constraints for later ones.

Everything needed to continue lives in one state folder — no earlier edit text is kept:
    STATE/state.json            base fingerprint, targets, config, chunk size, per-chunk log, and the sha256
                                of every request edited so far, in order
    STATE/curvature/            accumulated statistics (a regular curvature cache, sink sums kept whole so
                                that a resumed run re-decomposes exactly what an uninterrupted one does)
    STATE/weights.safetensors   the base and current target weights (float32 ΔW = current − base)
    STATE/capability/, STATE/edits/   with separate thresholds (`edit_gamma`): the capability statistics alone and
                                the edits' alone (unweighted), each thresholded at its own γ in the basis of the
                                accumulated statistics
The folder is replaced after every chunk by a crash-safe swap (crispedit.io), so a run killed at any moment
leaves the state of the last finished chunk. `remaining` tells a resumed run which requests are not done
yet: it continues from the first of them with the same chunk boundaries, seeds and statistics, so an
interrupted and resumed run ends bit for bit where an uninterrupted one does.
"""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path
from typing import Any, Sequence

import torch
from safetensors.torch import load_file, save_file
from torch import nn

from crispedit.config import CurvatureConfig, EditStatistics
from crispedit.curvature.api import Curvature
from crispedit.curvature.collect import collect_lm_stats
from crispedit.data.records import EditRequest
from crispedit.editing.contexts import training_sequences
from crispedit.editing.config import EditConfig
from crispedit.editing.delta import EditDelta
from crispedit.editing.engine import EditResult, edit, training_positions
from crispedit.errors import CrispEditError
from crispedit.io import atomic_dir, read_format_record, recover_dir, sha256_json
from crispedit.models.runtime import pad_id_of
from crispedit.models.targets import target_weight

STATE_FORMAT = "crispedit-sequential-state"
STATE_VERSION = 2  # 2: done requests by content hash, chunk size


def request_hash(request: EditRequest) -> str:
    """Content hash of one request (its canonical JSON): identifies it across runs and files."""
    return sha256_json(request.to_json())


class SequentialEditor:
    def __init__(self, path: Path, curvature: Curvature, base: dict[str, torch.Tensor], state: dict[str, Any],
                 current_fingerprint: str | None = None, capability: Curvature | None = None,
                 edits: Curvature | None = None):
        self.path = Path(path)
        self.curvature = curvature
        self.capability = capability  # separate thresholds only: the capability statistics alone
        self.edits = edits  # separate thresholds only: the edits' statistics so far (None before the first chunk)
        self.base = base
        self.state = state
        self._current_fp = current_fingerprint  # the model's target weights now, when known (not re-hashed)

    @property
    def targets(self) -> list[str]:
        return self.curvature.targets

    @property
    def config(self) -> EditConfig:
        return EditConfig.from_dict(self.state["config"], source=f"{self.path / 'state.json'}: config")

    @property
    def edit_weight(self) -> int:
        return int(self.state.get("edit_weight", 1))

    @property
    def edit_statistics(self) -> str:
        return str(self.state.get("edit_statistics", EditStatistics.SEQUENCE))

    @property
    def edit_gamma(self) -> float | None:
        g = self.state.get("edit_gamma")
        return None if g is None else float(g)

    @property
    def done_requests(self) -> list[str]:
        return list(self.state.get("done_requests", []))

    def remaining(self, requests: Sequence[EditRequest], chunk_size: int | None = None) -> int:
        """Index of the first request of `requests` this state has not edited. The edited ones must be the
        first ones of `requests`, in order (same content), and the chunk size the state's."""
        done = self.done_requests
        hashes = [request_hash(r) for r in requests[: len(done)]]
        if hashes != done:
            first = next((i for i, (a, b) in enumerate(zip(hashes, done)) if a != b), len(hashes))
            raise CrispEditError(f"{self.path}: this state has edited {len(done)} request(s), but request {first} of "
                                 f"the {len(requests)} given differs from the one it edited (another file, or "
                                 "the file changed); resume with the same requests, or start a new state")
        want = self.state.get("chunk_size")
        if chunk_size is not None and want is not None and int(want) != int(chunk_size):
            raise CrispEditError(f"{self.path}: this state edits chunks of {want} requests, not {chunk_size}",
                                 hint={"chunk_size": int(want)}, hint_text="resume with {fix}")
        return len(done)

    @classmethod
    def create(cls, path: str | Path, model: nn.Module, curvature: Curvature, cfg: EditConfig,
               overwrite: bool = False, edit_weight: int = 1,
               base_fingerprint: str | None = None, chunk_size: int | None = None,
               edit_statistics: str = EditStatistics.SEQUENCE, edit_gamma: float | None = None
               ) -> "SequentialEditor":
        """`edit_weight` counts each edit token that many times when a chunk's statistics are merged: a few
        hundred edit tokens against tens of thousands of capability tokens otherwise hold little curvature
        energy, and the γ threshold barely protects earlier edits. `edit_statistics`: which positions of a
        chunk's training sequences count (`EditStatistics`). `edit_gamma`: threshold the capability (at the
        config's γ) and the accumulated edits (at this γ) separately, each on its own energy, instead of the merged
        statistics at one γ (where edit energy displaces capability energy); the merged statistics still give the
        basis. `base_fingerprint`: the model's targeted weights fingerprint when the caller has already checked
        the model against `curvature`."""
        if edit_statistics not in EditStatistics.values():
            raise CrispEditError(f"edit_statistics must be one of {', '.join(EditStatistics.values())}, got "
                                 f"{edit_statistics!r}")
        if cfg.eigenvalues != "kfac":
            raise CrispEditError(f"eigenvalues {cfg.eigenvalues!r} is not implemented for sequential editing (each "
                                 "chunk's merged statistics would need their own correction); edit in one batch")
        if cfg.relinearize:
            raise CrispEditError("relinearize is not implemented for sequential editing (a chunk's statistics would "
                                 "have to be recollected too); edit in one batch, or leave it at 0")
        if edit_gamma is not None:
            if not 0.0 < edit_gamma < 1.0:
                raise CrispEditError(f"edit_gamma must be in (0, 1), got {edit_gamma}")
            if cfg.projection != "kfac" or cfg.scope != "layer":
                raise CrispEditError(f"edit_gamma (separate thresholds) needs the crispedit projection with per-layer "
                                     f"thresholds, not method {cfg.method!r} with scope {cfg.scope!r}")
        path = Path(path)
        recover_dir(path)
        if path.exists() and any(path.iterdir()) and not overwrite:
            raise CrispEditError(f"sequential state {path} already exists", hint={"resume": True},
                                 hint_text="continue it with {fix}, or choose another folder")
        if base_fingerprint is None:
            base_fingerprint = curvature.check_model(model)["weights_sha256"]
        targets = curvature.targets
        base = {n: target_weight(model, n).detach().clone().cpu() for n in targets}
        state = {"format": STATE_FORMAT, "format_version": STATE_VERSION, "targets": targets,
                 "base_weights_sha256": base_fingerprint, "config": cfg.to_json(),
                 "chunk_size": chunk_size, "chunks": [], "n_edits": 0, "edit_weight": int(edit_weight),
                 "edit_statistics": str(edit_statistics), "done_requests": [],
                 "edit_gamma": None if edit_gamma is None else float(edit_gamma)}
        if int(edit_weight) != edit_weight or edit_weight < 1:
            raise CrispEditError(f"the edit statistics weight must be a positive integer, got {edit_weight}")
        ed = cls(path, curvature, base, state, current_fingerprint=base_fingerprint,
                 capability=curvature if edit_gamma is not None else None)
        ed._save(model)
        return ed

    @classmethod
    def open(cls, path: str | Path, model: nn.Module) -> "SequentialEditor":
        """Resume: `model` must be the base model; the accumulated edits are applied to it."""
        from crispedit.models.fingerprint import weights_fingerprint

        path = Path(path)
        recover_dir(path)
        sj = path / "state.json"
        if not sj.is_file():
            what = "does not exist" if not path.exists() else "is not a sequential editing state (no state.json)"
            raise CrispEditError(f"{path} {what}; start a new state without --resume")
        state = read_format_record(sj, STATE_FORMAT)
        if state.get("format_version") != STATE_VERSION or not isinstance(state.get("done_requests"), list):
            raise CrispEditError(f"{sj}: written by an older crispedit (format version {state.get('format_version')}) "
                                 "that did not record which requests are done; start a new state")
        targets = state["targets"]
        fp = weights_fingerprint(model, targets)
        if fp != state["base_weights_sha256"]:
            raise CrispEditError(f"{path} was started from other base weights than this model's "
                                 "(pass the same base model the state was created with)")
        curvature = Curvature.load(path / "curvature", model=None)
        capability = edits = None
        if state.get("edit_gamma") is not None:
            capability = Curvature.load(path / "capability", model=None)
            if (path / "edits").is_dir():
                edits = Curvature.load(path / "edits", model=None)
        w = load_file(str(path / "weights.safetensors"))
        base = {n: w[f"{n}.base"] for n in targets}
        with torch.no_grad():
            for n in targets:
                W = target_weight(model, n)
                W.copy_(w[f"{n}.current"].to(device=W.device, dtype=W.dtype))
        return cls(path, curvature, base, state, capability=capability, edits=edits)

    def edit_chunk(self, model: nn.Module, tokenizer, requests: Sequence[EditRequest], progress: bool = False,
                   cfg: EditConfig | None = None) -> EditResult:
        """Edit one chunk under the accumulated constraints, then add the chunk's statistics to them."""
        cfg = cfg or self.config
        k = len(self.state["chunks"])
        # `auto` positions resolved once for the run's chunk size, so that a short last chunk trains where the
        # others did (and where the run's record says).
        at_once = int(self.state.get("chunk_size") or len(requests))
        cfg = dataclasses.replace(cfg, seed=cfg.seed + k, edit_positions=cfg.positions_for(at_once))
        projectors = None
        if self.edit_gamma is not None:
            constraints = [(self.capability.stats, cfg.gamma)]
            if self.edits is not None:
                constraints.append((self.edits.stats, self.edit_gamma))
            projectors = self.curvature.joint_projectors(constraints, device=next(model.parameters()).device)
        result = edit(model, tokenizer, requests, self.targets, cfg, curvature=self.curvature, progress=progress,
                      projectors=projectors, record={"chunk": k}, base_fingerprint=self._current_fp)
        self._current_fp = result.delta.record["edited_weights_sha256"]
        prefixes = result.delta.record.get("prefixes") or []
        contexts = result.delta.record.get("training_contexts") or list(cfg.contexts)
        train = training_sequences(tokenizer, requests, contexts, prefixes, min(cfg.prefixes, len(prefixes)), cfg.seed,
                                   cfg.target_end)
        seqs = [s.pair.input_ids for s in train]
        positions = None
        if self.edit_statistics == EditStatistics.EDIT_POSITIONS:
            positions = training_positions(train, cfg.edit_positions)
        base_cfg = self.curvature.config
        ccfg = dataclasses.replace(base_cfg, seed=base_cfg.seed + 7919 * (k + 1))
        chunk_stats = collect_lm_stats(model, seqs, self.targets, ccfg, pad_id=pad_id_of(tokenizer), progress=False,
                                       desc="edit statistics", positions=positions)
        if self.edit_gamma is not None:
            edits = chunk_stats.clone() if self.edits is None else self.edits.stats.clone().add_(chunk_stats)
            self.edits = Curvature.from_stats(edits, dict(self.curvature.record, corpora=[{"source": "edits"}]))
        stats = self.curvature.stats.clone().add_(chunk_stats.scaled_(self.edit_weight))
        record = dict(self.curvature.record)
        record["corpora"] = list(record.get("corpora", [])) + [
            {"source": "edits", "chunk": k, "requests_sha256": result.delta.record["requests_sha256"],
             "n_sequences": len(seqs), "n_tokens": sum(map(len, seqs))}]
        self.curvature = Curvature.from_stats(stats, record)
        self.state["chunks"].append({"chunk": k, "n_edits": len(requests), "steps": result.steps,
                                     "epochs": result.epochs, "stopped": result.stopped,
                                     "final_loss": result.epoch_losses[-1] if result.epoch_losses else None,
                                     "seconds": result.seconds,
                                     "requests_sha256": result.delta.record["requests_sha256"],
                                     "edit_tokens": sum(map(len, seqs)) if positions is None else sum(
                                         len(s) if p is None else len(p) for s, p in zip(seqs, positions)),
                                     "edit_weight": self.edit_weight, "edit_statistics": self.edit_statistics,
                                     "edit_gamma": self.edit_gamma})
        self.state["n_edits"] += len(requests)
        self.state["done_requests"] = self.done_requests + [request_hash(r) for r in requests]
        self._save(model)
        return result

    def curvature_collect_config(self) -> CurvatureConfig:
        return self.curvature.config

    def cumulative_delta(self, model: nn.Module) -> EditDelta:
        """ΔW of all chunks so far relative to the base, as a delta that applies to the base model."""
        deltas = {n: target_weight(model, n).float().cpu() - self.base[n].float() for n in self.targets}
        rec = {"base_weights_sha256": self.state["base_weights_sha256"], "sequential": True,
               "chunks": self.state["chunks"], "config": self.state["config"], "n_requests": self.state["n_edits"]}
        base = {n: self.base[n].to(device=target_weight(model, n).device, dtype=target_weight(model, n).dtype) for n in self.targets}
        return EditDelta.from_base(model, base, {n: d.to(target_weight(model, n).device) for n, d in deltas.items()}, rec)

    def _save(self, model: nn.Module) -> None:
        tensors = {}
        for n in self.targets:
            tensors[f"{n}.base"] = self.base[n].contiguous()
            tensors[f"{n}.current"] = target_weight(model, n).detach().cpu().contiguous()
        with atomic_dir(self.path, overwrite=True, kind="sequential-state") as tmp:
            self.curvature.save(tmp / "curvature", compact_sink=False)
            if self.capability is not None:
                self.capability.save(tmp / "capability", compact_sink=False)
            if self.edits is not None:
                self.edits.save(tmp / "edits", compact_sink=False)
            save_file(tensors, str(tmp / "weights.safetensors"))
            (tmp / "state.json").write_text(json.dumps(self.state, indent=2) + "\n")
