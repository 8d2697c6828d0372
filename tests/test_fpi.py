import numpy as np
import pytest
import torch
from monai.utils import set_determinism

from bundle.data import ImageCache, SAGANTrainingDataset
from bundle.transforms import ForeignPatchInterpolationd, RandForeignPatchInterpolation, RandForeignPatchInterpolationd


def make_item():
    return {"normal": torch.rand(1, 64, 64) * 2 - 1, "donor": torch.rand(1, 64, 64) * 2 - 1}


def test_ranges_and_blend():
    t = RandForeignPatchInterpolationd(keys="normal").set_random_state(0)
    centres, widths, alphas = [], [], []
    for _ in range(400):
        item = make_item()
        out = t(item)
        mask = out["pseudo_mask"].bool()
        (cy, cx), r, a = t.centre, t.half_width, t.alpha
        centres += [cy, cx]
        widths.append(r)
        alphas.append(a)
        assert torch.equal(out["pseudo"][~mask], item["normal"][~mask])  # outside unchanged
        expected = (1 - a) * item["normal"] + a * item["donor"]
        assert torch.allclose(out["pseudo"][mask], expected[mask], atol=1e-6)
        assert mask.sum() == (2 * r) ** 2  # centres 12..50 and half-widths <= 12 keep the patch inside
    assert min(centres) == 12 and max(centres) == 50
    assert min(widths) == 3 and max(widths) == 12
    assert 0 <= min(alphas) and max(alphas) < 1 and np.std(alphas) > 0.2


def test_reproducible_with_random_state():
    item = make_item()
    a = RandForeignPatchInterpolationd(keys="normal").set_random_state(7)(item)["pseudo"]
    b = RandForeignPatchInterpolationd(keys="normal").set_random_state(7)(item)["pseudo"]
    c = RandForeignPatchInterpolationd(keys="normal").set_random_state(8)(item)["pseudo"]
    assert torch.equal(a, b) and not torch.equal(a, c)


def test_donor_differs_from_image_and_is_reproducible():
    images = [{"image": torch.full((1, 8, 8), float(i))} for i in range(5)]
    normal = ImageCache(images, transform=lambda d: d)
    ds = SAGANTrainingDataset(normal, None, RandForeignPatchInterpolationd(keys="normal"))
    ds.set_random_state(3)
    draws = []
    for _ in range(20):
        for i in range(len(ds)):
            item = ds[i]
            assert item["normal"][0, 0, 0] == i and item["donor"][0, 0, 0] != i
            draws.append(int(item["donor"][0, 0, 0]))
    assert set(draws) == set(range(5))
    set_determinism(seed=0)
    ds.set_random_state(3)
    assert [int(ds[i]["donor"][0, 0, 0]) for i in range(5)] == draws[:5]


def test_array_version_and_prob():
    item = make_item()
    dict_out = RandForeignPatchInterpolationd(keys="normal").set_random_state(3)(item)
    pseudo, mask = RandForeignPatchInterpolation().set_random_state(3)(item["normal"], item["donor"])
    assert torch.equal(pseudo, dict_out["pseudo"]) and torch.equal(mask, dict_out["pseudo_mask"])
    never = RandForeignPatchInterpolationd(keys="normal", prob=0.0).set_random_state(3)(item)
    assert torch.equal(never["pseudo"], item["normal"]) and never["pseudo_mask"].sum() == 0
    half = RandForeignPatchInterpolationd(keys="normal", prob=0.5).set_random_state(0)
    applied = [half(make_item())["pseudo_mask"].sum() > 0 for _ in range(200)]
    assert 0.35 < np.mean(applied) < 0.65


def test_old_name_is_a_deprecated_alias():
    with pytest.warns(FutureWarning, match="RandForeignPatchInterpolationd"):
        old = ForeignPatchInterpolationd(keys="normal")
    assert isinstance(old, RandForeignPatchInterpolationd)
