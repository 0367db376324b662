"""Run a bundle's network on images and put the labels back on each image's exact source grid.

The bundle's preprocessing (orientation, spacing, normalisation) moves the image to the network
grid; instead of inverting each transform, we resample the class probabilities from the network
grid straight onto the source grid using the two affines (one interpolation, then argmax), so the
output has the input's shape and affine whatever its orientation.
"""

from __future__ import annotations

import logging
import time
from contextlib import nullcontext
from dataclasses import dataclass, field
from pathlib import Path
from typing import Sequence

import numpy as np
import torch
from monai.data import MetaTensor
from monai.transforms import Compose, EnsureChannelFirstd, LoadImaged

from app.engine.checkpoint import load_network_weights
from app.io.nifti import load_nifti, save_labels_nifti
from app.transforms.load import LoadCased
from app.transforms.resample import is_identity, resample_to_grid

log = logging.getLogger(__name__)

NIFTI_SUFFIXES = (".nii", ".nii.gz")


@dataclass
class Prediction:
    """Labels on the source grid: ``labels[i, j, k]`` with the source's RAS affine."""

    labels: np.ndarray
    affine_ras: np.ndarray
    timings: dict = field(default_factory=dict)


class BundlePredictor:
    """Sliding-window prediction with a bundle's network, preprocessing and inferer.

    Args:
        network: the bundle's network (already on ``device``).
        preprocessing: the bundle's preprocessing transforms (a list or Compose); loader transforms
            (LoadImaged / EnsureChannelFirstd) are skipped when an in-memory image is given.
        inferer: a MONAI inferer (SlidingWindowInferer).
        device: torch device.
        amp: autocast on CUDA.
        checkpoint: weights to load (``model.pt`` state dict or a training checkpoint).
        image_key: the image key the transforms use.
    """

    def __init__(self, network: torch.nn.Module, preprocessing, inferer, device, amp: bool = False,
                 checkpoint: str | None = None, image_key: str = "image"):
        self.network = network.eval()
        transforms = list(preprocessing.transforms if isinstance(preprocessing, Compose) else preprocessing)
        self.loaders = [t for t in transforms if isinstance(t, (LoadImaged, EnsureChannelFirstd, LoadCased))]
        self.core = Compose([t for t in transforms if t not in self.loaders], map_items=False)
        for t in self.core.transforms:  # label keys may be configured for training: not needed here
            if hasattr(t, "allow_missing_keys"):
                t.allow_missing_keys = True
        self.inferer = inferer
        self.device = torch.device(device)
        self.amp = bool(amp) and self.device.type == "cuda"
        self.image_key = image_key
        if checkpoint:
            self.load_weights(checkpoint)

    def load_weights(self, checkpoint: str | Path) -> None:
        load_network_weights(self.network, checkpoint, self.device)

    @torch.no_grad()
    def predict_metatensor(self, image: MetaTensor) -> Prediction:
        """Predict labels for a channel-first MetaTensor (RAS affine) on its own grid."""
        t0 = time.perf_counter()
        src_affine = np.asarray(image.affine, dtype=np.float64)
        src_shape = tuple(image.shape[1:])
        data = self.core({self.image_key: image})
        net_img = data[self.image_key]
        net_affine = np.asarray(net_img.affine, dtype=np.float64)
        x = torch.as_tensor(net_img).unsqueeze(0).to(self.device, non_blocking=True)
        t1 = time.perf_counter()
        ctx = torch.autocast(self.device.type, dtype=torch.float16) if self.amp else nullcontext()
        with ctx:
            logits = self.inferer(x, self.network)
        probs = torch.softmax(logits.float(), dim=1)[0]
        if self.device.type == "cuda":
            torch.cuda.synchronize()
        t2 = time.perf_counter()
        if not is_identity(net_affine, src_affine, probs.shape[1:], src_shape):
            probs = resample_to_grid(probs, net_affine, src_affine, src_shape, mode="bilinear", slab=64)
        labels = torch.argmax(probs, dim=0).to(torch.uint8).cpu().numpy()
        t3 = time.perf_counter()
        return Prediction(labels, src_affine, {"preprocess_s": t1 - t0, "network_s": t2 - t1, "postprocess_s": t3 - t2})

    def predict_file(self, path: str | Path) -> Prediction:
        """Load a NIfTI (or any MONAI-readable image) and predict on its grid."""
        return self.predict_metatensor(load_image_metatensor(path))


def load_image_metatensor(path: str | Path) -> MetaTensor:
    """A NIfTI image as a channel-first MetaTensor carrying the file's own voxel->RAS affine."""
    array, affine_ras = load_nifti(path)
    if array.ndim == 4:  # channels last in NIfTI
        array = np.moveaxis(array, -1, 0)
    elif array.ndim == 3:
        array = array[None]
    return MetaTensor(torch.as_tensor(np.asarray(array, dtype=np.float32)), affine=torch.as_tensor(affine_ras),
                      meta={"filename_or_obj": str(path), "space": "RAS"})


def find_nifti_inputs(path: str | Path) -> list[Path]:
    """A NIfTI file, or every NIfTI file in a folder (sorted)."""
    p = Path(path)
    if p.is_file():
        return [p]
    return sorted(f for f in p.rglob("*") if f.is_file() and f.name.endswith(NIFTI_SUFFIXES))


def output_stem(path: Path) -> str:
    name = path.name
    for suffix in NIFTI_SUFFIXES:
        if name.endswith(suffix):
            return name[: -len(suffix)]
    return path.stem


def predict_paths(predictor: BundlePredictor, inputs: Sequence[str | Path] | str, output_dir: str | Path) -> list[Path]:
    """Predict every NIfTI input and write ``<stem>_seg.nii.gz`` (source grid) and a PNG overlay."""
    from app.viz.overlay import save_overlay_png

    files = find_nifti_inputs(inputs) if isinstance(inputs, (str, Path)) else [Path(p) for p in inputs]
    out = []
    for f in files:
        image = load_image_metatensor(f)
        pred = predictor.predict_metatensor(image)
        target = Path(output_dir) / f"{output_stem(f)}_seg.nii.gz"
        save_labels_nifti(pred.labels, pred.affine_ras, target)
        save_overlay_png(image[0].numpy(), pred.labels, Path(output_dir) / f"{output_stem(f)}_overlay.png")
        log.info("%s -> %s (%s)", f.name, target, ", ".join(f"{k} {v:.2f}" for k, v in pred.timings.items()))
        out.append(target)
    return out
