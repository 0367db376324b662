"""The planner: patch, batch and U-Net depth/width in a memory budget, and a training run that uses the plan."""

from __future__ import annotations

import contextlib
import json
import math

import pytest
import torch
from conftest import REPO, SAMPLE_MANIFEST
from monai.bundle import ConfigParser

from app.errors import ConfigError
from app.networks.unet3d import UNet3D
from app.planning import plan_from_manifest
from app.planning.planner import GIB, _unet_params, estimate_training_bytes, plan_network
from app.training.train import train

HIPPO_MEDIAN = [35.0, 50.0, 36.0]  # MSD Task04 at 1 mm (voxels)


def test_a_large_budget_gets_nnunets_patch_and_a_batch_capped_at_five_percent_of_the_data():
    big = plan_network(HIPPO_MEDIAN, 208, 80 * GIB, num_classes=3)
    assert big.patch_size == [40, 56, 40] and big.pools == 3  # 35 / 2^3 >= 4 voxels, rounded up to 8
    assert big.features == [32, 64, 128, 160]  # 32 doubling per level, second convolution capped at 320
    # 5 % of 208 cases of 35 x 50 x 36 voxels in one step
    assert big.batch_size == big.batch_cap_5_percent == int(0.05 * 208 * math.prod(HIPPO_MEDIAN) / (40 * 56 * 40))
    assert big.estimated_bytes <= big.budget_bytes


def test_a_tiny_budget_shrinks_the_patch_then_the_width_and_keeps_batch_two():
    big = plan_network(HIPPO_MEDIAN, 208, 8 * GIB, num_classes=3)
    small = plan_network(HIPPO_MEDIAN, 208, int(0.3 * GIB), num_classes=3, activation_bytes=4)
    tiny = plan_network(HIPPO_MEDIAN, 208, int(0.04 * GIB), num_classes=3, activation_bytes=4)
    for p in (big, small, tiny):
        assert p.estimated_bytes <= p.budget_bytes and p.batch_size >= 2
        assert all(s % 2**p.pools == 0 for s in p.patch_size) and len(p.features) == p.pools + 1
    assert math.prod(small.patch_size) < math.prod(big.patch_size) and small.features[0] == 32
    assert tiny.features[0] < 32 and tiny.batch_size == 2  # no patch of a quarter of the median fits at 32
    assert math.prod(tiny.patch_size) >= 0.25 * math.prod(HIPPO_MEDIAN)
    # between them, more memory never gives a smaller step (patch voxels x batch)
    steps = [
        math.prod(p.patch_size) * p.batch_size * p.features[0]
        for p in (plan_network(HIPPO_MEDIAN, 208, int(g * GIB), num_classes=3) for g in (0.1, 0.5, 1, 2, 4))
    ]
    assert steps == sorted(steps)
    with pytest.raises(ConfigError, match="--gpu-memory.*does not fit"):
        plan_network(HIPPO_MEDIAN, 208, 10 * 2**20, num_classes=3)


def test_estimate_counts_the_real_parameters_and_grows_with_batch_and_patch():
    for feats, ds in (([4, 8, 16, 32], True), ([32, 64, 128], False)):
        net = UNet3D(1, 3, feats, norm="instance", deep_supervision=ds)
        assert _unet_params(1, 3, feats, ds) == sum(p.numel() for p in net.parameters())
    one = estimate_training_bytes([40, 56, 40], 1, [8, 16, 32, 64], num_classes=3)
    two = estimate_training_bytes([40, 56, 40], 2, [8, 16, 32, 64], num_classes=3)
    weights = estimate_training_bytes([8, 8, 8], 0, [8, 16, 32, 64], num_classes=3)
    assert two - weights == pytest.approx(2 * (one - weights), rel=1e-6)  # activations per patch
    assert estimate_training_bytes([80, 56, 40], 1, [8, 16, 32, 64], num_classes=3) > one
    amp = estimate_training_bytes([40, 56, 40], 2, [8, 16, 32, 64], num_classes=3, activation_bytes=2)
    assert amp < two


def test_the_training_run_uses_the_plan_and_so_does_monais_runner(tmp_path):
    plan_file = tmp_path / "plan.json"
    plan = plan_from_manifest(
        SAMPLE_MANIFEST, plan_file, gpu_memory_gb=0.03, base_features=4, amp=False, max_voxels_per_case=500
    )
    assert plan["batch_size"] == 2 and plan["features"][0] == 4
    assert plan["patch_size"] != [48, 64, 48]  # not the bundle's own
    few = {
        "train#dataset#data": "$app.data.manifest.fold_datalist(@manifest, @fold, 'train', max_cases=4)",
        "validate#dataset#data": "$app.data.manifest.fold_datalist(@manifest, @fold, 'val', max_cases=2)",
        "num_workers": 0,
        "cache_workers": 0,
    }
    out = tmp_path / "run"
    train(
        "hippocampus_unet3d", str(SAMPLE_MANIFEST), epochs=1, device="cpu", output_dir=str(out), overrides=few,
        plan=str(plan_file),
    )  # fmt: skip
    executed = json.loads((out / "executed_config.json").read_text())
    for key in ("patch_size", "batch_size", "features", "target_spacing"):
        assert executed[key] == plan[key], key
    norm = executed["preprocessing"][-1]
    assert norm["_target_"].endswith("NormalizeFromPland") and norm["plan"]["normalization"] == plan["normalization"]
    run_infer = json.loads((out / "configs" / "inference.json").read_text())
    assert run_infer["patch_size"] == plan["patch_size"] and run_infer["features"] == plan["features"]
    assert run_infer["preprocessing"]["transforms"][-1]["_target_"].endswith("NormalizeFromPland")
    net = ConfigParser(run_infer).get_parsed_content("network_def")
    state = torch.load(out / "models" / "model.pt", weights_only=True)
    net.load_state_dict(state)  # the run's model has the plan's depth and width
    # MONAI's runner with the plan as an extra config file (from the bundle's folder, as the model zoo runs)
    with contextlib.chdir(REPO / "bundles" / "hippocampus_unet3d"):
        parser = ConfigParser()
        parser.read_config(["configs/train.json", str(plan_file)])
        assert parser.get_parsed_content("batch_size") == plan["batch_size"]
        assert parser.get_parsed_content("network_def").encoders[0][0].conv.out_channels == plan["features"][0]
        assert parser.get_parsed_content("patch_size") == plan["patch_size"]
        assert parser.get_parsed_content("preprocessing")[-1].normalizer.entries == plan["normalization"]


def test_a_plan_on_a_network_that_is_not_unet3d_keeps_its_own_network_and_patch(tmp_path):
    plan_file = tmp_path / "plan.json"
    plan = plan_from_manifest(SAMPLE_MANIFEST, plan_file, gpu_memory_gb=2, max_voxels_per_case=500)
    assert plan["patch_size"] == [40, 56, 40]  # not divisible by 16, as VNet depth 4 needs
    few = {
        "train#dataset#data": "$app.data.manifest.fold_datalist(@manifest, @fold, 'train', max_cases=2)",
        "validate#dataset#data": "$app.data.manifest.fold_datalist(@manifest, @fold, 'val', max_cases=1)",
        "num_workers": 0,
        "cache_workers": 0,
        "features": 4,
    }
    out = tmp_path / "run"
    train("hippocampus_vnet", str(SAMPLE_MANIFEST), epochs=1, device="cpu", output_dir=str(out), overrides=few,
          plan=str(plan_file))  # fmt: skip
    executed = json.loads((out / "executed_config.json").read_text())
    assert executed["patch_size"] == [48, 64, 48] and executed["features"] == 4
    assert executed["batch_size"] == plan["batch_size"] and executed["preprocessing"][-1]["_target_"].endswith(
        "NormalizeFromPland"
    )


def test_the_plan_cli_writes_its_options_into_the_plan_and_defaults_next_to_the_manifest(tmp_path, capsys, monkeypatch):
    from app.cli import main

    # a copy of the sample manifest (its data where it is), so the default plan.json lands in tmp_path
    doc = json.loads(SAMPLE_MANIFEST.read_text())
    manifest = tmp_path / "data" / "manifest.json"
    manifest.parent.mkdir()
    manifest.write_text(json.dumps({**doc, "data_root": str(SAMPLE_MANIFEST.parent)}))
    out = tmp_path / "my_plan.json"
    argv = ["plan", "--manifest", str(manifest), "--gpu-memory", "0.03", "--base-features", "4", "--float32"]
    assert main([*argv, "--output", str(out)]) == 0
    printed = json.loads(capsys.readouterr().out)  # the plan, as JSON on stdout
    written = json.loads(out.read_text())
    assert written["batch_size"] == 2 and written["features"][0] == 4
    net = written["plan"]["network"]
    assert net["amp"] is False  # --float32
    assert net["budget_gib"] == 0.03 and net["estimated_gib"] <= 0.03  # --gpu-memory
    assert printed["patch_size"] == written["patch_size"] and printed["network"]["amp"] is False
    assert not (manifest.parent / "plan.json").exists()
    # without --output: plan.json next to the manifest (not in the working directory)
    cwd = tmp_path / "cwd"
    cwd.mkdir()
    monkeypatch.chdir(cwd)
    assert main(argv) == 0
    beside = manifest.parent / "plan.json"
    assert json.loads(beside.read_text()) == written
    assert not list(cwd.iterdir())


def test_a_budget_that_is_not_positive_is_one_line_in_gib(tmp_path, capsys):
    from app.cli import main

    rc = main(["plan", "--manifest", str(SAMPLE_MANIFEST), "--gpu-memory", "-1", "--output", str(tmp_path / "p.json")])
    assert rc == 2
    assert capsys.readouterr().err.strip().splitlines()[-1] == (
        "segapp: error: --gpu-memory: the memory budget must be positive, got -1 GiB"
    )
    assert not (tmp_path / "p.json").exists()
