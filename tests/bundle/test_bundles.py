"""Every bundle under bundles/: layout and shared parts, metadata schema, network I/O, MONAI's runner
(inference.json alone; train.json), TorchScript export.

Plus what is special to the sparse bundle: its training labels are mostly "unlabelled" (255) with a
few fully labelled planes, padding stays unlabelled, and validation sees dense labels.
"""

from __future__ import annotations

import contextlib
import json
import math
import os
import re
import shlex
import shutil
import subprocess
import sys
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
import torch
from conftest import REPO, SAMPLE_MANIFEST
from monai.bundle import ckpt_export, verify_metadata, verify_net_in_out

from app.bundle.config import bundle_parser, read_configs
from app.cli import main
from app.runtime.launch import RECORD_ENV

BUNDLES_DIR = REPO / "bundles"
SCHEMA = BUNDLES_DIR / "schema" / "meta_schema.json"
BUNDLES = sorted(d.name for d in BUNDLES_DIR.iterdir() if (d / "configs" / "metadata.json").is_file())
SPARSE = "hippocampus_unet3d_sparse"
IGNORE = 255
CONFIGS = ("common", "train", "inference", "evaluate", "demo", "multi_gpu_train", "metadata")
MACRO = "%configs/common.json#"
# common.json keys that must be the same in every bundle (the network and its hyper-parameters may differ)
SHARED_IN_ALL = (
    "imports",
    "bundle_root",
    "device_name",
    "device",
    "amp",
    "manifest",
    "fold",
    "num_classes",
    "labels",
    "patch_size",
    "target_spacing",
    "preprocessing",
    "sliding_window",
    "val_postprocessing",
    "val_metrics",
)

# A handful of cases so that one epoch takes seconds (the runner takes these as CLI overrides).
FEW_CASES = {
    "train#dataset#data": "$app.data.manifest.fold_datalist(@manifest, @fold, 'train', max_cases=4)",
    "validate#dataset#data": "$app.data.manifest.fold_datalist(@manifest, @fold, 'val', max_cases=2)",
}


def _load(bundle: str, name: str) -> dict:
    return json.loads((BUNDLES_DIR / bundle / "configs" / f"{name}.json").read_text())


def _meta(bundle: str) -> str:
    return str(BUNDLES_DIR / bundle / "configs" / "metadata.json")


def test_the_issue_bundles_exist():
    assert {"hippocampus_unet3d", SPARSE, "hippocampus_vnet"} <= set(BUNDLES)


@pytest.mark.parametrize("bundle", BUNDLES)
def test_layout_format_and_metadata(bundle):
    root = BUNDLES_DIR / bundle
    for name in CONFIGS:
        path = root / "configs" / f"{name}.json"
        text = path.read_text()
        assert text == json.dumps(json.loads(text), indent=4, ensure_ascii=False) + "\n", f"{path} is not formatted"
    for extra in ("LICENSE", "docs/README.md"):
        assert (root / extra).is_file()
    assert sorted(p.name for p in (root / "sample").glob("*.nii.gz"))  # inference.json's sample input
    meta = _load(bundle, "metadata")
    assert meta["name"] == bundle == _load(bundle, "common")["bundle_name"]
    assert "segapp" in meta["required_packages_version"]
    assert meta["network_data_format"]["outputs"]["pred"]["num_channels"] == _load(bundle, "common")["num_classes"]
    verify_metadata(meta_file=_meta(bundle), filepath=str(SCHEMA))  # raises ValueError when invalid


@pytest.mark.parametrize("bundle", BUNDLES)
def test_shared_parts_live_once_in_common_json(bundle):
    """train/inference/evaluate take every shared value from common.json by macro; none redefines one."""
    common = _load(bundle, "common")
    for name in ("train", "inference", "evaluate"):
        cfg = _load(bundle, name)
        macros = {k: v for k, v in cfg.items() if isinstance(v, str) and v.startswith(MACRO)}
        for key, value in macros.items():
            assert value[len(MACRO) :] in common, f"{name}.json: {key} -> {value} is not in common.json"
        redefined = [k for k in cfg if k in common and k not in macros and k not in ("network", "preprocessing")]
        assert not redefined, f"{name}.json redefines common keys {redefined}"
        for key in ("network_def", "imports", "device", "labels"):
            assert cfg[key] == MACRO + key
    assert _load(bundle, "inference")["preprocessing"]["transforms"] == MACRO + "preprocessing"
    assert _load(bundle, "evaluate")["preprocessing"]["transforms"] == MACRO + "preprocessing"


def test_shared_parts_are_in_step_across_bundles():
    commons = {b: _load(b, "common") for b in BUNDLES}
    for key in SHARED_IN_ALL:
        values = {json.dumps(c[key], sort_keys=True) for c in commons.values()}
        assert len(values) == 1, f"common.json#{key} differs between bundles"
    infer = {
        b: {k: v for k, v in _load(b, "inference").items() if not (isinstance(v, str) and v.startswith(MACRO))}
        for b in BUNDLES
    }
    assert len({json.dumps(v, sort_keys=True) for v in infer.values()}) == 1  # only the macros differ
    dense, sparse = _load("hippocampus_unet3d", "train"), _load(SPARSE, "train")
    assert dense["validate"] == sparse["validate"] and dense["optimizer"] == sparse["optimizer"]
    assert dense["train"]["trainer"] == sparse["train"]["trainer"]


def test_metadata_check_rejects_a_broken_file(tmp_path):
    meta = json.loads(Path(_meta("hippocampus_vnet")).read_text())
    del meta["network_data_format"]
    bad = tmp_path / "metadata.json"
    bad.write_text(json.dumps(meta))
    with pytest.raises(ValueError, match="network_data_format"):
        verify_metadata(meta_file=str(bad), filepath=str(SCHEMA))


@pytest.mark.parametrize("overlay", [(), ("configs/demo.json",)], ids=["default", "demo"])
@pytest.mark.parametrize("bundle", BUNDLES)
def test_network_matches_metadata_with_inference_json_alone(bundle, overlay):
    with contextlib.chdir(BUNDLES_DIR / bundle):  # MONAI resolves the macros from the bundle's folder
        verify_net_in_out(
            "network_def",
            meta_file="configs/metadata.json",
            config_file=["configs/inference.json", *overlay],
            device="cpu",
        )


@pytest.mark.parametrize("bundle", BUNDLES)
def test_ckpt_export_gives_torchscript_that_predicts(bundle, tmp_path):
    root = BUNDLES_DIR / bundle
    parser = bundle_parser(root, ["inference", "demo.json"], {"device_name": "cpu"})
    net = parser.get_parsed_content("network_def").eval()
    torch.save(net.state_dict(), tmp_path / "model.pt")  # untrained weights are enough to test the export
    ts = tmp_path / "model.ts"
    with contextlib.chdir(root):
        ckpt_export(
            "network_def",
            filepath=str(ts),
            ckpt_file=str(tmp_path / "model.pt"),
            meta_file="configs/metadata.json",
            config_file=["configs/inference.json", "configs/demo.json"],
        )
    loaded = torch.jit.load(str(ts), map_location="cpu")
    x = torch.rand(1, 1, 32, 48, 32)
    with torch.no_grad():
        y = loaded(x)
        ref = net(x)
    assert y.shape == (1, parser.get_parsed_content("num_classes"), 32, 48, 32)
    assert torch.allclose(y, ref, atol=1e-4)  # the exported graph computes what the network computes


def _env() -> dict:
    return {**os.environ, "SEGAPP_NO_PROGRESS": "1", "PYTHONPATH": str(REPO)}


@pytest.mark.slow
@pytest.mark.parametrize("bundle", BUNDLES)
def test_monai_runner_segments_the_sample_with_inference_json_alone(bundle, tmp_path):
    """A copy of the bundle with (random) weights: MONAI's runner writes the sample's segmentation,
    on the input's grid, equal to what segapp infer writes for the same bundle and input."""
    root = tmp_path / bundle
    shutil.copytree(BUNDLES_DIR / bundle, root)
    torch.manual_seed(0)
    net = bundle_parser(root, ["inference"]).get_parsed_content("network_def")
    (root / "models").mkdir(exist_ok=True)  # a bundle may ship weights: replaced by random ones here
    torch.save(net.state_dict(), root / "models" / "model.pt")
    cmd = [
        sys.executable,
        "-m",
        "monai.bundle",
        "run",
        "--config_file",
        "configs/inference.json",
        "--device",
        "$torch.device('cpu')",
    ]
    proc = subprocess.run(cmd, cwd=root, env=_env(), capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    sample = sorted((root / "sample").glob("*.nii.gz"))[0]
    out = root / "eval" / sample.name.replace(".nii.gz", "_seg.nii.gz")
    theirs, src = nib.load(out), nib.load(sample)
    assert theirs.shape[:3] == src.shape and np.allclose(theirs.affine, src.affine, atol=1e-4)
    assert (
        main(
            [
                "infer",
                str(root),
                "--trust-bundle",
                "--input",
                str(sample),
                "--output",
                str(tmp_path / "ours"),
                "--device",
                "cpu",
            ]
        )
        == 0
    )
    ours = nib.load(tmp_path / "ours" / sample.name.replace(".nii.gz", "_seg.nii.gz"))
    a, b = np.asarray(theirs.dataobj).reshape(src.shape), np.asarray(ours.dataobj)
    assert (a == b).mean() > 0.999, (a == b).mean()


@pytest.mark.slow
def test_monai_runner_trains_with_the_multi_gpu_overlay_under_torchrun(tmp_path):
    """``multi_gpu_train.json`` under ``torchrun -m monai.bundle run`` from the bundle's folder: two CPU
    processes (gloo), each on its own half of the training cases, ending with the same weights."""
    out, record = tmp_path / "run", tmp_path / "record"
    cmd = [
        sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
        "-m", "monai.bundle", "run", "--config_file",
        "['configs/train.json','configs/demo.json','configs/multi_gpu_train.json']",
        "--epochs", "1", "--device_name", "cpu", "--output_dir", str(out), "--batch_size", "1",
    ]  # fmt: skip
    for key, value in FEW_CASES.items():
        cmd += [f"--{key}", value]
    env = {**_env(), RECORD_ENV: str(record)}
    proc = subprocess.run(cmd, cwd=BUNDLES_DIR / "hippocampus_unet3d", env=env, capture_output=True, text=True,
                          timeout=600)  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert (out / "models" / "model.pt").is_file()
    r0, r1 = (json.loads((record / f"rank{r}.json").read_text()) for r in (0, 1))
    assert (r0["world_size"], r1["world_size"]) == (2, 2)
    assert len(r0["epochs"]["1"]) == len(r1["epochs"]["1"]) == 2 and not set(r0["epochs"]["1"]) & set(r1["epochs"]["1"])
    assert r0["weights_sha256"] == r1["weights_sha256"]


@pytest.mark.slow
@pytest.mark.parametrize("bundle", BUNDLES)
def test_monai_runner_trains_one_epoch(bundle, tmp_path):
    out = tmp_path / "run"
    cmd = [
        sys.executable,
        "-m",
        "monai.bundle",
        "run",
        "--config_file",
        "['configs/train.json','configs/demo.json']",
        "--epochs",
        "1",
        "--device_name",
        "cpu",
        "--output_dir",
        str(out),
    ]
    for key, value in FEW_CASES.items():
        cmd += [f"--{key}", value]
    proc = subprocess.run(cmd, cwd=BUNDLES_DIR / bundle, env=_env(), capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert (out / "models" / "model.pt").is_file()
    final = json.loads((out / "metrics.json").read_text())["final"]
    assert final["epoch"] == 1
    assert 0.0 <= final["val_mean_dice"] <= 1.0
    assert math.isfinite(final["val_mean_hd95"])
    # the weights fit the bundle's (demo) network
    net = bundle_parser(BUNDLES_DIR / bundle, ["inference", "demo.json"]).get_parsed_content("network_def")
    net.load_state_dict(torch.load(out / "models" / "model.pt", map_location="cpu", weights_only=True))


@pytest.mark.slow
def test_segapp_train_cli_runs_the_vnet_bundle_and_the_run_is_a_bundle(tmp_path):
    run = tmp_path / "run"
    rc = main(
        [
            "train",
            "hippocampus_vnet",
            "--manifest",
            str(SAMPLE_MANIFEST),
            "--epochs",
            "1",
            "--device",
            "cpu",
            "--config",
            "demo.json",
            "--out",
            str(run),
            "--override",
            json.dumps(FEW_CASES),
        ]
    )
    assert rc == 0
    metrics = json.loads((run / "metrics.json").read_text())
    assert [h["epoch"] for h in metrics["history"]] == [1]
    assert (run / "executed_config.json").is_file()
    # the run folder stands alone: its inference config carries the demo overlay's network
    inference = read_configs(run, ["inference"])
    assert inference["features"] == _load("hippocampus_vnet", "demo")["features"]
    assert inference["network_def"]["_target_"] == "app.networks.vnet.VNet"
    assert main(["evaluate", "--run", str(run), "--manifest", str(SAMPLE_MANIFEST), "--device", "cpu"]) == 0


# -- the sparse bundle --------------------------------------------------------------------------------
def _sparse_parser(**overrides):
    opts = {
        "device_name": "cpu",
        "manifest": str(SAMPLE_MANIFEST),
        "num_workers": 0,
        "cache_workers": 0,
        "batch_size": 2,
        **FEW_CASES,
        **overrides,
    }
    return bundle_parser(BUNDLES_DIR / SPARSE, ["train", "demo.json"], opts)


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


# The sparse card's advice for your own sparse annotations: this override skips the synthetic planes.
OWN_SPARSE_LABELS = {"train#transforms#transforms": "$@preprocessing + @train#crop + @train#augmentation"}


def test_sparse_override_for_own_annotations_drops_sparsify_and_keeps_the_labels_255s(tmp_path):
    # two training cases whose label files already mark the first 10 slices (axis 0) unlabelled (255)
    sample = json.loads(SAMPLE_MANIFEST.read_text())
    cases = [dict(c, fold=f) for c, f in zip(sample["cases"][:3], (1, 1, 0))]
    own_255 = {}
    for c in cases:
        for key in ("image", "label"):
            (tmp_path / c[key]).parent.mkdir(parents=True, exist_ok=True)
            c.pop("sha256", None)
        shutil.copy(SAMPLE_MANIFEST.parent / c["image"], tmp_path / c["image"])
        img = nib.load(SAMPLE_MANIFEST.parent / c["label"])
        lab = np.asarray(img.dataobj).copy()
        lab[:10] = IGNORE
        nib.save(nib.Nifti1Image(lab, img.affine, img.header), tmp_path / c["label"])
        own_255[c["id"]] = int((lab == IGNORE).sum())
    manifest = tmp_path / "manifest.json"
    manifest.write_text(
        json.dumps({**sample, "data_root": ".", "ignore_value": IGNORE, "num_folds": 2, "cases": cases})
    )
    big = {"manifest": str(manifest), "patch_size": [64, 64, 64]}  # larger than each crop: padded, not cropped
    parser = _sparse_parser(**big, **OWN_SPARSE_LABELS)
    steps = parser.get_parsed_content("train#transforms").transforms
    assert not any(type(t).__name__ == "SparseSlicesd" for t in steps)
    ds = parser.get_parsed_content("train#dataset")
    preprocessing = parser.get_parsed_content("preprocessing")
    assert len(ds) == 2
    for i in range(len(ds)):
        label = np.asarray(ds[i]["label"][0])
        d = {k: ds.data[i][k] for k in ("image", "label", "id")}
        for t in preprocessing:
            d = t(d)
        dense = np.asarray(d["label"][0])  # the label file after reorientation/resampling, no crop or pad
        assert int((dense == IGNORE).sum()) == own_255[ds.data[i]["id"]]  # the file's own 255s arrive
        padding = label.size - dense.size
        # every voxel of the file keeps its value (255s included); only the padding is added, as 255
        assert int((label == IGNORE).sum()) == padding + own_255[ds.data[i]["id"]]
        for v in (0, 1, 2):
            assert int((label == v).sum()) == int((dense == v).sum()) > 0, v
    # without the override the synthetic planes are still made: far fewer labelled voxels
    default = _sparse_parser(**big).get_parsed_content("train#dataset")
    assert any(type(t).__name__ == "SparseSlicesd" for t in default.transform.transforms)
    assert float((np.asarray(default[0]["label"][0]) != IGNORE).mean()) < 0.5 * float(
        (np.asarray(ds[0]["label"][0]) != IGNORE).mean()
    )


def _card_commands(bundle: str) -> list[tuple[Path, list[str]]]:
    """Each command of the card's ```bash blocks with the folder it runs in (following its ``cd``s;
    ``(cd X && ...)`` is a subshell)."""
    text = (BUNDLES_DIR / bundle / "docs" / "README.md").read_text()
    cwd, commands = REPO, []
    for block in re.findall(r"```bash\n(.*?)```", text, re.S):
        for line in block.replace("\\\n", " ").splitlines():
            line = line.strip()
            if not line or line.startswith("#"):
                continue
            subshell = line.startswith("(") and line.endswith(")")
            here = cwd
            for part in (line[1:-1] if subshell else line).split("&&"):
                argv = shlex.split(part)
                if argv[0] == "cd":
                    here = (here / argv[1]).resolve()
                else:
                    commands.append((here, argv))
            if not subshell:
                cwd = here
    assert cwd == REPO, f"the card's commands end in {cwd}, not the repository root"
    return commands


def _option(argv: list[str], name: str) -> str | None:
    return argv[argv.index(name) + 1] if name in argv else None


RUNNER_CARDS = [b for b in BUNDLES if "monai.bundle" in (BUNDLES_DIR / b / "docs" / "README.md").read_text()]


@pytest.mark.parametrize("bundle", RUNNER_CARDS)
def test_card_commands_find_their_files_from_the_folder_they_run_in(bundle):
    """The card's MONAI runner, torchrun and verify commands run from the bundle's folder, where the
    configs' ``%configs/common.json#...`` macros resolve (MONAI reads them from the working directory);
    its segapp commands run from the repository root, where their manifest is. The two verify
    commands are run as written."""
    commands = _card_commands(bundle)
    kinds = []
    for cwd, argv in commands:
        if argv[0] == "segapp":
            manifest = _option(argv, "--manifest") or ""
            # the repository's manifests (MY_MANIFEST.json and the like are the reader's own)
            assert cwd == REPO, argv
            assert not manifest.startswith("data_manifests/") or (cwd / manifest).is_file(), argv
            continue
        assert "monai.bundle" in argv, argv
        assert cwd == BUNDLES_DIR / bundle, argv
        sub = argv[argv.index("monai.bundle") + 1]
        kinds.append((argv[0], sub))
        configs = (_option(argv, "--config_file") or "").split(",")
        for name in [c for c in configs if c]:
            assert (cwd / name).is_file(), (name, argv)
            for macro in re.findall(r'"%([^"#]+)#', (cwd / name).read_text()):
                assert (cwd / macro).is_file(), (name, macro)
        meta, schema = _option(argv, "--meta_file"), _option(argv, "--filepath")
        for path in (meta, schema):
            assert path is None or (cwd / path).is_file(), (path, argv)
        with contextlib.chdir(cwd):
            if sub == "verify_metadata":
                verify_metadata(meta_file=meta, filepath=schema)
            elif sub == "verify_net_in_out":
                verify_net_in_out(argv[argv.index(sub) + 1], meta_file=meta, config_file=configs, device="cpu")
    assert sorted(kinds) == [
        ("python", "run"),
        ("python", "verify_metadata"),
        ("python", "verify_net_in_out"),
        ("torchrun", "run"),
    ]


@pytest.mark.parametrize("bundle", BUNDLES)
def test_card_case_counts_are_the_manifests(bundle):
    card = " ".join((BUNDLES_DIR / bundle / "docs" / "README.md").read_text().split())
    full = len(json.loads((REPO / "data_manifests" / "hippocampus.json").read_text())["cases"])
    counts = re.findall(r"the (\d+) (?:of them available here|labelled T1-weighted MRI crops listed in)", card)
    assert counts and {int(c) for c in counts} == {full}, counts
    if "sample_data/hippocampus/" in card:
        assert f"ships {len(json.loads(SAMPLE_MANIFEST.read_text())['cases'])} of them for the demo" in card
