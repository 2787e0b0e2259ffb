"""LeNet-5 for the study: pretraining on the MNIST digits, a weight cache, and frozen features.

The network is LeNet-5 (conv 6@5×5 → pool → conv 16@5×5 → pool → fc 400→120 → fc 120→H → fc H→10, ReLU)
with the width H of the second fully connected layer as a parameter (84 in the original). The study
fine-tunes only the classifier head fc2+fc3 — a one-hidden-layer MLP on the frozen 120-dim features,
as in the paper — so the trunk's features are computed once per data set (`features`).
"""

from __future__ import annotations

import json
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
from torch import nn
from tqdm.auto import tqdm

from crispedit.errors import CrispEditError
from crispedit.io import atomic_path
from crispedit.study.data import Split, normalise, study_home


class Head(nn.Module):
    """fc2 (120→H) → ReLU → fc3 (H→10): the fine-tuned one-hidden-layer MLP."""

    def __init__(self, hidden: int, d_in: int = 120, classes: int = 10):
        super().__init__()
        self.fc2 = nn.Linear(d_in, hidden)
        self.fc3 = nn.Linear(hidden, classes)

    def forward(self, h: torch.Tensor) -> torch.Tensor:
        return self.fc3(torch.relu(self.fc2(h)))


class LeNet5(nn.Module):
    def __init__(self, hidden: int = 84):
        super().__init__()
        self.conv1 = nn.Conv2d(1, 6, 5, padding=2)
        self.conv2 = nn.Conv2d(6, 16, 5)
        self.fc1 = nn.Linear(400, 120)
        self.head = Head(hidden)

    def trunk(self, x: torch.Tensor) -> torch.Tensor:
        """(N, 1, 28, 28) normalised images → (N, 120) post-ReLU features of fc1."""
        x = torch.max_pool2d(torch.relu(self.conv1(x)), 2)
        x = torch.max_pool2d(torch.relu(self.conv2(x)), 2)
        return torch.relu(self.fc1(x.flatten(1)))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.trunk(x))


@dataclass(frozen=True)
class PretrainConfig:
    hidden: int = 84
    epochs: int = 20
    batch_size: int = 128
    lr: float = 2e-3
    shift: int = 1  # random translation of up to ±shift pixels (augmentation; the data set is only 10k)
    seed: int = 0

    def cache_name(self) -> str:
        return f"lenet5-h{self.hidden}-e{self.epochs}-b{self.batch_size}-lr{self.lr:g}-sh{self.shift}-s{self.seed}"


def _shift_batch(x: torch.Tensor, shift: int, gen: torch.Generator) -> torch.Tensor:
    """Translate each image by its own random (dy, dx) ∈ [-shift, shift]², filling with the background."""
    if shift <= 0:
        return x
    n, _, h, w = x.shape
    bg = float(x.min())
    pad = torch.nn.functional.pad(x, (shift, shift, shift, shift), value=bg)
    dy = torch.randint(0, 2 * shift + 1, (n,), generator=gen)
    dx = torch.randint(0, 2 * shift + 1, (n,), generator=gen)
    rows = (dy[:, None] + torch.arange(h)[None, :])[:, :, None]
    cols = (dx[:, None] + torch.arange(w)[None, :])[:, None, :]
    return pad[torch.arange(n)[:, None, None], 0, rows, cols].unsqueeze(1)


@torch.no_grad()
def accuracy(model: nn.Module, x: torch.Tensor, y: torch.Tensor, batch: int = 2000) -> float:
    was = model.training
    model.eval()
    correct = sum(int((model(x[i:i + batch]).argmax(-1) == y[i:i + batch]).sum()) for i in range(0, len(y), batch))
    model.train(was)
    return correct / max(len(y), 1)


def pretrain(train: Split, test: Split, cfg: PretrainConfig, progress: bool = True) -> tuple[LeNet5, dict]:
    """Train LeNet-5 on `train` with Adam (deterministic given cfg.seed); returns the model and a report."""
    torch.manual_seed(cfg.seed)
    gen = torch.Generator().manual_seed(cfg.seed)
    model = LeNet5(cfg.hidden)
    opt = torch.optim.Adam(model.parameters(), lr=cfg.lr)
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=cfg.epochs)
    x, y = normalise(train.images), train.labels
    t0 = time.perf_counter()
    bar = tqdm(range(cfg.epochs), desc="pretrain LeNet-5 on MNIST", disable=not progress)
    for _ in bar:
        perm = torch.randperm(len(y), generator=gen)
        for i in range(0, len(y), cfg.batch_size):
            idx = perm[i:i + cfg.batch_size]
            loss = nn.functional.cross_entropy(model(_shift_batch(x[idx], cfg.shift, gen)), y[idx])
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
        sched.step()
        bar.set_postfix(loss=float(loss.detach()))
    model.eval()
    report = {"test_acc": accuracy(model, normalise(test.images), test.labels),
              "train_acc": accuracy(model, x, y), "seconds": time.perf_counter() - t0, "config": asdict(cfg)}
    return model, report


def cache_paths(cfg: PretrainConfig, folder: Path | None = None) -> tuple[Path, Path]:
    folder = Path(folder) if folder is not None else study_home() / "models"
    return folder / f"{cfg.cache_name()}.safetensors", folder / f"{cfg.cache_name()}.json"


def load_or_pretrain(train: Split, test: Split, cfg: PretrainConfig, folder: Path | None = None,
                     progress: bool = True, min_test_acc: float | None = None) -> tuple[LeNet5, dict]:
    """The cached pretrained LeNet-5 for `cfg` (safetensors + JSON report), trained and cached if absent."""
    from safetensors.torch import load_file, save_file

    wpath, rpath = cache_paths(cfg, folder)
    if wpath.is_file() and rpath.is_file():
        model = LeNet5(cfg.hidden)
        try:
            model.load_state_dict(load_file(str(wpath)))
            report = json.loads(rpath.read_text())
        except Exception as e:  # noqa: BLE001 - a broken cache is rebuilt, never trusted
            tqdm.write(f"ignoring unreadable LeNet-5 cache {wpath}: {e}")
        else:
            report["cached"] = True
            model.eval()
            return model, report
    model, report = pretrain(train, test, cfg, progress)
    if min_test_acc is not None and report["test_acc"] < min_test_acc:
        raise CrispEditError(f"pretrained LeNet-5 reached only {report['test_acc']:.4f} MNIST test accuracy "
                             f"(< {min_test_acc}); config {asdict(cfg)}")
    with atomic_path(wpath) as tmp:
        save_file({k: v.contiguous() for k, v in model.state_dict().items()}, str(tmp))
    with atomic_path(rpath) as tmp:
        tmp.write_text(json.dumps(report, indent=2) + "\n")
    report["cached"] = False
    return model, report


@torch.no_grad()
def features(model: LeNet5, images: torch.Tensor, batch: int = 2000) -> torch.Tensor:
    """Frozen trunk features (N, 120) of uint8 images."""
    model.eval()
    return torch.cat([model.trunk(normalise(images[i:i + batch])) for i in range(0, len(images), batch)])
