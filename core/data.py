"""Evaluation and calibration data.

* ``cifar10``: ``shared/data/cifar10`` (all 10,000 test images; calibration = the first N of the
  1,024 pre-shuffled training images in ``calib.npz``) or, when that folder is absent, the
  package's embedded slice (the first 1,000 test and first 256 calibration images).
* an ImageNet-style folder (``ImageFolder`` layout): the model's timm eval transform; a seeded
  random subset of ``calib_images`` images calibrates and the remaining images evaluate (so the
  two never overlap). The folder is checked before any work: an empty folder, a class folder
  without images, or an image whose header cannot be read is a ``ConfigError`` naming the
  folder or the file (a file damaged past its header is named when it is decoded).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Iterator

import numpy as np
import timm.data
import torch
from PIL import Image

from .errors import ConfigError
from .models import ASSETS, ModelInfo, shared_dir

EMBEDDED_TEST = ASSETS / "cifar10_test_first1000.npz"
EMBEDDED_CALIB = ASSETS / "cifar10_calib_first256.npz"


@dataclass
class EvalData:
    """Calibration images and an evaluation set, already normalised for the model."""

    name: str
    calib: torch.Tensor  # [N, C, H, W]
    test_batches: "callable"  # () -> iterator of (images, labels)
    test_count: int
    source: str


def _normalise(images_nhwc: np.ndarray, mean, std) -> torch.Tensor:
    x = torch.from_numpy(np.ascontiguousarray(images_nhwc)).permute(0, 3, 1, 2).float() / 255
    return (x - torch.tensor(mean).view(1, -1, 1, 1)) / torch.tensor(std).view(1, -1, 1, 1)


def cifar10_paths(embedded: bool = False) -> tuple[Path, Path, str]:
    shared = None if embedded else shared_dir()
    if shared is not None and (shared / "data" / "cifar10" / "test.npz").exists():
        d = shared / "data" / "cifar10"
        return d / "test.npz", d / "calib.npz", str(d)
    return EMBEDDED_TEST, EMBEDDED_CALIB, "embedded (first 1,000 test / 256 calibration images)"


def load_cifar10(info: ModelInfo, *, calib_images: int, limit: int | None = None, batch_size: int = 200,
                 embedded: bool = False) -> EvalData:
    test_p, calib_p, source = cifar10_paths(embedded)
    test = np.load(test_p)
    calib = np.load(calib_p)
    n_cal = len(calib["labels"])
    if calib_images > n_cal:
        raise ConfigError(f"--calib-images {calib_images} exceeds the {n_cal} calibration images available in {source}")
    n = len(test["labels"]) if limit is None else min(limit, len(test["labels"]))
    x = _normalise(test["images"][:n], info.mean, info.std)
    y = torch.from_numpy(test["labels"][:n].astype(np.int64))
    xc = _normalise(calib["images"][:calib_images], info.mean, info.std)

    def batches() -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        for i in range(0, n, batch_size):
            yield x[i:i + batch_size], y[i:i + batch_size]

    return EvalData("cifar10", xc, batches, n, source)


def _image_loader(root: Path):
    """torchvision's image loader, with a file that cannot be decoded named instead of a bare PIL error."""
    from torchvision.datasets.folder import default_loader

    def load(p: str):
        try:
            return default_loader(p)
        except (OSError, ValueError, SyntaxError) as e:  # PIL's UnidentifiedImageError is an OSError
            raise ConfigError(f"--data {root}: cannot read image '{p}' ({type(e).__name__}: {e}); "
                              f"remove or replace the file") from None

    return load


def _check_image_headers(root: Path, files: list[str]) -> None:
    """Open every file's header (cheap: no decoding) so that a corrupt image fails before calibration."""
    bad = []
    for f in files:
        try:
            with Image.open(f) as im:
                im.size  # noqa: B018  (the header is parsed)
        except (OSError, ValueError, SyntaxError) as e:
            bad.append(f"'{f}' ({type(e).__name__}: {e})")
    if bad:
        raise ConfigError(f"--data {root}: {len(bad)} of the {len(files)} images it would use cannot be read: "
                          + "; ".join(bad[:3]) + (" ..." if len(bad) > 3 else "") + ". Remove or replace them.")


def load_image_folder(info: ModelInfo, path: str | Path, *, calib_images: int, limit: int | None = None,
                      batch_size: int = 50, seed: int = 0) -> EvalData:
    # torchvision is imported only for ImageFolder data (heavy, and unused by the CIFAR path)
    from torchvision.datasets import ImageFolder
    from torchvision.datasets.folder import IMG_EXTENSIONS

    path = Path(path)
    if not path.is_dir():
        raise ConfigError(f"--data {path}: not a folder (use 'cifar10' or an ImageFolder-style folder of class subfolders)")
    cfg = info.data_config or {"input_size": info.input_size, "mean": info.mean, "std": info.std,
                               "interpolation": "bicubic", "crop_pct": 0.875}
    try:
        ds = ImageFolder(str(path), transform=timm.data.create_transform(**cfg), loader=_image_loader(path))
    except FileNotFoundError as e:  # no class folder, or a class folder without images
        raise ConfigError(f"--data {path}: {e} An ImageFolder holds {path}/<class>/<image> files "
                          f"({', '.join(IMG_EXTENSIONS)}); or use --data cifar10") from None
    if len(ds.classes) != info.num_classes:
        raise ConfigError(f"--data {path} has {len(ds.classes)} classes but the model predicts {info.num_classes}")
    order = torch.randperm(len(ds), generator=torch.Generator().manual_seed(seed)).tolist()
    if calib_images >= len(ds):
        raise ConfigError(f"--calib-images {calib_images} leaves no evaluation images in {path} ({len(ds)} images)")
    cal_idx, test_idx = order[:calib_images], sorted(order[calib_images:])
    if limit is not None:
        test_idx = test_idx[:limit]
    _check_image_headers(path, [ds.samples[i][0] for i in sorted(cal_idx + test_idx)])
    calib = torch.stack([ds[i][0] for i in cal_idx]) if cal_idx else torch.empty(0, *info.input_size)
    sub = torch.utils.data.Subset(ds, test_idx)

    def batches():
        yield from torch.utils.data.DataLoader(sub, batch_size=batch_size, shuffle=False, num_workers=0)

    return EvalData(str(path), calib, batches, len(test_idx), str(path.resolve()))


def load_data(info: ModelInfo, data: str | None, *, calib_images: int, limit: int | None = None, seed: int = 0,
              batch_size: int = 200) -> EvalData:
    """Data for ``info``: ``data`` is ``"cifar10"``, a folder, or None (the model's default)."""
    if calib_images < 0 or (limit is not None and limit < 0):
        raise ConfigError(f"calib_images and limit must be >= 0 (limit None: every test image); got {calib_images} and {limit}")
    if data is None:
        if info.dataset == "cifar10":
            data = "cifar10"
        elif info.dataset == "imagenet" and shared_dir() and (shared_dir() / "data" / "imagenet-sample" / "val").is_dir():
            data = str(shared_dir() / "data" / "imagenet-sample" / "val")
        else:
            raise ConfigError(f"no default data for model '{info.spec}'; pass --data cifar10 or --data <ImageFolder>")
    if data == "cifar10":
        if info.num_classes != 10:
            raise ConfigError(f"model '{info.spec}' predicts {info.num_classes} classes; CIFAR-10 has 10")
        return load_cifar10(info, calib_images=calib_images, limit=limit, batch_size=batch_size, embedded=info.spec == "embedded")
    return load_image_folder(info, data, calib_images=calib_images, limit=limit, seed=seed, batch_size=min(batch_size, 50))


# ---------------------------------------------------------------------------------------------
# Few-shot fine-tuning tasks (VTAB-1k protocol: train800val200, evaluation on the full test set)
# ---------------------------------------------------------------------------------------------

TASKS = ("cifar10", "rotation")


@dataclass
class FewShotTask:
    """A labelled few-shot task, normalised for the model: ``train``/``val`` ``(images, labels)``
    from CIFAR-10's labelled training images (``calib.npz``), ``test`` from its test set."""

    name: str
    num_classes: int
    train: tuple[torch.Tensor, torch.Tensor]
    val: tuple[torch.Tensor, torch.Tensor]
    test: tuple[torch.Tensor, torch.Tensor]
    source: str


def rotate_task(images: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """4-way rotation prediction: image ``i`` turned by ``(i mod 4)·90°`` counter-clockwise
    (``torch.rot90`` over H, W: exact), label ``i mod 4``. The CIFAR files are pre-shuffled, so
    the rotation is independent of the class; the four labels are balanced."""
    labels = torch.arange(images.shape[0]) % 4
    out = images.clone()
    for k in range(1, 4):
        idx = labels == k
        out[idx] = torch.rot90(images[idx], k, dims=(2, 3))
    return out, labels


def load_fewshot(info: ModelInfo, task: str, *, train: int = 800, val: int = 200, test: int | None = None,
                 embedded: bool = False) -> FewShotTask:
    """VTAB-1k-style split of CIFAR-10 for ``task`` (``cifar10``: the 10 classes; ``rotation``:
    4-way rotation of the same images): ``train`` then ``val`` images from the pre-shuffled labelled
    training images, ``test`` (default all) test images."""
    if task not in TASKS:
        raise ConfigError(f"unknown task {task!r}; tasks: {list(TASKS)}")
    if tuple(info.input_size[1:]) != (32, 32):
        raise ConfigError(f"the few-shot tasks are built from 32x32 CIFAR-10 images; model '{info.spec}' takes "
                          f"{info.input_size[1]}x{info.input_size[2]}")
    test_p, calib_p, source = cifar10_paths(embedded)
    lab, tst = np.load(calib_p), np.load(test_p)
    if train < 1 or val < 0 or train + val > len(lab["labels"]):
        raise ConfigError(f"--train-images {train} + --val-images {val} exceed the {len(lab['labels'])} labelled training "
                          f"images in {source}")
    n_test = len(tst["labels"]) if test is None else min(test, len(tst["labels"]))
    xs = _normalise(lab["images"][:train + val], info.mean, info.std)
    ys = torch.from_numpy(lab["labels"][:train + val].astype(np.int64))
    xt = _normalise(tst["images"][:n_test], info.mean, info.std)
    yt = torch.from_numpy(tst["labels"][:n_test].astype(np.int64))
    classes = 10
    if task == "rotation":
        (xs, ys), (xt, yt), classes = rotate_task(xs), rotate_task(xt), 4
    return FewShotTask(task, classes, (xs[:train], ys[:train]), (xs[train:], ys[train:]), (xt, yt), source)
