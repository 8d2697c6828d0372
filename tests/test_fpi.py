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


def test_prob_is_the_dictionary_transforms():
    """The dictionary transform owns ``prob`` (MONAI's way): ``prob=0`` (also set after construction) never pastes,
    ``prob=1`` always pastes, and the patches it pastes are the array transform's draws from the same seed, whatever
    the paste decisions (drawn from a stream of their own; none at ``prob=1``, the training stream)."""
    never = RandForeignPatchInterpolationd(keys="normal", prob=0.0).set_random_state(3)
    switched_off = RandForeignPatchInterpolationd(keys="normal", prob=1.0).set_random_state(3)
    switched_off.prob = 0.0
    always = RandForeignPatchInterpolationd(keys="normal", prob=1.0).set_random_state(3)
    half = RandForeignPatchInterpolationd(keys="normal", prob=0.5).set_random_state(3)
    array, array_for_half = (RandForeignPatchInterpolation().set_random_state(3) for _ in range(2))
    pasted_by_half = 0
    for _ in range(100):
        item = make_item()
        for t in (never, switched_off):
            out = t(item)
            assert torch.equal(out["pseudo"], item["normal"]) and not out["pseudo_mask"].any()
        out = always(item)
        pseudo, mask = array(item["normal"], item["donor"])
        assert mask.any() and torch.equal(out["pseudo"], pseudo) and torch.equal(out["pseudo_mask"], mask)
        out = half(item)
        if out["pseudo_mask"].any():
            pasted_by_half += 1
            pseudo, mask = array_for_half(item["normal"], item["donor"])
            assert torch.equal(out["pseudo"], pseudo) and torch.equal(out["pseudo_mask"], mask)
    assert 30 < pasted_by_half < 70


def test_randomize_false_repeats_the_last_draw():
    t = RandForeignPatchInterpolationd(keys="normal", prob=0.5).set_random_state(0)
    for _ in range(20):
        item = make_item()
        first = t(item)
        again = t(item, randomize=False)
        assert torch.equal(first["pseudo"], again["pseudo"]) and torch.equal(first["pseudo_mask"], again["pseudo_mask"])


def test_old_name_is_a_deprecated_alias():
    with pytest.warns(FutureWarning, match="RandForeignPatchInterpolationd"):
        old = ForeignPatchInterpolationd(keys="normal")
    assert isinstance(old, RandForeignPatchInterpolationd)
