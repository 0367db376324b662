"""Any MONAI bundle on DICOM: third-party (model-zoo layout) bundles run by ``segapp infer`` give what the
bundle's own MONAI runner gives on the same image, on the source grid, as validator-clean DICOM SEG.

* the model zoo's ``spleen_ct_segmentation`` (its published configs; seeded weights, see
  ``tests/helpers/zoo_bundles.py``) on the real 20-slice JPEG 2000 CT series;
* a bundle written here around MONAI's ``SegResNet`` (zoo layout: LoadImaged, EnsureChannelFirstd,
  Orientationd, Spacingd, ScaleIntensityRanged; Activationsd, Invertd, AsDiscreted, SaveImaged);
* fidelity to the bundle's own transforms on the real oblique MR series: a 0.5 mm Spacingd whose grid
  does not reach the first source slice (MONAI's centred grid for non-orthogonal affines), the
  Spacingd padding mode on the way back, and KeepLargestConnectedComponentd, by segapp's fast path
  and MONAI's plain path.

MONAI's runner reads the series as NIfTI written by segapp's own reader (same voxels, same affine).
Everything runs on the CPU in float32 on both sides (AMP is CUDA only).
"""

from __future__ import annotations

import json
from pathlib import Path

import nibabel as nib
import numpy as np
import pydicom
import pytest
import torch
from dicom_validation import assert_dciodvfy_clean
from zoo_bundles import (
    CT_SERIES,
    MR_STUDY,
    MR_T1_UID,
    copy_spleen,
    dice,
    monai_run,
    seeded_weights,
    series_to_nifti,
    write_bundle,
)

from app.bundle.config import bundle_parser
from app.cli import main
from app.io.dicom_series import read_series
from app.io.seg_read import read_seg

pytestmark = pytest.mark.slow


def _preprocessed(root: Path, image: Path) -> torch.Tensor:
    """The bundle's own preprocessing of ``image`` (MONAI transforms, as the runner applies them)."""
    pre = bundle_parser(root, ["inference"]).get_parsed_content("preprocessing")
    return pre({"image": str(image)})["image"]


def _summary(out: Path) -> dict:
    (summary,) = list(out.glob("*_summary.json"))
    return json.loads(summary.read_text())


def _segapp(root: Path, series: Path, out: Path, *extra: str) -> dict:
    args = ["infer", str(root), "--input", str(series), "--output", str(out), "--device", "cpu", *extra]
    assert main(args) == 0
    return _summary(out)


def _monai_labels(path: Path, shape) -> np.ndarray:
    img = nib.load(path)
    return np.rint(np.asarray(img.dataobj)).astype(np.int64).reshape(shape)


def _assert_on_source_grid(nifti: str, volume) -> np.ndarray:
    img = nib.load(nifti)
    assert img.shape == volume.shape
    np.testing.assert_allclose(img.affine, volume.affine_ras, atol=1e-4)
    return np.asarray(img.dataobj).astype(np.int64)


def _assert_match(ours: np.ndarray, theirs: np.ndarray, labels, min_share: float = 0.01) -> dict:
    """Dice >= 0.99 per label, and each label holds a non-trivial share of the voxels on both sides
    (so that the comparison is not between two empty or two all-foreground maps)."""
    scores = {}
    for label in labels:
        for name, arr in (("segapp", ours), ("MONAI", theirs)):
            share = float((arr == label).mean())
            assert min_share < share < 0.95, f"{name}: label {label} holds {share:.4f} of the voxels"
        scores[label] = dice(ours, theirs, label)
        assert scores[label] >= 0.99, f"label {label}: Dice {scores[label]:.4f} against MONAI's runner"
    return scores


def _segment_codes(seg_file: str) -> dict[int, tuple[str, str, str, str]]:
    ds = pydicom.dcmread(seg_file)
    out = {}
    for s in ds.SegmentSequence:
        code = s.SegmentedPropertyTypeCodeSequence[0]
        out[int(s.SegmentNumber)] = (s.SegmentLabel, code.CodeValue, code.CodingSchemeDesignator, code.CodeMeaning)
    return out


# -- the model zoo's spleen_ct_segmentation on the real CT series ----------------------------------------
def test_zoo_spleen_bundle_on_ct_series_matches_monai_runner(tmp_path):
    """The zoo's own inference.json, unmodified; MONAI's runner with its datalist/output_dir pointed at
    the series as NIfTI. The CT is 512 x 512 x 20 at 0.98 x 0.98 x 2 mm: 334 x 334 x 20 at the
    bundle's 1.5 x 1.5 x 2 mm, 36 windows of 96^3 (about 30 s of CPU per run on 2 cores)."""
    root = copy_spleen(tmp_path / "spleen_ct_segmentation")
    nifti = series_to_nifti(CT_SERIES, tmp_path / "data" / "imagesTs" / "ct.nii.gz")
    shares = seeded_weights(root, seed=0, sample=_preprocessed(root, nifti), roi=(96, 96, 96))
    assert 0.2 < shares[1] < 0.8, shares  # the bias shift gave the random network's output structure

    monai_run(root, "--dataset_dir", str(tmp_path / "data"), "--output_dir", str(tmp_path / "monai"))
    volume = read_series(CT_SERIES)
    theirs = _monai_labels(tmp_path / "monai" / "ct" / "ct_trans.nii.gz", volume.shape)

    summary = _segapp(root, CT_SERIES, tmp_path / "ours", "--trust-bundle", "--allow-generated-uids")
    assert summary["path"] == "fast", summary["note"]
    ours = _assert_on_source_grid(summary["outputs"]["nifti"], volume)
    _assert_match(ours, theirs, [1])

    seg = summary["outputs"]["seg"]
    assert_dciodvfy_clean(seg)
    labels_seg, affine_lps = read_seg(seg, volume)
    np.testing.assert_array_equal(labels_seg, ours)
    np.testing.assert_allclose(affine_lps, volume.affine_lps, atol=1e-4)
    # the zoo's metadata names channel 1 "spleen" and has no codes: SNOMED CT's from COMMON_STRUCTURES
    assert _segment_codes(seg) == {1: ("spleen", "78961009", "SCT", "Spleen")}


# -- a bundle around another MONAI network ------------------------------------------------------------
def _segresnet_bundle(root: Path) -> Path:
    """Zoo layout around MONAI's SegResNet: 4 classes at 3 x 3 x 4 mm, 64 x 64 x 16 windows."""
    inference = {
        "imports": ["$import glob"],
        "bundle_root": ".",
        "image_key": "image",
        "output_dir": "$@bundle_root + '/eval'",
        "dataset_dir": "/workspace/data",
        "datalist": "$list(sorted(glob.glob(@dataset_dir + '/*.nii.gz')))",
        "device": "$torch.device('cuda:0' if torch.cuda.is_available() else 'cpu')",
        "network_def": {
            "_target_": "SegResNet",
            "spatial_dims": 3,
            "in_channels": 1,
            "out_channels": 4,
            "init_filters": 8,
            "blocks_down": [1, 1, 1],
            "blocks_up": [1, 1],
        },
        "network": "$@network_def.to(@device)",
        "preprocessing": {
            "_target_": "Compose",
            "transforms": [
                {"_target_": "LoadImaged", "keys": "@image_key"},
                {"_target_": "EnsureChannelFirstd", "keys": "@image_key"},
                {"_target_": "Orientationd", "keys": "@image_key", "axcodes": "RAS"},
                {"_target_": "Spacingd", "keys": "@image_key", "pixdim": [3.0, 3.0, 4.0], "mode": "bilinear"},
                {
                    "_target_": "ScaleIntensityRanged",
                    "keys": "@image_key",
                    "a_min": -175,
                    "a_max": 250,
                    "b_min": 0.0,
                    "b_max": 1.0,
                    "clip": True,
                },
                {"_target_": "EnsureTyped", "keys": "@image_key"},
            ],
        },
        "dataset": {"_target_": "Dataset", "data": "$[{'image': i} for i in @datalist]", "transform": "@preprocessing"},
        "dataloader": {
            "_target_": "DataLoader",
            "dataset": "@dataset",
            "batch_size": 1,
            "shuffle": False,
            "num_workers": 0,
        },
        "inferer": {"_target_": "SlidingWindowInferer", "roi_size": [64, 64, 16], "sw_batch_size": 4, "overlap": 0.5},
        "postprocessing": {
            "_target_": "Compose",
            "transforms": [
                {"_target_": "Activationsd", "keys": "pred", "softmax": True},
                {
                    "_target_": "Invertd",
                    "keys": "pred",
                    "transform": "@preprocessing",
                    "orig_keys": "@image_key",
                    "nearest_interp": False,
                    "to_tensor": True,
                },
                {"_target_": "AsDiscreted", "keys": "pred", "argmax": True},
                {
                    "_target_": "SaveImaged",
                    "keys": "pred",
                    "output_dir": "@output_dir",
                    "output_postfix": "seg",
                    "separate_folder": False,
                    "output_dtype": "$numpy.uint8",
                    "resample": False,
                },
            ],
        },
        "evaluator": {
            "_target_": "SupervisedEvaluator",
            "device": "@device",
            "val_data_loader": "@dataloader",
            "network": "@network",
            "inferer": "@inferer",
            "postprocessing": "@postprocessing",
        },
        "checkpointloader": {
            "_target_": "CheckpointLoader",
            "load_path": "$@bundle_root + '/models/model.pt'",
            "load_dict": {"model": "@network"},
        },
        "initialize": ["$monai.utils.set_determinism(seed=0)", "$@checkpointloader(@evaluator)"],
        "run": ["$@evaluator.run()"],
    }
    metadata = {
        "schema": "https://github.com/Project-MONAI/MONAI-extra-test-data/releases/download/0.8.1/meta_schema_20220324.json",
        "version": "0.1.0",
        "changelog": {"0.1.0": "written by the test"},
        "monai_version": "1.6.1",
        "pytorch_version": "2.13.0",
        "numpy_version": "2.0.0",
        "required_packages_version": {},
        "name": "abdomen_segresnet_test",
        "task": "abdominal CT segmentation (test bundle, random weights)",
        "description": "SegResNet, 4 classes",
        "authors": "segapp tests",
        "copyright": "none",
        "network_data_format": {
            "inputs": {
                "image": {
                    "type": "image",
                    "format": "hounsfield",
                    "modality": "CT",
                    "num_channels": 1,
                    "spatial_shape": [64, 64, 16],
                    "dtype": "float32",
                    "value_range": [0, 1],
                    "is_patch_data": True,
                    "channel_def": {"0": "image"},
                }
            },
            "outputs": {
                "pred": {
                    "type": "image",
                    "format": "segmentation",
                    "num_channels": 4,
                    "spatial_shape": [64, 64, 16],
                    "dtype": "float32",
                    "value_range": [0, 1],
                    "is_patch_data": True,
                    "channel_def": {"0": "background", "1": "liver", "2": "left kidney", "3": "cyst wall"},
                }
            },
        },
    }
    return write_bundle(root, inference, metadata)


def test_segresnet_bundle_on_ct_series_matches_monai_runner(tmp_path):
    root = _segresnet_bundle(tmp_path / "abdomen_segresnet_test")
    nifti = series_to_nifti(CT_SERIES, tmp_path / "data" / "ct.nii.gz")
    shares = seeded_weights(root, seed=3, sample=_preprocessed(root, nifti), roi=(64, 64, 16))
    assert min(shares.values()) > 0.02, shares

    monai_run(root, "--dataset_dir", str(tmp_path / "data"), "--output_dir", str(tmp_path / "monai"))
    volume = read_series(CT_SERIES)
    theirs = _monai_labels(tmp_path / "monai" / "ct_seg.nii.gz", volume.shape)

    summary = _segapp(root, CT_SERIES, tmp_path / "ours", "--trust-bundle", "--allow-generated-uids")
    assert summary["path"] == "fast", summary["note"]
    ours = _assert_on_source_grid(summary["outputs"]["nifti"], volume)
    _assert_match(ours, theirs, [1, 2, 3])

    seg = summary["outputs"]["seg"]
    assert_dciodvfy_clean(seg)
    codes = _segment_codes(seg)
    assert codes[1] == ("liver", "10200004", "SCT", "Liver")
    assert codes[2][0] == "left kidney" and codes[2][2] == "SCT"
    # a name SNOMED CT is not looked up for: a code of segapp's private scheme carrying the name
    assert codes[3] == ("cyst wall", "L3", "99SEGAPP", "cyst wall")


# -- fidelity to the bundle's own transforms on an oblique MR series --------------------------------------
def _mr_bundle(root: Path, variant: str) -> Path:
    """An MR bundle in the zoo layout: RAS, 0.5 mm Spacingd, z-score; a 3x3x3 convolution whose fixed
    weights band the local mean intensity into background / label 1 / label 2; largest component kept.

    ``variant``: ``border`` (Spacingd's default padding), ``zeros`` (Spacingd ``padding_mode: zeros``),
    ``label_ops_first`` (argmax and largest component on the network grid, then Invertd with nearest
    interpolation: only MONAI's plain path can reproduce that).
    """
    spacing = {"_target_": "Spacingd", "keys": "@image_key", "pixdim": [0.5, 0.5, 0.5], "mode": "bilinear"}
    if variant == "zeros":
        spacing["padding_mode"] = "zeros"
    invert = {
        "_target_": "Invertd",
        "keys": "pred",
        "transform": "@preprocessing",
        "orig_keys": "@image_key",
        "nearest_interp": variant == "label_ops_first",
        "to_tensor": True,
    }
    argmax = {"_target_": "AsDiscreted", "keys": "pred", "argmax": True}
    largest = {"_target_": "KeepLargestConnectedComponentd", "keys": "pred", "applied_labels": [1, 2]}
    softmax = {"_target_": "Activationsd", "keys": "pred", "softmax": True}
    steps = [softmax, argmax, largest, invert] if variant == "label_ops_first" else [softmax, invert, argmax, largest]
    save = {
        "_target_": "SaveImaged",
        "keys": "pred",
        "output_dir": "@output_dir",
        "output_postfix": "seg",
        "separate_folder": False,
        "output_dtype": "$numpy.uint8",
        "resample": False,
    }
    inference = {
        "imports": ["$import glob"],
        "bundle_root": ".",
        "image_key": "image",
        "output_dir": "$@bundle_root + '/eval'",
        "dataset_dir": "/workspace/data",
        "datalist": "$list(sorted(glob.glob(@dataset_dir + '/*.nii.gz')))",
        "device": "$torch.device('cpu')",
        "network_def": {
            "_target_": "torch.nn.Conv3d",
            "in_channels": 1,
            "out_channels": 3,
            "kernel_size": 3,
            "padding": 1,
        },
        "network": "$@network_def.to(@device)",
        "preprocessing": {
            "_target_": "Compose",
            "transforms": [
                {"_target_": "LoadImaged", "keys": "@image_key"},
                {"_target_": "EnsureChannelFirstd", "keys": "@image_key"},
                {"_target_": "Orientationd", "keys": "@image_key", "axcodes": "RAS"},
                spacing,
                {"_target_": "NormalizeIntensityd", "keys": "@image_key", "nonzero": True},
                {"_target_": "EnsureTyped", "keys": "@image_key"},
            ],
        },
        "dataset": {"_target_": "Dataset", "data": "$[{'image': i} for i in @datalist]", "transform": "@preprocessing"},
        "dataloader": {"_target_": "DataLoader", "dataset": "@dataset", "batch_size": 1, "num_workers": 0},
        "inferer": {
            "_target_": "SlidingWindowInferer",
            "roi_size": [128, 128, 32],
            "sw_batch_size": 4,
            "overlap": 0.25,
        },
        "postprocessing": {"_target_": "Compose", "transforms": [*steps, save]},
        "evaluator": {
            "_target_": "SupervisedEvaluator",
            "device": "@device",
            "val_data_loader": "@dataloader",
            "network": "@network",
            "inferer": "@inferer",
            "postprocessing": "@postprocessing",
        },
        "checkpointloader": {
            "_target_": "CheckpointLoader",
            "load_path": "$@bundle_root + '/models/model.pt'",
            "load_dict": {"model": "@network"},
        },
        "initialize": ["$@checkpointloader(@evaluator)"],
        "run": ["$@evaluator.run()"],
    }
    io = {
        "type": "image",
        "num_channels": 1,
        "spatial_shape": [128, 128, 32],
        "dtype": "float32",
        "is_patch_data": True,
    }
    metadata = {
        "version": "0.1.0",
        "name": f"mr_band_{variant}",
        "task": "oblique MR fidelity test",
        "network_data_format": {
            "inputs": {"image": {**io, "format": "magnitude", "modality": "MR", "channel_def": {"0": "image"}}},
            "outputs": {
                "pred": {
                    **io,
                    "num_channels": 3,
                    "format": "segmentation",
                    "channel_def": {"0": "background", "1": "brain", "2": "tumor"},
                }
            },
        },
    }
    write_bundle(root, inference, metadata)
    net = torch.nn.Conv3d(1, 3, 3, padding=1)
    with torch.no_grad():  # logits of the 27-voxel mean m: 0, 10 m - 5, 20 m - 20 -> label 1 for 0.5 < m < 1.5
        net.weight.zero_()
        for c, w in enumerate((0.0, 10.0, 20.0)):
            net.weight[c] = w / 27
        net.bias.copy_(torch.tensor([0.0, -5.0, -20.0]))
    (root / "models").mkdir()
    torch.save(net.state_dict(), root / "models" / "model.pt")
    return root


def _components(labels: np.ndarray, label: int) -> int:
    from scipy import ndimage

    return int(ndimage.label(labels == label, structure=np.ones((3, 3, 3)))[1])


@pytest.mark.parametrize("variant", ["border", "zeros", "label_ops_first"])
def test_oblique_mr_0p5mm_largest_component_matches_monai_runner(tmp_path, variant):
    """The real oblique T1 series (512 x 512 x 4, 0.43 mm pixels, 6.5 mm slices). Its affine is not
    quite orthogonal, so MONAI's Spacingd finds no corner to anchor its 440 x 440 x 40 grid at 0.5 mm
    on and centres it (``compute_shape_offset``, with centres at ``shape / 2``, half a voxel off): the
    grid starts 3 mm past the first slice. MONAI's Invertd fills that slice from the grid's edge
    (``border``, Spacingd's default) or leaves it empty (``zeros``); segapp must do the same and keep
    the largest component of each label, by the fast path and by the plain path."""
    from app.bundle.model import load_model
    from app.inference.predictor import BundlePredictor

    root = _mr_bundle(tmp_path / f"mr_band_{variant}", variant)
    series_to_nifti(MR_STUDY, tmp_path / "data" / "mr.nii.gz", series_uid=MR_T1_UID)
    volume = read_series(MR_STUDY, series_uid=MR_T1_UID)
    net_img = _preprocessed(root, tmp_path / "data" / "mr.nii.gz")
    first, last = (np.linalg.solve(np.asarray(net_img.affine), volume.affine_ras @ [256, 256, k, 1])[2] for k in (0, 3))
    assert first < -1 and 0 < last < net_img.shape[3] - 1  # the network grid misses the first slice only

    monai_run(root, "--dataset_dir", str(tmp_path / "data"), "--output_dir", str(tmp_path / "monai"))
    theirs = _monai_labels(tmp_path / "monai" / "mr_seg.nii.gz", volume.shape)

    summary = _segapp(
        root, MR_STUDY, tmp_path / "ours", "--series-uid", MR_T1_UID, "--format", "nifti", "--trust-bundle"
    )
    assert summary["path"] == ("plain" if variant == "label_ops_first" else "fast"), summary["note"]
    fast = _assert_on_source_grid(summary["outputs"]["nifti"], volume)

    model = load_model(root, device="cpu", trust=True)
    plain = BundlePredictor.from_model(model, fast=False).predict_metatensor(volume.to_metatensor())
    assert plain.path == "plain"
    for ours in (fast, plain.labels):
        _assert_match(ours, theirs, [1, 2], min_share=0.005)
        if variant != "label_ops_first":  # the largest component, kept on the source grid (one each)
            for label in (1, 2):
                assert _components(ours, label) == _components(theirs, label) == 1
        for k in (0, volume.shape[2] - 1):  # the end slices, as MONAI labels them
            if variant == "zeros" and k == 0:
                assert not theirs[..., k].any() and not ours[..., k].any()
            else:
                assert (theirs[..., k] == 1).sum() > 1000
                assert dice(ours[..., k], theirs[..., k], 1) >= 0.99
    if variant == "border":  # the bundle's largest-component step matters here: without it, more components
        predictor = BundlePredictor.from_model(model)
        predictor.post.label_steps = []
        raw = predictor.predict_metatensor(volume.to_metatensor()).labels
        assert max(_components(raw, 1), _components(raw, 2)) > 1
        assert (raw != fast).sum() > 100
