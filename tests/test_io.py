import nibabel as nib
import numpy as np
import pytest
import torch
from PIL import Image

from bundle.transforms import BadImageError, LoadGrayscaleImaged, load_grayscale

from .dicom_files import make_dicom

pytestmark = pytest.mark.filterwarnings("ignore::UserWarning")


def ramp(h=40, w=30, top=4095):
    return (np.arange(h * w).reshape(h, w) * top // (h * w - 1)).astype(np.uint16)


def test_png_8bit_grey_and_rgb(tmp_path):
    a = np.arange(40 * 30, dtype=np.int64).reshape(40, 30) % 256
    Image.fromarray(a.astype(np.uint8)).save(tmp_path / "g.png")
    Image.fromarray(np.stack([a, a, a], -1).astype(np.uint8)).save(tmp_path / "c.jpg", quality=100)
    g = load_grayscale(str(tmp_path / "g.png"))
    assert g.shape == (1, 30, 40) and g.dtype == torch.float32  # MONAI's (x, y) order
    assert torch.allclose(g[0].T, torch.as_tensor(a / 255.0, dtype=torch.float32))
    c = load_grayscale(str(tmp_path / "c.jpg"))
    assert c.shape == (1, 30, 40) and (c - g).abs().max() < 0.05


def test_palette_png_maps_through_its_palette(tmp_path):
    block = np.ones((4, 4), dtype=np.uint8)  # 8 x 8: bundle.transforms.io.MIN_SIDE
    img = Image.fromarray(np.kron(np.array([[0, 1], [1, 0]], dtype=np.uint8), block), mode="P")
    img.putpalette([200, 200, 200, 10, 10, 10] + [0, 0, 0] * 254)
    img.save(tmp_path / "p.png")
    x = load_grayscale(str(tmp_path / "p.png"))
    expected = np.kron(np.array([[200.0, 10.0], [10.0, 200.0]]), block) / 255
    assert torch.allclose(x[0], torch.as_tensor(expected, dtype=torch.float32))


def test_png_16bit_is_min_max_scaled(tmp_path):
    Image.fromarray(ramp(top=40000)).save(tmp_path / "w.png")
    x = load_grayscale(str(tmp_path / "w.png"))
    assert x.min() == 0 and x.max() == 1


def test_dicom_monochrome1_inverted_and_rescaled(tmp_path):
    px = ramp()
    m2 = load_grayscale(make_dicom(tmp_path / "m2.dcm", px, slope=2.0, intercept=-100.0))
    m1 = load_grayscale(make_dicom(tmp_path / "m1.dcm", px, photometric="MONOCHROME1", slope=2.0, intercept=-100.0))
    assert m2.shape == (1, 30, 40) and m2.min() == 0 and m2.max() == 1
    assert torch.allclose(m1, 1 - m2)
    # pixel (row 0, col 0) is the darkest in MONOCHROME2, the brightest after inverting MONOCHROME1
    assert m2[0, 0, 0] == 0 and m1[0, 0, 0] == 1


def test_nifti_2d_and_3d(tmp_path):
    nib.save(nib.Nifti1Image(np.random.rand(30, 40).astype(np.float32), np.eye(4)), tmp_path / "a.nii.gz")
    vol = np.random.rand(30, 40, 5).astype(np.float32)
    nib.save(nib.Nifti1Image(vol, np.eye(4)), tmp_path / "v.nii.gz")
    assert load_grayscale(str(tmp_path / "a.nii.gz")).shape == (1, 30, 40)
    with pytest.raises(BadImageError, match=r"v.nii.gz: is a 3D volume of shape \(30, 40, 5\).*slice_index"):
        load_grayscale(str(tmp_path / "v.nii.gz"))
    s = LoadGrayscaleImaged("image", slice_index=2)({"image": str(tmp_path / "v.nii.gz")})["image"]
    v2 = vol[..., 2]
    assert torch.allclose(s[0], torch.as_tensor((v2 - v2.min()) / (v2.max() - v2.min())), atol=1e-6)
    with pytest.raises(BadImageError, match="slice_index 9 outside a volume of 5 slices"):
        load_grayscale(str(tmp_path / "v.nii.gz"), slice_index=9)


@pytest.mark.parametrize(
    "name,content,message",
    [
        ("missing.png", None, "missing.png: file not found"),
        ("corrupt.png", b"\x89PNG\r\n\x1a\nbroken", "corrupt.png: cannot read image"),
        ("empty.jpg", b"", "empty.jpg: cannot read image"),
        ("corrupt.dcm", b"DICM" * 10, "corrupt.dcm: cannot read image"),
    ],
)
def test_bad_files_named(tmp_path, name, content, message):
    if content is not None:
        (tmp_path / name).write_bytes(content)
    with pytest.raises(BadImageError, match=message):
        load_grayscale(str(tmp_path / name))
