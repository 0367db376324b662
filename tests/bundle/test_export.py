"""``segapp export``: TorchScript and ONNX files of the shipped UNet3D and VNet bundles at their demo sizes
give the network's output (ONNX checked with onnxruntime, also at another batch and spatial size)."""

from __future__ import annotations

import json
import sys
import zipfile
from pathlib import Path

import numpy as np
import onnx
import pytest
import torch
from runs import tiny_run

from app.bundle.export import example_shape, run_exported
from app.bundle.model import load_model
from app.bundle.store import find_bundle
from app.cli import main

BUNDLES = ("hippocampus_unet3d", "hippocampus_vnet")


def _demo_run(folder: Path, bundle: str) -> Path:
    """A run folder with the bundle's demo overlay and its demo network size (random weights)."""
    demo = json.loads((find_bundle(bundle).root / "configs" / "demo.json").read_text())
    return tiny_run(folder, bundle, overrides={k: demo[k] for k in ("features", "depth") if k in demo}, seed=3)


@pytest.fixture(scope="module", params=BUNDLES)
def demo_run(request, tmp_path_factory) -> Path:
    return _demo_run(tmp_path_factory.mktemp(request.param), request.param)


def _network_and_shape(run: Path) -> tuple[torch.nn.Module, tuple[int, ...]]:
    model = load_model(run=run, device="cpu")
    return model.network, example_shape(model)


def _compare(run: Path, path: Path, shapes: list[tuple[int, ...]]) -> None:
    net, _ = _network_and_shape(run)
    gen = torch.Generator().manual_seed(11)
    for shape in shapes:
        x = torch.randn(shape, generator=gen)
        with torch.no_grad():
            expected = net(x).numpy()
        got = run_exported(path, x)
        assert got.shape == expected.shape == (shape[0], 3, *shape[2:])
        np.testing.assert_allclose(got, expected, rtol=1e-4, atol=1e-4)
        assert np.abs(expected).max() > 1e-3  # a real output, not zeros on both sides


def test_torchscript_export_matches_the_network(demo_run, tmp_path, capsys):
    out = tmp_path / "model.ts"
    assert main(["export", "--run", str(demo_run), "--format", "torchscript", "--output", str(out)]) == 0
    _, shape = _network_and_shape(demo_run)
    assert shape == (1, 1, 32, 32, 32)  # the demo patch (the inferer's roi_size)
    assert "torchscript (script)" in capsys.readouterr().out
    _compare(demo_run, out, [shape])
    # MONAI's ckpt_export layout: the bundle's metadata and inference config travel in the file
    names = zipfile.ZipFile(out).namelist()
    meta = next(n for n in names if n.endswith("extra/metadata.json"))
    assert (
        json.loads(zipfile.ZipFile(out).read(meta))["name"]
        == json.loads((demo_run / "configs" / "metadata.json").read_text())["name"]
    )
    assert any(n.endswith("extra/inference.json") for n in names)
    assert not list(tmp_path.glob(".*tmp*"))  # the temporary file was renamed, nothing left behind


@pytest.mark.slow
def test_onnx_export_matches_the_network_in_onnxruntime(demo_run, tmp_path, capsys):
    out = tmp_path / "model.onnx"
    assert main(["export", "--run", str(demo_run), "--format", "onnx", "--output", str(out)]) == 0
    assert "onnx (dynamic)" in capsys.readouterr().out
    _, shape = _network_and_shape(demo_run)
    # dynamic axes: another batch size and an anisotropic size (multiples of 8: both demo networks accept them)
    _compare(demo_run, out, [shape, (2, 1, 48, 32, 24)])
    props = {p.key: p.value for p in onnx.load(str(out)).metadata_props}
    assert json.loads(props["segapp.labels"]) == {"0": "background", "1": "anterior", "2": "posterior"}
    assert json.loads(props["segapp.example_input_shape"]) == list(shape)


def test_export_errors_are_one_line(tmp_path, capsys, monkeypatch):
    # a shipped bundle has no weights
    assert main(["export", "hippocampus_unet3d", "--format", "torchscript", "--output", str(tmp_path / "a.ts")]) != 0
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "checkpoint not found" in err
    # without the [onnx] extra (onnxruntime made unimportable for this test)
    monkeypatch.setitem(sys.modules, "onnxruntime", None)
    run = tiny_run(tmp_path / "run")
    assert main(["export", "--run", str(run), "--format", "onnx", "--output", str(tmp_path / "a.onnx")]) != 0
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "segapp[onnx]" in err and "onnxruntime" in err
    assert not (tmp_path / "a.onnx").exists() and not (tmp_path / "a.ts").exists()
