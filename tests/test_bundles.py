"""Every bundle under bundles/: metadata schema, network I/O, MONAI runner, TorchScript export.

Plus what is special to the sparse bundle: its training labels are mostly "unlabelled" (255) with a
few fully labelled planes, padding stays unlabelled, and validation sees dense labels.
"""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from monai.bundle import ckpt_export, verify_metadata, verify_net_in_out

from app.cli import main
from app.engine.bundle_config import bundle_parser
from conftest import REPO, SAMPLE_MANIFEST

BUNDLES_DIR = REPO / "bundles"
SCHEMA = BUNDLES_DIR / "schema" / "meta_schema.json"
BUNDLES = sorted(d.name for d in BUNDLES_DIR.iterdir() if (d / "configs" / "metadata.json").is_file())
SPARSE = "hippocampus_unet3d_sparse"
IGNORE = 255

# A handful of cases so that one epoch takes seconds (the runner takes these as CLI overrides).
FEW_CASES = {
    "train#dataset#data": "$app.data.manifest.fold_datalist(@manifest, @fold, 'train', max_cases=4)",
    "validate#dataset#data": "$app.data.manifest.fold_datalist(@manifest, @fold, 'val', max_cases=2)",
}


def _configs(bundle: str, *names: str) -> list[str]:
    return [str(BUNDLES_DIR / bundle / "configs" / n) for n in names]


def _meta(bundle: str) -> str:
    return str(BUNDLES_DIR / bundle / "configs" / "metadata.json")


def test_the_issue_bundles_exist():
    assert {"hippocampus_unet3d", SPARSE, "hippocampus_vnet"} <= set(BUNDLES)


@pytest.mark.parametrize("bundle", BUNDLES)
def test_metadata_verifies_and_bundle_is_self_contained(bundle):
    verify_metadata(meta_file=_meta(bundle), filepath=str(SCHEMA))  # raises ValueError when invalid
    root = BUNDLES_DIR / bundle
    train = json.loads((root / "configs" / "train.json").read_text())
    assert train["bundle_name"] == bundle  # app.paths.bundle_root resolves the bundle by this name
    for name in ("train.json", "inference.json", "evaluate.json", "demo.json"):
        json.loads((root / "configs" / name).read_text())  # each one parses
    meta = json.loads((root / "configs" / "metadata.json").read_text())
    assert meta["network_data_format"]["outputs"]["pred"]["num_channels"] == train["num_classes"]


def test_metadata_check_rejects_a_broken_file(tmp_path):
    meta = json.loads(Path(_meta("hippocampus_vnet")).read_text())
    del meta["network_data_format"]
    bad = tmp_path / "metadata.json"
    bad.write_text(json.dumps(meta))
    with pytest.raises(ValueError, match="network_data_format"):
        verify_metadata(meta_file=str(bad), filepath=str(SCHEMA))


@pytest.mark.parametrize("overlay", [(), ("demo.json",)], ids=["default", "demo"])
@pytest.mark.parametrize("bundle", BUNDLES)
def test_network_matches_metadata_in_and_out(bundle, overlay):
    verify_net_in_out("network_def", meta_file=_meta(bundle), config_file=_configs(bundle, "train.json", *overlay),
                      device="cpu")


@pytest.mark.parametrize("bundle", BUNDLES)
def test_ckpt_export_gives_torchscript_that_predicts(bundle, tmp_path):
    configs = _configs(bundle, "train.json", "demo.json")
    parser = bundle_parser(bundle, configs, {"device_name": "cpu"})
    net = parser.get_parsed_content("network_def").eval()
    torch.save(net.state_dict(), tmp_path / "model.pt")  # untrained weights are enough to test the export
    ts = tmp_path / "model.ts"
    ckpt_export("network_def", filepath=str(ts), ckpt_file=str(tmp_path / "model.pt"), meta_file=_meta(bundle),
                config_file=configs)
    loaded = torch.jit.load(str(ts), map_location="cpu")
    x = torch.rand(1, 1, 32, 48, 32)
    with torch.no_grad():
        y = loaded(x)
        ref = net(x)
    assert y.shape == (1, parser.get_parsed_content("num_classes"), 32, 48, 32)
    assert torch.allclose(y, ref, atol=1e-4)  # the exported graph computes what the network computes


def _runner(bundle: str, out: Path, cwd: Path) -> subprocess.CompletedProcess:
    cmd = [sys.executable, "-m", "monai.bundle", "run",
           "--config_file", str(_configs(bundle, "train.json", "demo.json")), "--meta_file", _meta(bundle),
           "--epochs", "1", "--device_name", "cpu", "--output_dir", str(out)]
    for key, value in FEW_CASES.items():
        cmd += [f"--{key}", value]
    env = {**os.environ, "SEGAPP_NO_PROGRESS": "1", "PYTHONPATH": str(REPO)}
    return subprocess.run(cmd, cwd=cwd, env=env, capture_output=True, text=True, timeout=600)


@pytest.mark.slow
@pytest.mark.parametrize("bundle", BUNDLES)
def test_monai_runner_trains_one_epoch(bundle, tmp_path):
    out = tmp_path / "run"
    proc = _runner(bundle, out, tmp_path)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert (out / "models" / "model.pt").is_file()
    final = json.loads((out / "metrics.json").read_text())["final"]
    assert final["epoch"] == 1
    assert 0.0 <= final["val_mean_dice"] <= 1.0
    assert math.isfinite(final["val_mean_hd95"])
    # the weights fit the bundle's (demo) network
    net = bundle_parser(bundle, _configs(bundle, "train.json", "demo.json"), {"device_name": "cpu"}).get_parsed_content("network_def")
    net.load_state_dict(torch.load(out / "models" / "model.pt", map_location="cpu"))


@pytest.mark.slow
def test_segapp_train_cli_runs_the_vnet_bundle(tmp_path):
    rc = main(["train", "hippocampus_vnet", "--manifest", str(SAMPLE_MANIFEST), "--epochs", "1", "--device", "cpu",
               "--config", "demo.json", "--out", str(tmp_path / "run"), "--override", json.dumps(FEW_CASES)])
    assert rc == 0
    metrics = json.loads((tmp_path / "run" / "metrics.json").read_text())
    assert [h["epoch"] for h in metrics["history"]] == [1]
    assert (tmp_path / "run" / "executed_config.json").is_file()


# -- the sparse bundle --------------------------------------------------------------------------------
def _sparse_parser(**overrides):
    opts = {"device_name": "cpu", "manifest": str(SAMPLE_MANIFEST), "num_workers": 0, "cache_workers": 0,
            "batch_size": 2, **FEW_CASES, **overrides}
    return bundle_parser(SPARSE, ["train.json", "demo.json"], opts)


def test_sparse_training_batches_are_mostly_unlabelled_with_labelled_planes():
    parser = _sparse_parser()
    per_axis = parser.get_parsed_content("sparse_slices_per_axis")
    batch = next(iter(parser.get_parsed_content("train#dataloader")))
    label = batch["label"].as_tensor()
    assert label.shape[2:] == tuple(parser.get_parsed_content("patch_size"))
    ignored = float((label == IGNORE).float().mean())
    assert 0.75 < ignored < 1.0, ignored
    assert set(torch.unique(label).tolist()) == {0.0, 1.0, 2.0, float(IGNORE)}
    labelled = label[:, 0] != IGNORE
    for ax in range(3):
        others = tuple(d + 1 for d in range(3) if d != ax)
        full_planes = labelled.all(dim=others).sum(dim=-1)  # per item
        # a random crop may cut a plane away (so a patch can have none on an axis), never add one
        assert bool((full_planes <= per_axis[ax]).all()), (ax, full_planes)
    # every labelled voxel lies on a fully labelled plane
    on_plane = torch.zeros_like(labelled)
    for ax in range(3):
        others = tuple(d + 1 for d in range(3) if d != ax)
        full = labelled.all(dim=others, keepdim=True)
        on_plane |= full.expand_as(labelled)
    assert bool((labelled <= on_plane).all())
    # the loss the bundle trains with skips the unlabelled voxels and is finite
    net = parser.get_parsed_content("network")
    image, target = parser.get_parsed_content("train#prepare_batch")(batch, torch.device("cpu"))
    logits = net(image)
    loss = parser.get_parsed_content("loss")(logits, target)
    loss.backward()
    assert torch.isfinite(loss)


def test_sparse_validation_uses_dense_labels():
    batch = next(iter(_sparse_parser().get_parsed_content("validate#dataloader")))
    values = set(torch.unique(batch["label"]).tolist())
    assert values == {0.0, 1.0, 2.0}


def test_sparse_padding_stays_unlabelled_and_slice_budget_holds():
    # a patch larger than every hippocampus crop, so that each case is padded on every axis
    parser = _sparse_parser(patch_size=[64, 64, 64])
    ds = parser.get_parsed_content("train#dataset")
    sparsify_only = parser.get_parsed_content("preprocessing") + [parser.get_parsed_content("train#sparsify")]
    for i in range(len(ds)):
        item = ds[i]
        image, label = item["image"][0], item["label"][0]
        assert tuple(label.shape) == (64, 64, 64)
        assert float(label[0, 0, 0]) == IGNORE and float(label[-1, -1, -1]) == IGNORE  # padded corners
        assert float(image[0, 0, 0]) == 0.0
        # before cropping: labelled planes <= 5 % of all the slices along the three axes
        d = {k: ds.data[i][k] for k in ("image", "label", "id")}
        for t in sparsify_only:
            d = t(d)
        lab = np.asarray(d["label"][0]) != IGNORE
        planes = sum(int(lab.all(axis=tuple(a for a in range(3) if a != ax)).sum()) for ax in range(3))
        assert planes == sum(parser.get_parsed_content("sparse_slices_per_axis"))
        assert planes / sum(lab.shape) <= 0.05, (planes, lab.shape)
        assert lab.mean() < 0.2
