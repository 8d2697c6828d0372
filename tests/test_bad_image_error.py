"""BadImageError (and SkippedImageError) survive pickle and copy.copy (flake8-bugbear B042): a DataLoader worker
process or a ProcessPoolExecutor sends the exception back pickled; its message stays ``<printable path>: <problem>``."""

import copy
import pickle

import pytest

from bundle.data import SkippedImageError
from bundle.transforms.io import BadImageError

NAME = "scan\udcff.png"  # a non-UTF-8 file name byte, surrogate-escaped by Python


@pytest.mark.parametrize("cls", [BadImageError, SkippedImageError])
@pytest.mark.parametrize("clone", [lambda e: pickle.loads(pickle.dumps(e)), copy.copy, copy.deepcopy])
def test_bad_image_error_round_trips(cls, clone):
    error = cls(NAME, "cannot read image (OSError: truncated)")
    again = clone(error)
    assert type(again) is cls and isinstance(again, ValueError)
    assert (again.filename, again.problem) == (NAME, "cannot read image (OSError: truncated)")
    assert str(again) == str(error) == "scan\\udcff.png: cannot read image (OSError: truncated)"


def test_bad_image_error_message_matches():
    with pytest.raises(BadImageError, match=r"^scan\\udcff\.png: file not found$"):
        raise BadImageError(NAME, "file not found")
