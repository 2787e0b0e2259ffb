"""The curvature cache: a folder with safetensors tensors and one JSON record (no pickle).

    CACHE/stats.safetensors   float64 sums  <target>.A, <target>.S, <target>.A_sink   (counts live in the JSON)
    CACHE/eigen.safetensors   float64 eigenpairs <target>.lam_A/U_A/lam_S/U_S
    CACHE/curvature.json      record: format, versions, model fingerprint, targets, collection settings,
                              corpora, counts, per-target spectra summary

Sums rather than means are stored so caches merge and extend by addition. The whole folder is written to
a temporary sibling and renamed in one step: an interrupted run never leaves a half-written cache.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save_file

from crispedit import __version__
from crispedit.curvature.eigen import LayerEigen
from crispedit.curvature.stats import KFACStats, LayerStats
from crispedit.errors import CacheMismatchError, CrispEditError  # noqa: F401 - CacheMismatchError: re-exported
from crispedit.io import atomic_dir

FORMAT = "crispedit-curvature"
FORMAT_VERSION = 1
RECORD = "curvature.json"
STATS = "stats.safetensors"
EIGEN = "eigen.safetensors"


def save_cache(path: str | Path, stats: KFACStats, eigen: dict[str, LayerEigen], record: dict[str, Any],
               overwrite: bool = True) -> Path:
    path = Path(path)
    st: dict[str, torch.Tensor] = {}
    eg: dict[str, torch.Tensor] = {}
    counts = {}
    for name, s in stats.items():
        st[f"{name}.A"] = s.A.detach().cpu().contiguous()
        st[f"{name}.S"] = s.S.detach().cpu().contiguous()
        if s.A_sink is not None:
            st[f"{name}.A_sink"] = s.A_sink.detach().cpu().contiguous()
        counts[name] = {"n": s.n, "n_sink": s.n_sink}
        e = eigen[name]
        for k in ("lam_A", "U_A", "lam_S", "U_S"):
            eg[f"{name}.{k}"] = getattr(e, k).detach().cpu().contiguous()
        counts[name].update(n_sink_directions=e.n_sink, clamped_A=e.clamped_A, clamped_S=e.clamped_S)
    record = dict(record)
    record.update(format=FORMAT, format_version=FORMAT_VERSION, crispedit_version=__version__, counts=counts)
    with atomic_dir(path, overwrite=overwrite) as tmp:
        save_file(st, str(tmp / STATS), metadata={"format": FORMAT})
        save_file(eg, str(tmp / EIGEN), metadata={"format": FORMAT})
        (tmp / RECORD).write_text(json.dumps(record, indent=2) + "\n")
    return path


def read_record(path: str | Path) -> dict[str, Any]:
    path = Path(path)
    rec = path / RECORD
    if not path.exists():
        raise CrispEditError(f"curvature cache {path} does not exist")
    if not rec.is_file():
        raise CrispEditError(f"{path} is not a crispedit curvature cache (no {RECORD})")
    try:
        record = json.loads(rec.read_text())
    except json.JSONDecodeError as e:
        raise CrispEditError(f"{rec}: invalid JSON ({e})") from None
    if record.get("format") != FORMAT:
        raise CrispEditError(f"{rec}: field 'format' is {record.get('format')!r}, expected {FORMAT!r}")
    if record.get("format_version") != FORMAT_VERSION:
        raise CrispEditError(f"{rec}: cache format version {record.get('format_version')} is not supported "
                             f"(this crispedit reads version {FORMAT_VERSION}); recompute the cache")
    return record


def load_cache(path: str | Path, device: str | torch.device = "cpu") -> tuple[KFACStats, dict[str, LayerEigen], dict]:
    path = Path(path)
    record = read_record(path)
    try:
        st = load_file(str(path / STATS), device=str(device))
        eg = load_file(str(path / EIGEN), device=str(device))
    except Exception as e:  # noqa: BLE001 - report any unreadable tensor file as a user error
        raise CrispEditError(f"{path}: cannot read cache tensors ({e})") from None
    stats, eigen = {}, {}
    for t in record["targets"]:
        name = t["name"]
        c = record["counts"][name]
        try:
            stats[name] = LayerStats(A=st[f"{name}.A"], S=st[f"{name}.S"], n=int(c["n"]),
                                     A_sink=st.get(f"{name}.A_sink"), n_sink=int(c["n_sink"]))
            eigen[name] = LayerEigen(eg[f"{name}.lam_A"], eg[f"{name}.U_A"], eg[f"{name}.lam_S"], eg[f"{name}.U_S"],
                                     int(c["n_sink_directions"]), int(c["clamped_A"]), int(c["clamped_S"]))
        except KeyError as e:
            raise CrispEditError(f"{path}: cache is missing tensor {e} for target {name!r}") from None
    return KFACStats(stats), eigen, record


def compare_fingerprints(expected: dict[str, Any], actual: dict[str, Any]) -> list[str]:
    """Differences between a cache's model record and a live model's, as 'field: cache=... model=...'."""
    diffs = []
    for k in sorted(set(expected) | set(actual)):
        a, b = expected.get(k), actual.get(k)
        if k == "name_or_path":
            continue  # the same weights may live at another path
        if a != b:
            diffs.append(f"{k}: cache={a!r} model={b!r}")
    return diffs
