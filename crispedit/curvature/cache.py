"""The curvature cache: a folder with safetensors tensors and one JSON record (no pickle).

    CACHE/stats.safetensors   float64 sums  <target>.A, <target>.S, and the sink positions' sum either as
                              <target>.A_sink_factor F (A_sink = F Fᵀ, rank ≤ number of sink positions) or,
                              when that is not smaller, as <target>.A_sink   (counts live in the JSON)
    CACHE/eigen.safetensors   float64 eigenpairs <target>.lam_A/U_A/lam_S/U_S
    CACHE/curvature.json      record: format, versions, model fingerprint, targets, collection settings,
                              corpora, counts, per-target spectra summary, and `integrity`: the size and
                              sha256 of both tensor files and the sha256 of the record itself

Sums rather than means are stored so caches merge and extend by addition. The whole folder is written to
a temporary sibling and renamed in one step: an interrupted run never leaves a half-written cache.

Loading verifies that the tensor files are the ones the record was written with (sizes always, sha256
when the tensors are loaded), that the record was not edited (its own hash), and that every tensor has
its target's shape and finite values of the right sign, so another cache's file, a truncated file, an
edited token count or a NaN is refused with the file and target named instead of editing nothing.
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
from crispedit.errors import CacheIntegrityError, CacheMismatchError, CrispEditError  # noqa: F401 - re-exported
from crispedit.io import atomic_dir, read_format_record, record_hash, recover_dir, sha256_file

FORMAT = "crispedit-curvature"
# 2: labels sampled per sequence, low-rank sink factor, whole-model fingerprint, integrity record.
FORMAT_VERSION = 2
RECORD = "curvature.json"
STATS = "stats.safetensors"
EIGEN = "eigen.safetensors"
KIND = "curvature-cache"


def sink_factor(A_sink: torch.Tensor) -> torch.Tensor:
    """F with F Fᵀ = A_sink (to float64 round-off): eigenvectors scaled by √λ for the eigenvalues above
    round-off. Its rank is at most the number of distinct sink activations (one per sequence and sink
    position; fewer when chunks start with the same token)."""
    lam, U = torch.linalg.eigh(0.5 * (A_sink + A_sink.T))
    tol = float(lam.abs().max()) * A_sink.shape[0] * torch.finfo(torch.float64).eps if lam.numel() else 0.0
    keep = lam > tol
    return (U[:, keep] * lam[keep].sqrt()).flip(1).contiguous()


def save_cache(path: str | Path, stats: KFACStats, eigen: dict[str, LayerEigen], record: dict[str, Any],
               overwrite: bool = True, compact_sink: bool = True) -> Path:
    path = Path(path)
    st: dict[str, torch.Tensor] = {}
    eg: dict[str, torch.Tensor] = {}
    counts = {}
    for name, s in stats.items():
        st[f"{name}.A"] = s.A.detach().cpu().contiguous()
        st[f"{name}.S"] = s.S.detach().cpu().contiguous()
        if s.A_sink is not None:
            A_sink = s.A_sink.detach().cpu()
            F = sink_factor(A_sink) if compact_sink else None
            if F is not None and F.shape[1] < A_sink.shape[0] // 2:  # F (d x r) is smaller than A_sink (d x d, symmetric)
                st[f"{name}.A_sink_factor"] = F
            else:
                st[f"{name}.A_sink"] = A_sink.contiguous()
        counts[name] = {"n": s.n, "n_sink": s.n_sink}
        e = eigen[name]
        for k in ("lam_A", "U_A", "lam_S", "U_S"):
            eg[f"{name}.{k}"] = getattr(e, k).detach().cpu().contiguous()
        counts[name].update(n_sink_directions=e.n_sink, clamped_A=e.clamped_A, clamped_S=e.clamped_S)
    record = dict(record)
    record.pop("integrity", None)
    record.update(format=FORMAT, format_version=FORMAT_VERSION, crispedit_version=__version__, counts=counts)
    with atomic_dir(path, overwrite=overwrite, kind=KIND) as tmp:
        save_file(st, str(tmp / STATS), metadata={"format": FORMAT})
        save_file(eg, str(tmp / EIGEN), metadata={"format": FORMAT})
        files = {f: {"bytes": (tmp / f).stat().st_size, "sha256": sha256_file(tmp / f)} for f in (STATS, EIGEN)}
        record["integrity"] = {"files": files}
        record["integrity"]["record_sha256"] = record_hash(record)
        (tmp / RECORD).write_text(json.dumps(record, indent=2) + "\n")
    return path


def read_record(path: str | Path) -> dict[str, Any]:
    """The cache's JSON record, checked: format, version, its own hash, and the tensor files' sizes (so a
    truncated or replaced file is noticed without reading it)."""
    path = Path(path)
    recover_dir(path)
    rec = path / RECORD
    if not path.exists():
        raise CrispEditError(f"curvature cache {path} does not exist")
    if not rec.is_file():
        raise CrispEditError(f"{path} is not a crispedit curvature cache (no {RECORD})")
    record = read_format_record(rec, FORMAT)
    if record.get("format_version") != FORMAT_VERSION:
        raise CrispEditError(f"{rec}: cache format version {record.get('format_version')} is not supported "
                             f"(this crispedit reads version {FORMAT_VERSION}); recompute the cache")
    integ = record.get("integrity")
    if not isinstance(integ, dict) or not isinstance(integ.get("files"), dict):
        raise CacheIntegrityError(f"{rec}: field 'integrity' is missing; recompute the cache")
    if integ.get("record_sha256") != record_hash(record):
        raise CacheIntegrityError(f"{rec}: the record was edited after the cache was written (its sha256 does not "
                                  "match); recompute the cache")
    for name in (STATS, EIGEN):
        f = path / name
        want = integ["files"].get(name, {}).get("bytes")
        if not f.is_file():
            raise CacheIntegrityError(f"{f}: missing; recompute the cache")
        size = f.stat().st_size
        if size != want:
            raise CacheIntegrityError(f"{f}: cannot read cache tensors: the file is truncated or corrupt ({size:,} "
                                      f"bytes, the record says {want:,}); recompute the cache")
    return record


def verify_files(path: Path, record: dict[str, Any]) -> None:
    """The tensor files' sha256 against the record (another cache's file of the same size is refused)."""
    for name in (STATS, EIGEN):
        want = record["integrity"]["files"][name].get("sha256")
        got = sha256_file(path / name)
        if got != want:
            raise CacheIntegrityError(f"{path / name}: not the file this cache was written with (sha256 {got[:12]}…, "
                                      f"the record says {str(want)[:12]}…); recompute the cache")


def load_cache(path: str | Path, device: str | torch.device = "cpu") -> tuple[KFACStats, dict[str, LayerEigen], dict]:
    path = Path(path)
    record = read_record(path)
    verify_files(path, record)
    try:
        st = load_file(str(path / STATS), device="cpu")
        eg = load_file(str(path / EIGEN), device="cpu")
    except Exception as e:  # noqa: BLE001 - report any unreadable tensor file as a user error
        raise CrispEditError(f"{path}: cannot read cache tensors ({e})") from None
    stats, eigen = {}, {}
    for t in record["targets"]:
        name = t["name"]
        c = record["counts"][name]
        try:
            A_sink = st.get(f"{name}.A_sink")
            if f"{name}.A_sink_factor" in st:
                F = st[f"{name}.A_sink_factor"]
                _check_tensor(path / STATS, name, "A_sink_factor", F, (t["d_in"], F.shape[1] if F.dim() == 2 else -1))
                A_sink = F @ F.T
            stats[name] = LayerStats(A=st[f"{name}.A"], S=st[f"{name}.S"], n=int(c["n"]),
                                     A_sink=A_sink, n_sink=int(c["n_sink"]))
            eigen[name] = LayerEigen(eg[f"{name}.lam_A"], eg[f"{name}.U_A"], eg[f"{name}.lam_S"], eg[f"{name}.U_S"],
                                     int(c["n_sink_directions"]), int(c["clamped_A"]), int(c["clamped_S"]))
        except KeyError as e:
            raise CrispEditError(f"{path}: cache is missing tensor {e} for target {name!r}") from None
        validate_target(path, t, stats[name], eigen[name])
    stats = KFACStats({n: _to(s, device) for n, s in stats.items()})
    eigen = {n: LayerEigen(*(getattr(e, k).to(device) for k in ("lam_A", "U_A", "lam_S", "U_S")), e.n_sink,
                           e.clamped_A, e.clamped_S) for n, e in eigen.items()}
    return stats, eigen, record


def _to(s: LayerStats, device) -> LayerStats:
    return LayerStats(s.A.to(device), s.S.to(device), s.n, None if s.A_sink is None else s.A_sink.to(device),
                      s.n_sink)


def _check_tensor(file: Path, target: str, key: str, t: torch.Tensor, shape: tuple[int, ...]) -> None:
    if t.dtype != torch.float64:
        raise CacheIntegrityError(f"{file}: {target}.{key} is {str(t.dtype).replace('torch.', '')}, expected float64")
    if tuple(t.shape) != tuple(shape):
        raise CacheIntegrityError(f"{file}: {target}.{key} has shape {list(t.shape)}, expected {list(shape)} "
                                  f"for target {target}")


def validate_target(path: Path, t: dict[str, Any], s: LayerStats, e: LayerEigen) -> None:
    """Shapes, finiteness and signs of one target's tensors; token counts that can be."""
    name, d_in, d_out = t["name"], int(t["d_in"]), int(t["d_out"])
    sf, ef = path / STATS, path / EIGEN
    for key, x, shape in (("A", s.A, (d_in, d_in)), ("S", s.S, (d_out, d_out))):
        _check_tensor(sf, name, key, x, shape)
    if s.A_sink is not None:
        _check_tensor(sf, name, "A_sink", s.A_sink, (d_in, d_in))
    for key, x, shape in (("lam_A", e.lam_A, (d_in,)), ("U_A", e.U_A, (d_in, d_in)), ("lam_S", e.lam_S, (d_out,)),
                          ("U_S", e.U_S, (d_out, d_out))):
        _check_tensor(ef, name, key, x, shape)
    if s.n < 1 or s.n_sink < 0 or (s.A_sink is None and s.n_sink > 0):
        raise CacheIntegrityError(f"{path / RECORD}: counts of {name}: n={s.n}, n_sink={s.n_sink} are impossible")
    if not 0 <= e.n_sink <= d_in:
        raise CacheIntegrityError(f"{path / RECORD}: {name}: {e.n_sink} sink directions for d_in={d_in}")
    for key, x, f in (("A", s.A, sf), ("S", s.S, sf), ("A_sink", s.A_sink, sf), ("U_A", e.U_A, ef),
                      ("U_S", e.U_S, ef), ("lam_S", e.lam_S, ef), ("lam_A", e.lam_A[e.n_sink:], ef)):
        if x is not None and not bool(torch.isfinite(x).all()):
            raise CacheIntegrityError(f"{f}: {name}.{key} holds NaN or inf; recompute the cache")
    if e.n_sink and not bool(torch.isinf(e.lam_A[: e.n_sink]).all()):
        raise CacheIntegrityError(f"{ef}: {name}.lam_A: the {e.n_sink} sink directions must have eigenvalue +inf")
    for key, x, f in (("A", torch.diagonal(s.A), sf), ("S", torch.diagonal(s.S), sf),
                      ("lam_A", e.lam_A, ef), ("lam_S", e.lam_S, ef)):
        if bool((x < 0).any()):
            raise CacheIntegrityError(f"{f}: {name}.{key} has negative entries where a covariance has none; "
                                      "recompute the cache")


def check_finite_stats(stats: KFACStats) -> None:
    """Statistics just collected must be finite: a NaN would make nothing editable (ΔW = 0) downstream."""
    for name, s in stats.items():
        for key, x in (("A", s.A), ("S", s.S), ("A_sink", s.A_sink)):
            if x is not None and not bool(torch.isfinite(x).all()):
                raise CrispEditError(f"the statistics of target {name} ({key}) contain NaN or inf: the model "
                                     "produced non-finite activations or gradients on the corpus")


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
