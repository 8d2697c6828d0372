"""Lesion masks (demo, data.json, reading) and the localisation metrics of the heat maps."""

import hashlib
import json
import os

import numpy as np
import pytest
import torch
from ignite.engine import Engine
from monai.bundle import ConfigParser
from monai.metrics import compute_roc_auc
from PIL import Image

from bundle.data import DatalistError, ImageCache, load_masks, load_medad_datalist, with_masks
from bundle.handlers.localisation import LocalisationHandler
from bundle.localisation import peak_in_lesion, pixel_auroc, region_dice, resize_mask, with_lesion_masks
from bundle.transforms import BadImageError

from .conftest import ROOT
from .test_bundle_e2e import EVAL, bundle_run

# sha256 of the decoded pixels of make_demo_dataset(seed=1, sizes=TINY_SIZES) as written by bundle 0.2.0, before
# the generator wrote masks: drawing the masks must not change the images.
TINY_DEMO_PIXELS = "150a6807aa0228d61c109ead1f1f1c3b1ce91f0808f0a619d7b57284ddf01c9b"


def test_demo_writes_masks_without_changing_the_images(tiny_dataset):
    images = os.path.join(tiny_dataset, "images")
    digest = hashlib.sha256()
    for name in sorted(os.listdir(images)):
        digest.update(name.encode())
        digest.update(np.asarray(Image.open(os.path.join(images, name))).tobytes())
    assert digest.hexdigest() == TINY_DEMO_PIXELS
    data = json.load(open(os.path.join(tiny_dataset, "data.json")))
    abnormal = data["train"]["unlabeled"]["1"] + data["val"]["1"] + data["test"]["1"]
    assert sorted(data["masks"]) == sorted(abnormal)  # every abnormal image, no normal one
    for name in abnormal:
        mask = np.asarray(Image.open(os.path.join(tiny_dataset, data["masks"][name])))
        assert mask.shape == (96, 96) and set(np.unique(mask)) == {0, 255}
        assert 30 < (mask > 0).sum() < 96 * 96 / 8  # a lesion, not the image
    assert load_masks(load_medad_datalist(tiny_dataset)) == {
        os.path.join(images, k): os.path.join(tiny_dataset, v) for k, v in data["masks"].items()
    }


def write_set(root, masks=None):
    (root / "images").mkdir(exist_ok=True)
    for name in ("n0.png", "n1.png", "a0.png"):
        Image.fromarray(np.zeros((8, 8), np.uint8)).save(root / "images" / name)
    data = {"train": {"0": ["n0.png", "n1.png"]}, "test": {"0": ["n1.png"], "1": ["a0.png"]}}
    if masks is not None:
        data["masks"] = masks
    (root / "data.json").write_text(json.dumps(data))
    return load_medad_datalist(str(root))


def test_masks_in_data_json(tmp_path):
    assert load_masks(write_set(tmp_path)) == {}  # optional: older data sets load as before
    (tmp_path / "masks").mkdir()
    Image.fromarray(np.zeros((8, 8), np.uint8)).save(tmp_path / "masks" / "a0.png")
    datalist = write_set(tmp_path, {"a0.png": "masks/a0.png"})
    masks = load_masks(datalist)
    assert masks == {str(tmp_path / "images" / "a0.png"): str(tmp_path / "masks" / "a0.png")}
    items = with_masks([{"image": str(tmp_path / "images" / f)} for f in ("n1.png", "a0.png")], masks)
    assert [i["mask"] for i in items] == ["", str(tmp_path / "masks" / "a0.png")]
    with pytest.raises(DatalistError, match="'masks' names 1 image.*a1.png"):
        load_masks(write_set(tmp_path, {"a1.png": "masks/a0.png"}))
    with pytest.raises(DatalistError, match="(?s)1 mask file.*not found.*masks/b.png"):
        load_masks(write_set(tmp_path, {"a0.png": "masks/b.png"}))
    with pytest.raises(DatalistError, match="key 'masks' must map image file names"):
        load_masks(write_set(tmp_path, ["masks/a0.png"]))


def test_pixel_auroc_is_monais_auc():
    gen = torch.Generator().manual_seed(0)
    masks = (torch.rand(3, 1, 16, 16, generator=gen) > 0.8).float()
    heat = torch.randint(0, 6, (3, 1, 16, 16), generator=gen).float() / 5 + 0.3 * masks  # many ties
    assert pixel_auroc(heat, masks) == pytest.approx(float(compute_roc_auc(heat.flatten(), masks.flatten())))
    assert pixel_auroc(masks, masks) == 1.0
    assert pixel_auroc(1 - masks, masks) == 0.0
    assert pixel_auroc(torch.ones_like(masks), masks) == 0.5
    assert np.isnan(pixel_auroc(heat, torch.ones_like(masks)))


def test_peak_in_lesion_uses_the_smoothed_peak():
    masks = torch.zeros(3, 1, 32, 32)
    masks[:, :, 10:20, 10:20] = 1
    heat = torch.zeros(3, 1, 32, 32)
    heat[0, 0, 15, 15] = 1.0  # peak inside
    heat[1, 0, 25, 25] = 1.0  # peak outside
    heat[2, 0, 14:17, 14:17] = 0.6  # a broad response inside ...
    heat[2, 0, 2, 28] = 1.0  # ... beats an isolated brighter pixel outside once smoothed
    assert peak_in_lesion(heat, masks).tolist() == [True, False, True]
    assert peak_in_lesion(heat[:, 0], masks[:, 0]).tolist() == [True, False, True]  # (N, H, W) too


def test_region_dice():
    masks = torch.zeros(2, 1, 32, 32)
    masks[:, :, 8:24, 4:14] = 1
    heat = masks.clone()
    heat[1] = 0
    assert region_dice(heat, masks, pixel_threshold=0.4).tolist() == pytest.approx([1.0, 0.0])


def test_resize_mask_by_area():
    mask = torch.zeros(1, 96, 96)
    mask[0, :48] = 255  # the first half along x
    assert torch.equal(resize_mask(mask, 64)[0, :32], torch.ones(32, 64))
    assert resize_mask(mask, 64)[0, 32:].sum() == 0
    speck = torch.zeros(1, 96, 96)
    speck[0, 40, 40] = 1  # under half of a 64x64 pixel: not lesion at the model grid
    assert resize_mask(speck, 64).sum() == 0
    block = torch.zeros(1, 96, 96)
    block[0, 30:33, 60:63] = 1  # exactly 2x2 pixels of the 64 grid
    out = resize_mask(block, 64)
    assert out.sum() == 4 and out[0, 20:22, 40:42].sum() == 4


@pytest.fixture(scope="module")
def preprocessing():
    parser = ConfigParser()
    parser.read_config(os.path.join(ROOT, "configs", "train.json"))
    return parser.get_parsed_content("preprocessing")


def test_masks_line_up_with_images(preprocessing, tmp_path):
    """An asymmetric lesion in a non-square image: after reading and resizing, the mask covers the bright
    lesion of the image, in MONAI's (x, y) order, and not its transpose."""
    image = np.full((90, 120), 40, np.uint8)  # 90 rows, 120 columns
    image[10:35, 70:110] = 220  # rows 10-34, columns 70-109: upper right, wide
    Image.fromarray(image).save(tmp_path / "image.png")
    Image.fromarray((image > 100).astype(np.uint8)).save(tmp_path / "mask.png")  # 0/1 masks are fine
    transform = with_lesion_masks(preprocessing, 64)
    out = transform({"image": str(tmp_path / "image.png"), "mask": str(tmp_path / "mask.png")})
    bright, mask = (out["image"][0] > 0).float(), out["mask"][0]
    assert out["has_mask"] == 1 and mask.shape == (64, 64) and out["image"].shape == (1, 64, 64)
    iou = (bright * mask).sum() / ((bright + mask) > 0).sum()
    assert iou > 0.9
    transposed = mask.T
    assert (bright * transposed).sum() / ((bright + transposed) > 0).sum() < 0.2
    xs, ys = torch.nonzero(mask, as_tuple=True)  # x: columns of the PNG, y: its rows
    assert 70 * 64 / 120 - 1 <= xs.min() and xs.max() <= 110 * 64 / 120 and 10 * 64 / 90 - 1 <= ys.min()
    none = transform({"image": str(tmp_path / "image.png"), "mask": ""})
    assert none["has_mask"] == 0 and none["mask"].sum() == 0
    Image.fromarray((image.T > 100).astype(np.uint8)).save(tmp_path / "wrong.png")
    with pytest.raises(BadImageError, match=r"wrong.png: lesion mask of shape \(90, 120\) does not match"):
        ImageCache([{"image": str(tmp_path / "image.png"), "mask": str(tmp_path / "wrong.png")}], transform)


def run_handler(cases, pixel_threshold=None):
    """Runs the handler over one batch of (label, has_mask, heat map, mask) cases."""
    batch = [{"mask": m, "has_mask": int(has)} for _, has, _, m in cases]
    output = [{"label": torch.tensor(label), "heatmap": h} for label, _, h, _ in cases]
    engine = Engine(lambda e, b: output)
    LocalisationHandler(pixel_threshold).attach(engine)
    engine.run([batch])
    return engine.state.metrics


def test_handler_reports_on_abnormal_images_with_masks():
    lesion = torch.zeros(1, 16, 16)
    lesion[0, 4:10, 4:10] = 1
    hit, miss = lesion * 0.8, torch.roll(lesion, 8, dims=2) * 0.8
    cases = [
        (1, True, hit, lesion),
        (1, True, hit, lesion),
        (1, True, miss, lesion),
        (1, False, miss, torch.zeros(1, 16, 16)),  # no mask: not counted
        (0, True, miss, lesion),  # normal: not counted
    ]
    metrics = run_handler(cases, pixel_threshold=0.3)
    heat, masks = torch.stack([hit, hit, miss]), torch.stack([lesion] * 3)
    assert metrics["n_lesion_masks"] == 3 and metrics["peak_in_lesion"] == pytest.approx(2 / 3)
    assert metrics["pixel_auroc"] == pytest.approx(pixel_auroc(heat, masks))
    assert metrics["region_dice"] == pytest.approx(float(np.mean(region_dice(heat, masks, 0.3))))
    assert "region_dice" not in run_handler(cases)  # no pixel threshold known
    assert "pixel_auroc" not in run_handler(cases[3:])  # no abnormal image with a mask: nothing added


def test_evaluating_reports_localisation(tiny_dataset, tmp_path):
    from bundle.networks import SAGANGenerator
    from bundle.settings import network_def_of

    torch.manual_seed(0)
    net = SAGANGenerator(conv_dim=4, num_res_blocks=1)
    settings = {"network_def": network_def_of(net), "image_size": 64, "threshold": 0.1, "pixel_threshold": 0.2}
    torch.save({"model": net.state_dict(), "settings": settings}, tmp_path / "model.pt")
    log = bundle_run(
        "evaluating",
        *EVAL,
        "--dataset_dir",
        tiny_dataset,
        "--model_path",
        str(tmp_path / "model.pt"),
        "--eval_dir",
        str(tmp_path / "eval"),
    )
    result = next(line for line in log.splitlines() if line.startswith("RESULT"))
    assert "pixel_auroc" in result and "peak_in_lesion" in result and "region_dice" in result
    metrics = json.load(open(tmp_path / "eval" / "metrics.json"))
    assert metrics["n_lesion_masks"] == 6 and 0 <= metrics["pixel_auroc"] <= 1 and 0 <= metrics["peak_in_lesion"] <= 1
