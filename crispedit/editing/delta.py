"""Edit deltas: ΔW per target (float32) plus a JSON record; they apply to and revert from a model bit-exactly.

Applying computes W ← cast(float32(W) + ΔW), the very operation the editor used to materialise the edited
weights, so the applied model equals the edited one bit for bit. Floating-point subtraction does not undo an
addition exactly, so reverting computes cast(float32(W) − ΔW) and then restores the (few) entries where
that differs from the base from a sparse fix-up list stored in the delta. Both directions check the weights'
fingerprints first, so a delta is never applied to the wrong model or twice.

The record holds the tensor file's size and sha256 and its own sha256 (`integrity`); loading checks them and
that every target named in the record has its tensors with the recorded shape, so a truncated file, another
delta's tensors or an edited target name are refused with the file named.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Mapping

import torch
from safetensors.torch import load_file, save_file
from torch import nn

from crispedit import __version__
from crispedit.errors import CrispEditError
from crispedit.io import atomic_dir, read_format_record, record_hash, recover_dir, sha256_file
from crispedit.models.targets import has_layer, target_weight

DELTA_FORMAT = "crispedit-delta"
DELTA_VERSION = 2  # 2: integrity (file size + sha256, record sha256); version 1 deltas still load
TENSORS = "delta.safetensors"
RECORD = "delta.json"


def materialize(base: torch.Tensor, delta: torch.Tensor) -> torch.Tensor:
    """The edited weight for a base weight and a float32 delta (the one definition used everywhere)."""
    return (base.float() + delta.to(base.device)).to(base.dtype)


def _fingerprint(model: nn.Module, targets: list[str]) -> str:
    from crispedit.models.fingerprint import weights_fingerprint

    return weights_fingerprint(model, targets)


class EditDelta:
    def __init__(self, deltas: Mapping[str, torch.Tensor], fixups: Mapping[str, tuple[torch.Tensor, torch.Tensor]],
                 record: dict[str, Any]):
        self.deltas = dict(deltas)
        self.fixups = dict(fixups)
        self.record = record

    @property
    def targets(self) -> list[str]:
        return list(self.deltas)

    @classmethod
    def from_base(cls, model: nn.Module, base: Mapping[str, torch.Tensor], deltas: Mapping[str, torch.Tensor],
                  record: dict[str, Any]) -> "EditDelta":
        """Materialise `base + delta` into the model and build the delta (with its revert fix-ups)."""
        targets = list(deltas)
        fixups = {}
        with torch.no_grad():
            for n in targets:
                W = target_weight(model, n)
                W.copy_(materialize(base[n], deltas[n]))
                back = (W.float() - deltas[n].to(W.device)).to(W.dtype)
                bad = (back != base[n]).flatten().nonzero().flatten()
                fixups[n] = (bad.cpu(), base[n].flatten()[bad].cpu().clone())
        base_fp = record.get("base_weights_sha256")
        record = dict(record, format=DELTA_FORMAT, format_version=DELTA_VERSION, crispedit_version=__version__,
                      targets=[{"name": n, "shape": list(deltas[n].shape)} for n in targets],
                      edited_weights_sha256=_fingerprint(model, targets))
        if base_fp is None:
            raise ValueError("record must hold base_weights_sha256")
        return cls({n: d.detach().float().cpu() for n, d in deltas.items()}, fixups, record)

    # ------------------------------------------------------------------ apply / revert
    def _check(self, model: nn.Module, key: str, what: str, force: bool) -> None:
        missing = [n for n in self.targets if not has_layer(model, n)]
        if missing:
            raise CrispEditError(f"the model has no layer(s) {missing} that this delta edits")
        fp = _fingerprint(model, self.targets)
        if fp != self.record[key] and not force:
            raise CrispEditError(f"the model's target weights are not the {what} this delta expects "
                                 f"({key} {self.record[key][:12]}…, model {fp[:12]}…)")

    def apply(self, model: nn.Module, force: bool = False) -> None:
        self._check(model, "base_weights_sha256", "base", force)
        with torch.no_grad():
            for n, d in self.deltas.items():
                W = target_weight(model, n)
                W.copy_(materialize(W, d))

    def revert(self, model: nn.Module, force: bool = False) -> None:
        self._check(model, "edited_weights_sha256", "edited weights", force)
        with torch.no_grad():
            for n, d in self.deltas.items():
                W = target_weight(model, n)
                back = (W.float() - d.to(W.device)).to(W.dtype)
                idx, val = self.fixups[n]
                flat = back.flatten()
                flat[idx.to(flat.device)] = val.to(device=flat.device, dtype=flat.dtype)
                W.copy_(flat.view_as(W))

    # ------------------------------------------------------------------ persistence
    def save(self, path: str | Path, overwrite: bool = False) -> Path:
        tensors = {}
        for n, d in self.deltas.items():
            tensors[f"{n}.delta"] = d.contiguous()
            idx, val = self.fixups[n]
            tensors[f"{n}.revert_index"] = idx.contiguous()
            tensors[f"{n}.revert_value"] = val.float().contiguous()
        with atomic_dir(path, overwrite=overwrite, kind="delta") as tmp:
            save_file(tensors, str(tmp / TENSORS), metadata={"format": DELTA_FORMAT})
            record = {k: v for k, v in self.record.items() if k != "integrity"}
            record["format_version"] = DELTA_VERSION
            record["integrity"] = {"file": {"bytes": (tmp / TENSORS).stat().st_size,
                                            "sha256": sha256_file(tmp / TENSORS)}}
            record["integrity"]["record_sha256"] = record_hash(record)
            (tmp / RECORD).write_text(json.dumps(record, indent=2) + "\n")
        return Path(path)

    @classmethod
    def load(cls, path: str | Path) -> "EditDelta":
        path = Path(path)
        recover_dir(path)
        rec = path / RECORD
        if not rec.is_file():
            raise CrispEditError(f"{path} is not a crispedit delta (no {RECORD})")
        record = read_format_record(rec, DELTA_FORMAT)
        tensor_file = path / TENSORS
        if not tensor_file.is_file():
            raise CrispEditError(f"{tensor_file}: missing")
        integ = record.get("integrity")
        if record.get("format_version", 1) >= 2:
            if not isinstance(integ, dict) or integ.get("record_sha256") != record_hash(record):
                raise CrispEditError(f"{rec}: the record was edited after the delta was written (its sha256 does "
                                     "not match)")
            want = integ.get("file", {})
            size = tensor_file.stat().st_size
            if size != want.get("bytes"):
                raise CrispEditError(f"{tensor_file}: truncated or corrupt ({size} bytes, the record says "
                                     f"{want.get('bytes')})")
            if sha256_file(tensor_file) != want.get("sha256"):
                raise CrispEditError(f"{tensor_file}: not the file this delta was written with (sha256 differs)")
        try:
            t = load_file(str(tensor_file))
        except Exception as e:  # noqa: BLE001 - a damaged file is the user's problem, named
            raise CrispEditError(f"{tensor_file}: truncated or corrupt ({str(e).splitlines()[0]})") from None
        targets = record.get("targets")
        if not isinstance(targets, list) or not targets:
            raise CrispEditError(f"{rec}: field 'targets' must be a non-empty list")
        deltas, fixups = {}, {}
        for i, item in enumerate(targets):
            n = item.get("name") if isinstance(item, dict) else None
            if not isinstance(n, str):
                raise CrispEditError(f"{rec}: targets[{i}] has no 'name'")
            missing = [k for k in (f"{n}.delta", f"{n}.revert_index", f"{n}.revert_value") if k not in t]
            if missing:
                raise CrispEditError(f"{rec}: targets[{i}] names {n!r}, but {tensor_file.name} has no tensor "
                                     f"{missing[0]!r}")
            d = t[f"{n}.delta"]
            if list(d.shape) != list(item.get("shape", [])) or d.dtype != torch.float32:
                raise CrispEditError(f"{tensor_file}: {n}.delta is {str(d.dtype).replace('torch.', '')} "
                                     f"{list(d.shape)}, the record says float32 {item.get('shape')}")
            if not bool(torch.isfinite(d).all()):
                raise CrispEditError(f"{tensor_file}: {n}.delta holds NaN or inf")
            deltas[n] = d
            fixups[n] = (t[f"{n}.revert_index"], t[f"{n}.revert_value"])
        extra = sorted({k.rsplit(".", 1)[0] for k in t} - set(deltas))
        if extra:
            raise CrispEditError(f"{tensor_file}: holds tensors of {extra[0]!r}, which {RECORD} does not list")
        return cls(deltas, fixups, record)
