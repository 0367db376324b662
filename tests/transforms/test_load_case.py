"""Cases stored as a DICOM series with a DICOM SEG label load as training data on the right grid."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from dicom_phantoms import write_phantom_series

from app.bundle.config import bundle_parser
from app.bundle.store import find_bundle
from app.errors import InputError
from app.io.dicom_series import read_series
from app.io.seg_write import write_seg
from app.io.segments import SegmentSpec
from app.transforms.load import LoadCased


@pytest.fixture
def dicom_case(tmp_path):
    info = write_phantom_series(
        tmp_path / "series", orientation="sagittal", modality="MR", shape=(20, 18, 12), reverse_file_order=True
    )
    volume = read_series(tmp_path / "series")
    mask = (info.mask_ijk == 2).astype(np.uint8) + 2 * (info.mask_ijk == 1)
    specs = [SegmentSpec(1, "anterior"), SegmentSpec(2, "posterior")]
    seg = write_seg(volume, mask, specs, ("test", "1"), tmp_path / "label.dcm")
    return {"image": str(tmp_path / "series"), "label": str(seg), "label_format": "dicom-seg"}, mask, volume


def test_seg_label_lands_on_image_grid(dicom_case):
    case, mask, volume = dicom_case
    d = LoadCased(("image", "label"))(case)
    assert tuple(d["image"].shape) == (1, *volume.shape)
    np.testing.assert_array_equal(d["label"][0].numpy(), mask)
    assert torch.allclose(d["label"].affine.double(), d["image"].affine.double())
    np.testing.assert_allclose(d["image"].affine.numpy(), volume.affine_ras, atol=1e-6)


def test_bundle_preprocessing_accepts_dicom_cases(dicom_case):
    case, mask, _ = dicom_case
    parser = bundle_parser(find_bundle("hippocampus_unet3d").root, ["train"], {"device_name": "cpu"})
    out = parser.get_parsed_content("validate#transforms")(case)
    # reoriented to RAS at 1 mm: the labelled volume is kept (phantom spacing is ~1 mm, so counts stay close)
    assert set(np.unique(out["label"].numpy())) == {0, 1, 2}
    assert tuple(out["image"].shape[1:]) == tuple(out["label"].shape[1:])


def test_seg_label_with_nifti_image_is_refused(dicom_case, tmp_path):
    case, _, _ = dicom_case
    with pytest.raises(InputError, match="needs its DICOM image series"):
        LoadCased(("image", "label"))({**case, "image": str(tmp_path / "x.nii.gz")})


def test_nifti_label_for_a_dicom_image_must_share_its_grid(dicom_case, tmp_path):
    from app.io.nifti import save_labels_nifti

    case, mask, volume = dicom_case
    on_grid = save_labels_nifti(mask, volume.affine_ras, tmp_path / "label_ok.nii.gz")
    d = LoadCased(("image", "label"))({"image": case["image"], "label": str(on_grid)})
    np.testing.assert_array_equal(d["label"][0].numpy(), mask)
    shifted = volume.affine_ras.copy()
    shifted[:3, 3] += shifted[:3, 0]  # one voxel along i: a patient-safety error, not a rounding one
    off_grid = save_labels_nifti(mask, shifted, tmp_path / "label_shifted.nii.gz")
    with pytest.raises(InputError, match="differs from its DICOM image") as err:
        LoadCased(("image", "label"))({"image": case["image"], "label": str(off_grid)})
    assert "label_shifted.nii.gz" in str(err.value)
