"""Run a bundle's network on images and put the labels back on each image's exact source grid.

The bundle's preprocessing (orientation, spacing, normalisation) moves the image to the network
grid; instead of inverting each transform, we resample the class probabilities from the network
grid straight onto the source grid using the two affines (one interpolation, then argmax), so the
output has the input's shape and affine whatever its orientation.

Two paths give the same labels (equal, or Dice >= 0.999 where interpolation order differs; see
``tests/test_infer_fast_paths.py``):

* ``fast=True`` (default, for ``SlidingWindowInferer`` bundles): one host->device copy of the source
  image; the bundle's spatial transforms (Orientationd, Spacingd) are run *lazily* so MONAI decides
  the network grid (affine, shape) declaratively, and the image is moved there by our resampler on
  the device (separable when axis-aligned); the other transforms run as MONAI transforms on the
  device tensor; sliding-window stitching streams into a bounded buffer and is fused with the
  resampling back to the source grid and the argmax (``app.engine.stitching``); AMP and
  channels-last convolutions only on CUDA; one device->host copy of the uint8 labels.
* ``fast=False``: the bundle's MONAI transforms on the CPU, MONAI's inferer, a full softmax volume,
  ``grid_sample`` resampling of all probabilities to the source grid, then argmax.
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
from monai.transforms import Compose, EnsureChannelFirstd, LazyTrait, LoadImaged, RandomizableTrait
from monai.transforms.lazy.functional import apply_pending

from app.engine.checkpoint import load_network_weights
from app.engine.stitching import (
    WindowSpec,
    choose_stitch_device,
    estimate_stitch_bytes,
    sliding_window_labels,
    target_span,
)
from app.io.nifti import load_nifti, save_labels_nifti
from app.transforms.load import LoadCased
from app.transforms.resample import axis_aligned, is_identity, resample_to_grid, target_to_source_voxel

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
        fast: the fused device path (see the module docstring); False: the plain MONAI way.
        stitch_budget_bytes: largest stitching buffer on a CUDA device before it falls back to the CPU
            (None: 90 % of the device's free memory).
    """

    def __init__(self, network: torch.nn.Module, preprocessing, inferer, device, amp: bool = False,
                 checkpoint: str | None = None, image_key: str = "image", fast: bool = True,
                 stitch_budget_bytes: int | None = None):
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
        self.fast = bool(fast)
        self.spec = WindowSpec.from_inferer(inferer)
        self.stitch_budget_bytes = stitch_budget_bytes
        self.channels_last = self.device.type == "cuda"  # cuDNN's fast 3D convs (fp16) want NDHWC
        self.last_stats: dict = {}
        if checkpoint:
            self.load_weights(checkpoint)

    def load_weights(self, checkpoint: str | Path) -> None:
        load_network_weights(self.network, checkpoint, self.device)

    def predict_metatensor(self, image: MetaTensor, fast: bool | None = None) -> Prediction:
        """Predict labels for a channel-first MetaTensor (RAS affine) on its own voxel grid.

        ``fast`` overrides the predictor's setting for this call (the fused path needs a
        ``SlidingWindowInferer``; other inferers always take the plain path).
        """
        use_fast = self.fast if fast is None else bool(fast)
        if use_fast and self.spec is not None:
            return self._predict_fast(image)
        return self._predict_reference(image)

    def _sync(self) -> None:
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)

    @torch.no_grad()
    def _predict_fast(self, image: MetaTensor) -> Prediction:
        t0 = time.perf_counter()
        src_affine_ras = np.asarray(image.affine, dtype=np.float64)
        src_shape = tuple(int(s) for s in image.shape[1:])
        # the one host->device copy (a no-op on the CPU)
        on_dev = MetaTensor(torch.as_tensor(image.as_tensor(), dtype=torch.float32).to(self.device),
                            affine=torch.as_tensor(src_affine_ras), meta=dict(image.meta))
        net_img = self._preprocess_on_device(on_dev)
        net_affine_ras = np.asarray(net_img.affine, dtype=np.float64)
        x = net_img.as_tensor().unsqueeze(0)
        self._sync()
        t1 = time.perf_counter()
        net_shape = tuple(x.shape[2:])
        identity = is_identity(net_affine_ras, src_affine_ras, net_shape, src_shape)
        cuda = self.device.type == "cuda"

        def stitch_device(n_classes: int) -> torch.device:  # decided once the first windows tell C
            axis, span = (None, 0) if identity else target_span(net_affine_ras, src_affine_ras, net_shape, src_shape,
                                                                n_classes)
            aligned = identity or axis_aligned(target_to_source_voxel(net_affine_ras, src_affine_ras)) is not None
            est = estimate_stitch_bytes(n_classes, net_shape, self.spec.roi_size, self.spec.overlap,
                                        None if identity else src_shape, span=span, axis=axis,
                                        acc_bytes=2 if cuda else 4, in_channels=x.shape[1],
                                        sw_batch_size=self.spec.sw_batch_size,
                                        cells=aligned and n_classes <= 255)["streamed"]
            self.last_stats["estimated_bytes"] = est
            return choose_stitch_device(est, self.device, self.stitch_budget_bytes)

        if self.channels_last and cuda:
            self.network.to(memory_format=torch.channels_last_3d)
        stats: dict = {}
        target = {} if identity else {"affine_net": net_affine_ras, "affine_dst": src_affine_ras,
                                      "dst_shape": src_shape}
        self.last_stats = {"net_shape": list(net_shape)}
        labels = sliding_window_labels(x, self.network, self.spec, stitch_device=stitch_device, amp=self.amp,
                                       channels_last=self.channels_last and cuda, stats=stats, **target)
        labels_np = labels.cpu().numpy()  # the one device->host copy (uint8)
        if labels_np.dtype != np.uint8 and labels_np.max() < 256:
            labels_np = labels_np.astype(np.uint8)
        t2 = time.perf_counter()
        self.last_stats.update(stats)
        stitch_s = max(0.0, t2 - t1 - stats["network_s"] - stats["resample_s"])
        return Prediction(labels_np, src_affine_ras, {"preprocess_s": t1 - t0, "network_s": stats["network_s"],
                                                      "stitch_s": stitch_s, "postprocess_s": stats["resample_s"]})

    def _preprocess_on_device(self, image: MetaTensor) -> MetaTensor:
        """The bundle's preprocessing on the device: spatial transforms lazily, then one resampling."""
        data = {self.image_key: image}
        for t in self.core.transforms:
            if isinstance(t, LazyTrait) and not isinstance(t, RandomizableTrait):
                data = t(data, lazy=True)  # only records the geometry: MONAI decides the network grid
                continue
            data[self.image_key] = materialise(data[self.image_key])
            data = t(data)
        return materialise(data[self.image_key])

    @torch.no_grad()
    def _predict_reference(self, image: MetaTensor) -> Prediction:
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
            probs = resample_to_grid(probs, net_affine, src_affine, src_shape, mode="bilinear", slab=64,
                                     method="grid_sample")
        labels = torch.argmax(probs, dim=0).to(torch.uint8).cpu().numpy()
        t3 = time.perf_counter()
        return Prediction(labels, src_affine, {"preprocess_s": t1 - t0, "network_s": t2 - t1, "postprocess_s": t3 - t2})

    def predict_file(self, path: str | Path) -> Prediction:
        """Load a NIfTI (or any MONAI-readable image) and predict on its grid."""
        return self.predict_metatensor(load_image_metatensor(path))


_RESAMPLE_OPS = ("Orientation", "SpatialResample", "Spacing")


def materialise(img: MetaTensor) -> MetaTensor:
    """Apply a MetaTensor's pending (lazy) spatial operations in one resampling on its device.

    Orientation/Spacing with bilinear or nearest interpolation go through our resampler
    (``resample_to_grid``: separable when the grids are axis-aligned) from the current affine to
    the pending one; anything else (crops, pads, spline orders) through MONAI's ``apply_pending``.
    """
    ops = getattr(img, "pending_operations", [])
    if not ops:
        return img
    modes = {(op.get("extra_info") or {}).get("mode", "bilinear") for op in ops}
    pads = {(op.get("extra_info") or {}).get("padding_mode", "border") for op in ops}
    mode, pad = str(next(iter(modes))), str(next(iter(pads)))
    if (any(str(op.get("class")) not in _RESAMPLE_OPS for op in ops) or len(modes) > 1 or len(pads) > 1
            or mode not in ("bilinear", "nearest") or pad not in ("zeros", "border", "reflection")):
        return apply_pending(img)[0]
    src_affine = np.asarray(img.affine, dtype=np.float64)
    dst_affine = np.asarray(img.peek_pending_affine(), dtype=np.float64)
    dst_shape = tuple(int(s) for s in img.peek_pending_shape())
    data = img.as_tensor()
    if not is_identity(src_affine, dst_affine, data.shape[1:], dst_shape):
        data = resample_to_grid(data, src_affine, dst_affine, dst_shape, mode=mode, padding_mode=pad)
    meta = {k: v for k, v in img.meta.items() if k != "affine"}
    return MetaTensor(data, affine=torch.as_tensor(dst_affine), meta=meta)


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
