"""Bundles segapp cannot feed (several input channels, 2D input) are refused in one line before any of
their code runs (even with ``--trust-bundle``): a payload in the network definition would leave a marker."""

from __future__ import annotations

import json

import pytest
from conftest import REPO
from zoo_bundles import copy_spleen, write_json

from app.cli import main

SAMPLE = REPO / "bundles" / "hippocampus_unet3d" / "sample" / "hippocampus_003.nii.gz"


@pytest.mark.parametrize(
    "change,file,why",
    [
        ("meta_channels", "metadata.json", "this bundle needs 4 input channels"),
        ("meta_2d", "metadata.json", "this bundle is a 2D model (spatial_shape has 2 axes)"),
        ("net_2d", "inference.json", "this bundle is a 2D model (network_def spatial_dims 2)"),
        ("net_channels", "inference.json", "this bundle's network takes 4 input channels"),
    ],
)
def test_multichannel_or_2d_bundles_are_refused_before_their_code_runs(tmp_path, capsys, change, file, why):
    root = copy_spleen(tmp_path / "bundle")
    marker = tmp_path / "ran"
    inference, metadata = root / "configs" / "inference.json", root / "configs" / "metadata.json"
    cfg, meta = json.loads(inference.read_text()), json.loads(metadata.read_text())
    image = meta["network_data_format"]["inputs"]["image"]
    cfg["network_def"]["out_channels"] = f"$open({str(marker)!r}, 'a').close() or 2"
    if change == "meta_channels":
        image["num_channels"] = 4
    elif change == "meta_2d":
        image["spatial_shape"] = [96, 96]
    elif change == "net_2d":  # a metadata that does not say it; the network definition does
        del image["spatial_shape"]
        cfg["network_def"]["spatial_dims"] = 2
    else:
        del image["num_channels"]
        cfg["network_def"]["in_channels"] = 4
    write_json(inference, cfg)
    write_json(metadata, meta)
    (root / "models").mkdir()
    (root / "models" / "model.pt").write_bytes(b"")  # never read
    out = tmp_path / "out"
    args = ["infer", str(root), "--input", str(SAMPLE), "--output", str(out), "--device", "cpu", "--trust-bundle"]
    assert main(args) == 2
    err = capsys.readouterr().err
    assert "Traceback" not in err
    (line,) = [ln for ln in err.splitlines() if ln.startswith("segapp: error:")]
    assert str(root / "configs" / file) in line and why in line
    assert not marker.exists() and not out.exists()
