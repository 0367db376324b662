"""Third-party (model-zoo layout) bundles for tests: copies of the shipped zoo configs, bundles written
in a test, seeded weights with structure, and MONAI's own runner as the reference.

No zoo weights can be downloaded here. A bundle's own ``network_def`` with a fixed seed computes the
same function under segapp and under MONAI's runner, so comparing the two outputs tests everything
between the image and the labels (reading, preprocessing, sliding window, the way back to the source
grid, postprocessing). A random network's two-class output is often (nearly) constant, which would
make that comparison empty; :func:`seeded_weights` therefore shifts the final layer's biases
deterministically (by the median logit differences over one window of the real, preprocessed input)
so that every class holds a real share of the voxels and the label boundaries follow the image.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import torch

REPO = Path(__file__).resolve().parents[2]
ZOO = REPO / "tests" / "data" / "monai_model_zoo"
SPLEEN = ZOO / "spleen_ct_segmentation"
CT_SERIES = REPO / "tests" / "data" / "totalseg_example" / "ct_dicom"
MR_STUDY = REPO / "tests" / "data" / "mr_dicom_study_mixed"
MR_T1_UID = "1.3.6.1.4.1.14519.5.2.1.4429.7055.218863660497214413989986622014"  # T1post, 4 oblique slices


def copy_spleen(dst: Path) -> Path:
    """A writable copy of the model zoo's spleen_ct_segmentation (configs, metadata, licence)."""
    shutil.copytree(SPLEEN, dst)
    return dst


def write_json(path: Path, obj: dict) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(obj, indent=4, ensure_ascii=False) + "\n")
    return path


def write_bundle(root: Path, inference: dict, metadata: dict, extra: dict | None = None) -> Path:
    """A bundle folder in the model zoo's layout: configs/inference.json, configs/metadata.json (+ extra files)."""
    write_json(root / "configs" / "inference.json", inference)
    write_json(root / "configs" / "metadata.json", metadata)
    for name, obj in (extra or {}).items():
        write_json(root / name, obj)
    return root


def series_to_nifti(series: Path, out_file: Path, series_uid: str | None = None) -> Path:
    """The DICOM series as NIfTI, written by segapp's own reader (``read_series`` -> ``save_nifti``):
    the same voxels and RAS affine that ``segapp infer`` sees, for MONAI's runner to read."""
    from app.io.dicom_series import read_series
    from app.io.nifti import save_nifti

    volume = read_series(series, series_uid=series_uid)
    return save_nifti(volume.array, volume.affine_ras, out_file)


def _final_conv(net: torch.nn.Module, n_classes: int) -> torch.nn.Module:
    last = None
    for module in net.modules():
        if isinstance(module, (torch.nn.Conv3d, torch.nn.ConvTranspose3d)) and module.out_channels == n_classes:
            if module.bias is not None:
                last = module
    assert last is not None, "no final convolution with a bias"
    return last


def central_window(image: torch.Tensor, roi) -> torch.Tensor:
    """(1, 1, *roi) crop around the centre of a (1, I, J, K) image, zero padded where it is smaller."""
    x = torch.as_tensor(image)[None].float()
    for d, r in enumerate(roi):
        n = x.shape[2 + d]
        if n > r:
            s = (n - r) // 2
            x = x.narrow(2 + d, s, r)
        elif n < r:
            pad = [0, 0] * 3
            pad[2 * (2 - d)], pad[2 * (2 - d) + 1] = (r - n) // 2, r - n - (r - n) // 2
            x = torch.nn.functional.pad(x, pad)
    return x


@torch.no_grad()
def seeded_weights(root: Path, seed: int, sample: torch.Tensor | None = None, roi=None) -> dict:
    """Build the bundle's ``network_def`` (seed ``seed``), give its output structure, save ``models/model.pt``.

    With ``sample`` (a preprocessed (1, I, J, K) image on the network grid) the final convolution's
    bias of each class ``c >= 1`` is lowered by the median of ``logit_c - logit_0`` over the central
    ``roi`` window, so each class wins over background on about half of that window. Returns the class
    shares in that window after the shift (``{}`` without ``sample``).
    """
    from app.bundle.config import bundle_parser

    torch.manual_seed(seed)
    net = bundle_parser(root, ["inference"]).get_parsed_content("network_def").eval()
    shares: dict = {}
    if sample is not None:
        x = central_window(sample, roi)
        logits = net(x)[0]
        conv = _final_conv(net, logits.shape[0])
        for c in range(1, logits.shape[0]):
            conv.bias[c] -= torch.median(logits[c] - logits[0])
        labels = net(x)[0].argmax(0)
        shares = {c: float((labels == c).float().mean()) for c in range(logits.shape[0])}
    (root / "models").mkdir(exist_ok=True)
    torch.save(net.state_dict(), root / "models" / "model.pt")
    return shares


def runner_env() -> dict:
    """Environment of a subprocess running MONAI's runner: the worktree's app and the test helpers importable."""
    path = os.pathsep.join([str(REPO), str(REPO / "tests" / "helpers"), os.environ.get("PYTHONPATH", "")])
    return {**os.environ, "SEGAPP_NO_PROGRESS": "1", "PYTHONPATH": path, "CUDA_VISIBLE_DEVICES": ""}


def monai_run(root: Path, *args: str, timeout: int = 900) -> subprocess.CompletedProcess:
    """``python -m monai.bundle run --config_file configs/inference.json ARGS`` from the bundle's folder (CPU)."""
    cmd = [sys.executable, "-m", "monai.bundle", "run", "--config_file", "configs/inference.json", *args]
    proc = subprocess.run(cmd, cwd=root, env=runner_env(), capture_output=True, text=True, timeout=timeout)
    assert proc.returncode == 0, proc.stderr[-4000:]
    return proc


def dice(a: np.ndarray, b: np.ndarray, label: int) -> float:
    x, y = a == label, b == label
    denom = int(x.sum()) + int(y.sum())
    return 1.0 if denom == 0 else 2.0 * float((x & y).sum()) / denom


def small_spleen(dst: Path, seed: int = 0) -> Path:
    """The zoo's spleen bundle with a small UNet (channels 4, 8; one residual unit) and seeded weights:
    the zoo's layout, configs and code, at a cost of seconds on a CPU."""
    root = copy_spleen(dst)
    path = root / "configs" / "inference.json"
    cfg = json.loads(path.read_text())
    cfg["network_def"].update(channels=[4, 8], strides=[2], num_res_units=1)
    write_json(path, cfg)
    seeded_weights(root, seed)
    return root
