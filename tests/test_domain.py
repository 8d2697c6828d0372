"""In-domain check (bundle.domain): distance formula, settings round trip, separation on obvious shifts."""

import json
import os

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image

from bundle.demo import make_demo_dataset
from bundle.domain import NUM_FEATURES, DomainDescriptor, bottleneck_features, domain_features, ledoit_wolf_covariance
from bundle.networks import SAGANGenerator
from bundle.settings import model_file_contents, read_model

SIZES = {"train": (80, 0), "unlabeled": (0, 0), "val": (0, 0), "test": (30, 30)}


@pytest.fixture(scope="module")
def demo_images(tmp_path_factory):
    """{"train": (80, 1, 64, 64), "test0": (30, ...), "test1": (30, ...)} demo images in [-1, 1]."""
    root = make_demo_dataset(str(tmp_path_factory.mktemp("domain_demo")), seed=3, sizes=SIZES)
    out = {}
    for key, prefix in (("train", "train_0_"), ("test0", "test_0_"), ("test1", "test_1_")):
        files = sorted(f for f in os.listdir(os.path.join(root, "images")) if f.startswith(prefix))
        x = torch.stack(
            [torch.from_numpy(np.asarray(Image.open(os.path.join(root, "images", f)), np.float32)) for f in files]
        )
        x = F.interpolate(x[:, None] / 255.0, size=(64, 64), mode="bilinear", antialias=True)
        out[key] = x * 2 - 1
    return out


@pytest.fixture(scope="module")
def fitted(demo_images):
    descriptor = DomainDescriptor()
    descriptor.fit(domain_features(demo_images["train"]), quantile=0.99)
    return descriptor


def test_distance_formula_on_a_hand_made_case():
    descriptor = DomainDescriptor.from_settings(
        {"mean": [1.0, 2.0], "scale": [1.0, 2.0], "precision": [[2.0, 0.5], [0.5, 0.5]], "threshold": 3.0}
    )
    # z = ((2 - 1) / 1, (4 - 2) / 2) = (1, 1): z P z = 2 + 0.5 + 0.5 + 0.5 = 3.5
    # z = ((1 - 1) / 1, (0 - 2) / 2) = (0, -1): 0.5
    features = torch.tensor([[2.0, 4.0], [1.0, 0.0], [float("nan"), 0.0]])
    d = descriptor.distance(features)
    assert d[:2].tolist() == pytest.approx([3.5, 0.5])
    assert descriptor.in_domain(features).tolist() == [False, True, False]


def test_fitted_distance_is_the_mahalanobis_distance_of_the_shrunk_covariance():
    g = torch.Generator().manual_seed(0)
    x = torch.randn(200, 3, generator=g, dtype=torch.float64) @ torch.tensor(
        [[1.0, 0.8, 0.0], [0.0, 0.6, 0.0], [0.0, 0.0, 3.0]], dtype=torch.float64
    ) + torch.tensor([5.0, -1.0, 2.0], dtype=torch.float64)
    descriptor = DomainDescriptor()
    descriptor.fit(x)
    z = (x - x.mean(0)) / x.std(0)
    cov, s = ledoit_wolf_covariance(z)
    # Ledoit-Wolf: a convex mix of the sample covariance and a scaled identity of the same trace
    emp = z.T @ z / len(z)
    assert 0.0 <= s <= 1.0
    assert torch.allclose(cov, (1 - s) * emp + s * torch.trace(emp) / 3 * torch.eye(3, dtype=z.dtype))
    q = torch.tensor([[6.0, 0.0, -4.0]], dtype=torch.float64)
    zq = (q - x.mean(0)) / x.std(0)
    expected = (zq @ torch.linalg.inv(cov) @ zq.T).item()
    assert descriptor.distance(q).item() == pytest.approx(expected, rel=1e-6)
    # strongly correlated features, many samples: little shrinkage; isotropic ones: much more
    assert s < 0.1
    assert ledoit_wolf_covariance(torch.randn(200, 3, generator=g, dtype=torch.float64))[1] > 0.5


def test_features_shape_and_values():
    x = torch.rand(5, 1, 64, 64) * 2 - 1
    f = domain_features(x)
    assert f.shape == (5, NUM_FEATURES) and f.dtype == torch.float32
    assert torch.allclose(f[:, 0], x.mean((1, 2, 3)), atol=1e-5)  # the first DCT coefficient is the mean
    assert torch.allclose(f[:, -1], x.reshape(5, -1).median(1).values)
    with pytest.raises(ValueError, match="B, C, H, W"):
        domain_features(x[0])


def test_settings_round_trip_through_a_model_file(fitted, demo_images, tmp_path):
    stored = json.loads(json.dumps(fitted.to_settings()))  # plain JSON-able values
    numbers = len(stored["mean"]) + len(stored["scale"]) + sum(len(r) for r in stored["precision"])
    assert numbers <= 1000
    path = str(tmp_path / "model.pt")
    torch.save(model_file_contents({"w": torch.zeros(1)}, {"domain": stored}), path)
    _, settings = read_model(path)
    again = DomainDescriptor.from_settings(settings["domain"])
    f = domain_features(demo_images["test0"])
    assert torch.allclose(again.distance(f), fitted.distance(f), rtol=1e-12, atol=0)
    assert again.threshold == fitted.threshold and again.info["n_fit"] == 80


def test_obvious_shifts_are_flagged_and_a_small_finding_is_not(fitted, demo_images):
    normal = demo_images["test0"]
    assert fitted.in_domain(domain_features(normal)).float().mean() >= 0.9
    # a small local finding must not be refused (that would hide it). The demo's own lesions are refused: its
    # normal images are near copies of one template, so a lesion of 5-10% of the image is far outside their spread
    # (measured on the chest set: scripts/benchmark_domain.py flags <= 5% of the pneumonia images).
    lesion = normal.clone()
    lesion[..., 24:28, 16:20] += 0.3
    assert fitted.in_domain(domain_features(lesion)).float().mean() >= 0.9
    for shifted in (-normal, torch.rot90(normal, 1, (2, 3)), torch.rand_like(normal) * 2 - 1):
        assert not fitted.in_domain(domain_features(shifted)).any()
    shifted_d = fitted.distance(domain_features(-normal))
    assert shifted_d.min() > 10 * fitted.threshold


def test_features_of_checks_the_feature_version(fitted, demo_images):
    x = demo_images["test0"][:4]
    assert torch.equal(fitted.features_of(x), domain_features(x))
    other = DomainDescriptor.from_settings({**fitted.to_settings(), "features": "image_statistics_v0"})
    with pytest.raises(ValueError, match="image_statistics_v0"):
        other.features_of(x)


def test_fit_refuses_bad_input():
    with pytest.raises(ValueError, match="too few"):
        DomainDescriptor().fit(torch.randn(10, 3))
    with pytest.raises(ValueError, match="non-finite"):
        DomainDescriptor().fit(torch.full((40, 3), float("nan")))
    with pytest.raises(RuntimeError, match="not fitted"):
        DomainDescriptor().distance(torch.zeros(1, 3))


def test_bottleneck_features_shape():
    g = SAGANGenerator(conv_dim=4, num_res_blocks=1, patches_per_side=2).eval()
    f = bottleneck_features(torch.rand(3, 1, 64, 64) * 2 - 1, g)
    assert f.shape == (3, 2 * 2 * 4 * 8)


def test_domain_record_fits_once_on_all_the_training_images(demo_images, caplog):
    from bundle.domain import DomainRecord

    normal = [{"image": x} for x in demo_images["train"][:40]]
    unlabeled = [{"image": x} for x in torch.cat([demo_images["train"][40:], demo_images["test1"]])]
    record = DomainRecord([normal, unlabeled])
    settings = record.record()["domain"]
    assert settings["n_fit"] == 40 + 40 + 30 and record.record()["domain"] is settings  # fitted once
    reference = DomainDescriptor().fit(domain_features(torch.cat([demo_images["train"], demo_images["test1"]])))
    assert settings["threshold"] == pytest.approx(reference["threshold"]) and settings["mean"] == reference["mean"]
    assert DomainRecord([normal], enabled=False).record() == {}
    with caplog.at_level("WARNING", logger="bundle.domain"):
        assert DomainRecord([normal[:10]]).record() == {}
    assert "no in-domain check stored" in caplog.text


def test_domain_checkd_flags_and_names_an_image_outside(fitted, demo_images, caplog):
    from monai.data import MetaTensor

    from bundle.domain import OUT_OF_DOMAIN_MESSAGE, DomainCheckd

    check = DomainCheckd(fitted.to_settings())
    inside = check({"image": demo_images["test0"][0], "score": torch.tensor([0.1])})
    assert inside["in_domain"].tolist() == [1.0] and 0 <= inside["domain_distance"].item() <= fitted.threshold
    flipped = MetaTensor(-demo_images["test0"][0], meta={"filename_or_obj": "/x/inverted.png"})
    with caplog.at_level("WARNING", logger="bundle.domain"):
        outside = check({"image": flipped})
    assert outside["in_domain"].tolist() == [0.0] and outside["domain_distance"].item() > fitted.threshold
    assert f"/x/inverted.png: {OUT_OF_DOMAIN_MESSAGE}" in caplog.text
    assert DomainCheckd(None)({"image": flipped}).keys() == {"image"}  # a model without the check
