"""Small I/O helpers: atomic writes, crash-safe folder swaps, output-folder protection, hashing.

Guarantees (tested in tests/test_faults.py):
- A file or folder is written beside its final path and renamed into place: a crash never leaves it
  half-written.
- Replacing an existing folder takes two renames (PATH → .PATH.old, new → PATH) under a lock on the parent
  folder. A process killed between them leaves PATH missing and the previous version in .PATH.old;
  `recover_dir` (run by every writer and by the readers of crispedit folders before they look) renames it
  back. Temporary folders and files of processes that no longer run are removed on the next write.
- An existing folder is only ever replaced if this tool wrote it (the record every crispedit folder holds
  says so and what kind of folder it is: curvature.json, state.json, delta.json, run.json with delta/,
  demo.json), of the same kind, and never when it is (or contains, or lies inside) one of the job's inputs.
- Files get the mode the process umask gives (safetensors and mkstemp create 0600 files; fixed before the
  rename), and a failed write is a one-line `WriteError` naming the path.

Tests inject a SIGKILL at a named point with `CRISPEDIT_TEST_FAULT=POINT[:N]` (the N-th time the point is
reached, default 1); see `fault_point`. Nothing else reads that variable.
"""

from __future__ import annotations

import contextlib
import errno
import hashlib
import json
import os
import shutil
import signal
import tempfile
from pathlib import Path
from typing import Any, Iterable, Iterator

from crispedit.errors import CrispEditError, OutputError, OutputExistsError, WriteError  # noqa: F401 - re-exported

FAULT_ENV = "CRISPEDIT_TEST_FAULT"
_OLD_SUFFIX = ".old"
_TMP_SUFFIX = ".tmp"

# The record that identifies a folder crispedit wrote: file -> (kind, required "format").
_RECORDS = {
    "curvature.json": ("curvature-cache", "crispedit-curvature"),
    "state.json": ("sequential-state", "crispedit-sequential-state"),
    "delta.json": ("delta", "crispedit-delta"),
}


# ------------------------------------------------------------------------------------------ fault injection

_fault_counts: dict[str, int] = {}


def fault_point(name: str) -> None:
    """Kill this process with SIGKILL here if `CRISPEDIT_TEST_FAULT` names this point (tests only).

    `POINT` kills the first time the point is reached, `POINT:N` the N-th time (counted per process)."""
    spec = os.environ.get(FAULT_ENV)
    if not spec:
        return
    point, _, nth = spec.partition(":")
    if point != name:
        return
    _fault_counts[name] = _fault_counts.get(name, 0) + 1
    if _fault_counts[name] == (int(nth) if nth else 1):
        os.kill(os.getpid(), signal.SIGKILL)


# ------------------------------------------------------------------------------------------ modes, errors


def process_umask() -> int:
    """The process umask, read without changing it (os.umask would, briefly, for every thread)."""
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("Umask:"):
                return int(line.split()[1], 8)
    except (OSError, ValueError):
        pass
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def _apply_umask(root: Path) -> None:
    """Give every file and folder under `root` (created by this process) the modes a plain open/mkdir would."""
    mask = process_umask()
    os.chmod(root, 0o777 & ~mask)
    for dirpath, dirnames, filenames in os.walk(root):
        for d in dirnames:
            os.chmod(os.path.join(dirpath, d), 0o777 & ~mask)
        for f in filenames:
            p = os.path.join(dirpath, f)
            if not os.path.islink(p):
                os.chmod(p, 0o666 & ~mask)


def write_error(path: str | os.PathLike, e: BaseException) -> WriteError:
    """A one-line error for a failed write of `path`, with the fix for the common causes."""
    text = str(e).strip()
    reason = getattr(e, "strerror", None) or (text.splitlines()[0] if text else type(e).__name__)
    code = getattr(e, "errno", None)
    hint = {errno.ENOSPC: "free some space or write elsewhere", errno.EDQUOT: "free some space or write elsewhere",
            errno.EROFS: "the file system is read-only; write elsewhere",
            errno.EACCES: "no permission; write elsewhere", errno.EPERM: "no permission; write elsewhere",
            errno.EFBIG: "the file is larger than this process may write"}.get(code)
    if hint is None and "No space left" in str(e):
        hint = "free some space or write elsewhere"
    return WriteError(f"cannot write {path}: {reason}" + (f" ({hint})" if hint else ""))


def _is_write_failure(e: BaseException) -> bool:
    return isinstance(e, OSError) or type(e).__name__ == "SafetensorError"


# ------------------------------------------------------------------------------------------ temporary names


def _tmp_prefix(path: Path) -> str:
    return f".{path.name}.{os.getpid()}."


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def _stale_temps(path: Path) -> list[Path]:
    """Temporary siblings of `path` (`.NAME.PID.xxxx.tmp`) left by processes that no longer run."""
    out = []
    head = f".{path.name}."
    try:
        siblings = list(path.parent.iterdir())
    except OSError:
        return out
    for p in siblings:
        n = p.name
        if not (n.startswith(head) and n.endswith(_TMP_SUFFIX)):
            continue
        pid = n[len(head):].split(".", 1)[0]
        if pid.isdigit() and int(pid) != os.getpid() and not _pid_alive(int(pid)):
            out.append(p)
    return out


def _remove(p: Path) -> None:
    if p.is_dir() and not p.is_symlink():
        shutil.rmtree(p, ignore_errors=True)
    else:
        with contextlib.suppress(OSError):
            p.unlink()


# ------------------------------------------------------------------------------------------ atomic files


@contextlib.contextmanager
def atomic_path(path: str | os.PathLike) -> Iterator[Path]:
    """Yield a temporary path beside `path`; on success it is renamed over `path`, on error removed."""
    path = Path(path)
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(prefix=_tmp_prefix(path), suffix=_TMP_SUFFIX, dir=path.parent)
        os.close(fd)
        for stale in _stale_temps(path):
            _remove(stale)
    except OSError as e:
        raise write_error(path, e) from None
    tmp_path = Path(tmp)
    try:
        yield tmp_path
        os.chmod(tmp_path, 0o666 & ~process_umask())  # mkstemp (and safetensors) create 0600
        os.replace(tmp_path, path)
    except BaseException as e:
        tmp_path.unlink(missing_ok=True)
        if _is_write_failure(e) and not isinstance(e, CrispEditError):
            raise write_error(path, e) from None
        raise


def write_json(path: str | os.PathLike, obj: Any) -> None:
    """Write JSON atomically (indented, keys in insertion order)."""
    with atomic_path(path) as tmp:
        tmp.write_text(json.dumps(obj, indent=2, default=_json_default) + "\n")


# ------------------------------------------------------------------------------------------ crash-safe folders


@contextlib.contextmanager
def _parent_lock(parent: Path) -> Iterator[None]:
    """An exclusive lock on the parent folder (flock on its descriptor): swaps and recoveries of folders in
    it never interleave. Released by the kernel if the process dies."""
    try:
        import fcntl
    except ImportError:  # not POSIX: no lock, the renames are still ordered
        yield
        return
    fd = os.open(parent, os.O_RDONLY)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        yield
    finally:
        os.close(fd)  # closing releases the lock


def _old_path(path: Path) -> Path:
    return path.with_name(f".{path.name}{_OLD_SUFFIX}")


def _recover_locked(path: Path) -> str | None:
    old = _old_path(path)
    if not old.exists():
        return None
    if path.exists() or path.is_symlink():
        _remove(old)  # the swap finished; only its clean-up was cut short
        return "removed"
    os.replace(old, path)  # killed between the two renames: the previous version comes back
    return "restored"


def recover_dir(path: str | os.PathLike) -> str | None:
    """Finish what a killed folder swap left: restore `.NAME.old` to NAME if NAME is missing, or delete it
    if NAME is there. Returns "restored", "removed" or None (nothing to do). Cheap when nothing is left."""
    path = Path(path)
    try:
        if not _old_path(path).exists():
            return None
    except OSError:  # cannot even look (no permission): nothing this process could restore
        return None
    try:
        with _parent_lock(path.parent):
            return _recover_locked(path)
    except OSError as e:
        raise write_error(path, e) from None


@contextlib.contextmanager
def atomic_dir(path: str | os.PathLike, overwrite: bool = False, kind: str | None = None,
               require_marker: bool = True) -> Iterator[Path]:
    """Yield a temporary folder beside `path`; on success it becomes `path` (see the module docstring).

    With `overwrite`, an existing `path` is replaced only if it is a crispedit folder of kind `kind` (see
    `output_kind`; `require_marker=False`: any folder — for crispedit's own folders under its home, e.g. a
    damaged converted model)."""
    path = Path(path)
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        recover_dir(path)
        for stale in _stale_temps(path):
            _remove(stale)
        tmp = Path(tempfile.mkdtemp(prefix=_tmp_prefix(path), suffix=_TMP_SUFFIX, dir=path.parent))
    except OSError as e:
        raise write_error(path, e) from None
    try:
        yield tmp
        _apply_umask(tmp)
        with _parent_lock(path.parent):
            _recover_locked(path)
            if path.exists() or path.is_symlink():
                if not overwrite:
                    raise OutputExistsError(f"{path} exists")
                if require_marker:
                    _check_replaceable(path, kind)
                old = _old_path(path)
                os.replace(path, old)
                fault_point("between-renames")
                os.replace(tmp, path)
                _remove(old)
            else:
                os.replace(tmp, path)
    except BaseException as e:
        shutil.rmtree(tmp, ignore_errors=True)
        if _is_write_failure(e) and not isinstance(e, CrispEditError):
            raise write_error(path, e) from None
        raise


# ------------------------------------------------------------------------------------------ markers, outputs


def output_kind(path: str | os.PathLike) -> str | None:
    """What kind of crispedit folder `path` is ("edit-output", "curvature-cache", "sequential-state", "delta",
    "demo-report"), from the record crispedit writes into each, or None if crispedit did not write it."""
    path = Path(path)
    if not path.is_dir() or path.is_symlink():
        return None
    for name, (kind, fmt) in _RECORDS.items():
        if _record_format(path / name) == fmt:
            return kind
    if (path / "run.json").is_file() and _record_format(path / "delta" / "delta.json") == "crispedit-delta":
        return "edit-output"
    try:
        demo = json.loads((path / "demo.json").read_text())
    except (OSError, ValueError):
        demo = None
    if isinstance(demo, dict) and "curvature_cache" in demo and "summary" in demo:
        return "demo-report"
    return None


def _record_format(p: Path) -> str | None:
    try:
        d = json.loads(p.read_text())
    except (OSError, ValueError):
        return None
    return d.get("format") if isinstance(d, dict) else None


def _check_replaceable(path: Path, kind: str | None) -> None:
    found = output_kind(path)
    if path.is_dir() and not path.is_symlink() and not any(path.iterdir()):
        return
    if found is None:
        raise OutputError(f"refusing to replace {path}: crispedit did not write it (it holds no crispedit "
                          "record); choose another output folder")
    if kind is not None and found != kind:
        raise OutputError(f"refusing to replace {path}: it is a crispedit {found}, not a {kind}; choose another "
                          "output folder")


def _resolved(p: str | os.PathLike) -> Path:
    return Path(os.path.realpath(Path(p).expanduser()))


def check_writable(path: str | os.PathLike, what: str = "output") -> None:
    """`path` can be created: its nearest existing ancestor is a folder in which a file can be made (a real
    probe, so read-only file systems are caught even for root). Run before long work."""
    path = Path(path).expanduser()
    parent = path.absolute().parent
    while not parent.exists() and parent != parent.parent:
        parent = parent.parent
    if not parent.is_dir():
        raise OutputError(f"cannot write the {what} {path}: {parent} is a file, not a folder")
    try:
        fd, probe = tempfile.mkstemp(prefix=".crispedit-probe.", dir=parent)
        os.close(fd)
        os.unlink(probe)
    except OSError as e:
        raise OutputError(f"cannot write the {what} {path}: {parent} is not writable "
                          f"({e.strerror or e}); choose another location") from None


def check_apart_from_inputs(path: str | os.PathLike, protected: Iterable[str | os.PathLike | None],
                            what: str = "output", inside_ok: bool = False) -> None:
    """Refuse an output that is one of the job's inputs, contains one (replacing it would delete the input)
    or lies inside one (writing it would change the input; `inside_ok` allows a new file in an input folder
    that is not a model folder, e.g. a report in an edit's output folder). Inputs that do not exist are
    skipped."""
    path = Path(path).expanduser()
    target = _resolved(path)
    for p in protected:
        if p is None or str(p) == "" or not Path(p).expanduser().exists():
            continue
        src = _resolved(p)
        if target == src or target in src.parents:
            rel = "is" if target == src else "contains"
            raise OutputError(f"refusing to write the {what} {path}: it {rel} the input {p}; choose another "
                              "location")
        if src in target.parents and not (inside_ok and not (src / "config.json").exists()):
            raise OutputError(f"refusing to write the {what} {path}: it lies inside the input {p}; choose "
                              "another location")


def check_output_folder(path: str | os.PathLike, force: bool, kind: str, what: str = "output folder",
                        protected: Iterable[str | os.PathLike | None] = ()) -> None:
    """Refuse, before any work, an output folder this job must not write (one line, naming why):

    - one of the job's inputs (`protected`: the model folder, caches, data files), a folder that contains
      one, or a folder inside one;
    - an existing file (a folder is expected);
    - an existing non-empty folder crispedit did not write, or of another kind — even with `force`;
    - an existing crispedit folder of this kind without `force`;
    - a location that cannot be written.
    A killed swap of `path` is recovered first."""
    path = Path(path).expanduser()
    recover_dir(path)
    check_apart_from_inputs(path, protected, what)
    if path.exists() or path.is_symlink():
        if not path.is_dir():
            raise OutputError(f"the {what} {path} is an existing file; choose a folder path")
        if any(path.iterdir()):
            found = output_kind(path)
            if found is None:
                raise OutputError(f"the {what} {path} exists and crispedit did not write it; choose another "
                                  "folder (only crispedit's own output is ever replaced)")
            if found != kind:
                raise OutputError(f"the {what} {path} is a crispedit {found}, not a {kind}; choose another folder")
            if not force:
                raise OutputExistsError(f"the {what} {path} exists and is not empty", hint={"overwrite": True},
                                        hint_text="pass {fix} to replace it")
    check_writable(path, what)


def check_output_file(path: str | os.PathLike, what: str = "output file") -> None:
    """An output file path: not an existing folder, and writable (checked before the work)."""
    path = Path(path).expanduser()
    if path.is_dir():
        raise OutputError(f"the {what} {path} is a folder; give a file path")
    check_writable(path, what)


def check_report_output(out: str | os.PathLike, inputs: Iterable[str | os.PathLike | None] = ()) -> None:
    """Before an evaluation: both report files (see `report_paths`) can be written and are none of its inputs."""
    for p in report_paths(out):
        check_apart_from_inputs(p, inputs, "report", inside_ok=True)
        check_output_file(p, "report")


def report_paths(out: str | os.PathLike) -> tuple[Path, Path]:
    """(JSON, Markdown) paths of a report asked for as `out`: REPORT.json → (REPORT.json, REPORT.md);
    REPORT.md → (REPORT.json, REPORT.md), so the Markdown never overwrites the JSON."""
    out = Path(out)
    if out.suffix.lower() == ".md":
        return out.with_suffix(".json"), out
    return out, out.with_suffix(".md")


# ------------------------------------------------------------------------------------------ JSON, hashing


def _json_default(o: Any) -> Any:
    if isinstance(o, Path):
        return str(o)
    if hasattr(o, "tolist"):
        return o.tolist()
    if hasattr(o, "__dataclass_fields__"):
        import dataclasses

        return dataclasses.asdict(o)
    raise TypeError(f"not JSON serialisable: {type(o).__name__}")


def sha256_bytes(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def sha256_file(path: str | os.PathLike, chunk: int = 1 << 20) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            h.update(block)
    return h.hexdigest()


def sha256_json(obj: Any) -> str:
    """Hash of a JSON-serialisable object in a canonical form (sorted keys)."""
    return sha256_bytes(json.dumps(obj, sort_keys=True, default=_json_default).encode())


def jsonl_records(text: str, name: str) -> Iterator[tuple[int, Any]]:
    """(line number, parsed value) for each non-empty line of JSONL text; invalid JSON is a CrispEditError that
    names the file (`name`), the line and the column."""
    for lineno, line in enumerate(text.splitlines(), start=1):
        if not line.strip():
            continue
        try:
            yield lineno, json.loads(line)
        except json.JSONDecodeError as e:
            raise CrispEditError(f"{name}: line {lineno}: invalid JSON at column {e.colno}: {e.msg}") from e


def read_format_record(rec: Path, fmt: str) -> dict[str, Any]:
    """The JSON object in `rec` (a delta's, a cache's, a state's or a hypernetwork's record) whose field 'format'
    is `fmt`. One reader for every folder crispedit writes, so a damaged or foreign record gets the same one-line
    error naming the file and the field wherever it is loaded. The caller checks that `rec` exists (each kind of
    folder says in its own words what is missing) and what the version means for it."""
    try:
        record = json.loads(rec.read_text())
    except ValueError as e:
        raise CrispEditError(f"{rec}: invalid JSON ({e})") from None
    got = record.get("format") if isinstance(record, dict) else None
    if got != fmt:
        raise CrispEditError(f"{rec}: field 'format' is {got!r}, expected {fmt!r}")
    return record


def record_hash(record: dict[str, Any]) -> str:
    """sha256 of a folder's record without its own hash (canonical JSON): stored in `integrity.record_sha256`, it
    binds a delta's or a cache's record to its tensor files, so an edited record is refused on load."""
    rec = dict(record)
    integ = dict(rec.get("integrity") or {})
    integ.pop("record_sha256", None)
    rec["integrity"] = integ
    return sha256_json(rec)
