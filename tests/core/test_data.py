"""ImageFolder data is checked before any work: empty folders, class folders without images and
corrupt images are named (``fxquant.core.data``)."""

from __future__ import annotations

import numpy as np
import pytest
from PIL import Image

from fxquant.core.data import load_data
from fxquant.core.errors import ConfigError
from fxquant.core.models import load_model


@pytest.fixture(scope="module")
def info():
    return load_model("embedded")


def _image_folder(root, classes: int = 10, per_class: int = 2):
    rng = np.random.default_rng(0)
    for c in range(classes):
        (root / f"c{c}").mkdir(parents=True)
        for i in range(per_class):
            Image.fromarray(rng.integers(0, 255, (32, 32, 3), dtype=np.uint8)).save(root / f"c{c}" / f"{i}.png")
    return root


def test_a_good_folder_loads(tmp_path, info):
    data = load_data(info, str(_image_folder(tmp_path / "d")), calib_images=4)
    assert data.calib.shape == (4, 3, 32, 32) and data.test_count == 16
    assert sum(len(y) for _, y in data.test_batches()) == 16


def test_an_empty_folder_and_an_empty_class_are_named(tmp_path, info):
    (tmp_path / "empty").mkdir()
    with pytest.raises(ConfigError, match=r"--data .*/empty: Couldn't find any class folder .*An ImageFolder holds "
                                          r".*/empty/<class>/<image> files \(.jpg, .jpeg, .png"):
        load_data(info, str(tmp_path / "empty"), calib_images=4)
    d = _image_folder(tmp_path / "d")
    (d / "c10").mkdir()
    with pytest.raises(ConfigError, match=r"--data .*/d: Found no valid file for the classes c10"):
        load_data(info, str(d), calib_images=4)


def test_a_corrupt_image_is_named_before_calibration(tmp_path, info):
    d = _image_folder(tmp_path / "d")
    (d / "c3" / "bad.jpg").write_bytes(b"not an image")
    with pytest.raises(ConfigError, match=r"--data .*/d: 1 of the 21 images it would use cannot be read: '.*/c3/bad.jpg' "
                                          r"\(UnidentifiedImageError: .*\)\. Remove or replace them\."):
        load_data(info, str(d), calib_images=4)


def test_an_image_damaged_past_its_header_is_named_when_decoded(tmp_path, info):
    d = _image_folder(tmp_path / "d")
    good = (d / "c0" / "0.png").read_bytes()
    (d / "c0" / "cut.png").write_bytes(good[:200])  # the header parses, the pixels are missing
    with pytest.raises(ConfigError, match=r"--data .*/d: cannot read image '.*/c0/cut.png' \(.*\); remove or replace the file"):
        data = load_data(info, str(d), calib_images=20)
        for _ in data.test_batches():
            pass


def test_negative_counts_are_refused(info):
    with pytest.raises(ConfigError, match=r"calib_images and limit must be >= 0 .*got -1 and None"):
        load_data(info, "cifar10", calib_images=-1)
    with pytest.raises(ConfigError, match=r"got 4 and -5"):
        load_data(info, "cifar10", calib_images=4, limit=-5)
