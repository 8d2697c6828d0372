import json
import logging
import os

import pytest
import torch

from bundle.data import DatalistError, ImageCache, labelled_items, list_images, load_medad_datalist, select_unlabeled
from bundle.transforms import BadImageError, LoadGrayscaleImaged

from .conftest import TINY_SIZES, requires_shared_data


def write_set(root, data, files=()):
    os.makedirs(os.path.join(root, "images"), exist_ok=True)
    for f in files:
        open(os.path.join(root, "images", f), "wb").close()
    with open(os.path.join(root, "data.json"), "w") as fh:
        fh.write(data if isinstance(data, str) else json.dumps(data))
    return str(root)


def test_parse_tiny_set(tiny_dataset):
    dl = load_medad_datalist(tiny_dataset)
    assert len(dl.normal) == TINY_SIZES["train"][0]
    assert (len(dl.unlabeled_normal), len(dl.unlabeled_abnormal)) == TINY_SIZES["unlabeled"]
    assert len(dl.val[0]) == 6 and len(dl.test[1]) == 6
    items = labelled_items(dl, "test")
    assert [it["label"] for it in items].count(1) == 6 and all(os.path.isfile(it["image"]) for it in items)


def test_without_val(tmp_path):
    root = write_set(
        tmp_path, {"train": {"0": ["a.png", "b.png"]}, "test": {"0": ["a.png"], "1": ["b.png"]}}, ["a.png", "b.png"]
    )
    dl = load_medad_datalist(root)
    assert dl.val == {} and dl.unlabeled_abnormal == []
    with pytest.raises(DatalistError, match="no 'val' split"):
        labelled_items(dl, "val")


@pytest.mark.parametrize("ratio,size,expect_abnormal", [(0.6, None, 7), (0.0, 8, 0), (0.8, 10, 8), (0.5, 5, 2)])
def test_anomaly_ratio_selection(tiny_dataset, ratio, size, expect_abnormal):
    dl = load_medad_datalist(tiny_dataset)
    chosen = select_unlabeled(dl, ratio, size, seed=0)
    n = size if size is not None else len(dl.normal)  # 12 normal -> floor(0.6 * 12) = 7
    assert len(chosen) == n and len(set(chosen)) == n
    assert sum(f in dl.unlabeled_abnormal for f in chosen) == expect_abnormal
    assert select_unlabeled(dl, ratio, size, seed=0) == chosen
    assert select_unlabeled(dl, 0.6, 0) == []  # the paper's "0_u"


def test_anomaly_ratio_errors(tiny_dataset):
    dl = load_medad_datalist(tiny_dataset)
    with pytest.raises(DatalistError, match=r"'train/unlabeled/1' has 12 images; 18 are needed"):
        select_unlabeled(dl, 0.9, 20)
    with pytest.raises(DatalistError, match="anomaly_ratio"):
        select_unlabeled(dl, 1.5)


@pytest.mark.parametrize(
    "data,files,message",
    [
        (None, (), "data.json: not found"),
        ("{not json", (), "not valid JSON"),
        ("", (), "not valid JSON"),
        ({"test": {}}, (), "'train/0'"),
        ({"train": {"0": []}}, (), "'train/0' is empty"),
        ({"train": {"0": "a.png"}}, (), "must be a list"),
        ({"train": {"0": ["a.png"], "unlabeled": {"0": []}}}, ["a.png"], "'train/unlabeled' must hold"),
        ({"train": {"0": ["a.png", "gone.png"]}}, ["a.png"], r"1 listed image\(s\) not found:\n  .*gone.png"),
    ],
)
def test_bad_datalists(tmp_path, data, files, message):
    root = str(tmp_path) if data is None else write_set(tmp_path, data, files)
    with pytest.raises(DatalistError, match=message):
        load_medad_datalist(root)


def test_one_class_split(tmp_path):
    root = write_set(tmp_path, {"train": {"0": ["a.png"]}, "test": {"0": ["a.png"], "1": []}}, ["a.png"])
    with pytest.raises(DatalistError, match="'test/1' is empty"):
        labelled_items(load_medad_datalist(root), "test")


def test_image_cache_names_bad_file_or_skips(tiny_dataset, tmp_path, caplog):
    good = load_medad_datalist(tiny_dataset).normal[:3]
    bad = tmp_path / "broken.png"
    bad.write_bytes(b"\x89PNG\r\n\x1a\n garbage")
    items = [{"image": f} for f in good] + [{"image": str(bad)}]
    with pytest.raises(BadImageError, match="broken.png: cannot read image"):
        ImageCache(items, LoadGrayscaleImaged("image"))
    with caplog.at_level(logging.WARNING):
        cache = ImageCache(items, LoadGrayscaleImaged("image"), on_bad_image="skip")
    assert len(cache) == 3 and "broken.png" in caplog.text
    assert cache[0]["image"].shape == (1, 96, 96)


def test_preprocessing_failure_names_the_file(tiny_dataset):
    from monai.transforms import Compose, Lambdad

    f = load_medad_datalist(tiny_dataset).normal[0]
    broken = Compose([LoadGrayscaleImaged("image"), Lambdad("image", lambda x: x.reshape(7, -1, 5))])
    with pytest.raises(BadImageError, match=os.path.basename(f) + ": preprocessing failed"):
        ImageCache([{"image": f}], broken)


def test_list_images(tiny_dataset, tmp_path):
    items = list_images(os.path.join(tiny_dataset, "images"))
    assert len(items) == sum(a + b for a, b in TINY_SIZES.values())
    with pytest.raises(DatalistError, match="no images with a supported suffix"):
        list_images(str(tmp_path))
    with pytest.raises(DatalistError, match="no such file or folder"):
        list_images(str(tmp_path / "nothing"))


@requires_shared_data("kermany_pneumonia")
def test_shared_kermany_layout():
    from .conftest import SHARED_DATA

    dl = load_medad_datalist(os.path.join(SHARED_DATA, "kermany_pneumonia"))
    assert len(dl.normal) == 620 and len(dl.val[0]) == 100 and len(dl.test[1]) == 231
    assert len(select_unlabeled(dl)) == 620


def test_display_batch_takes_first_images_of_each_class():
    from bundle.data import display_batch

    items = [{"image": torch.full((1, 4, 4), float(i)), "label": int(i >= 5)} for i in range(10)]
    batch = display_batch(ImageCache(items, transform=lambda d: d), per_class=2)
    assert batch.shape == (4, 1, 4, 4) and batch[:, 0, 0, 0].tolist() == [0.0, 1.0, 5.0, 6.0]
