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
  resampling back to the source grid and the argmax (``app.inference.stitching``); AMP and
  channels-last convolutions only on CUDA; one device->host copy of the uint8 labels.
* ``fast=False`` (and wherever the bundle's postprocessing asks for it, see
  ``app.inference.postprocess``): MONAI's own way: the bundle's transforms, its inferer, and its
  postprocessing (``Invertd`` back to the source grid, argmax, label operations) without its writers;
  a bundle without ``Invertd`` gets the probabilities resampled to the source grid with ``grid_sample``.

Both paths resample back with the padding mode of the bundle's ``Spacingd`` (MONAI's default
``border``), as ``Invertd`` does (the probabilities, or the logits when the bundle's softmax does not
come before its ``Invertd``), and run the bundle's label operations (e.g. keep the largest connected
component) on the source grid after the argmax. What the fused path cannot reproduce (a crop in the
preprocessing, see :func:`inverse_note`; postprocessing steps, see ``app.inference.postprocess``)
takes the plain path.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from contextlib import nullcontext
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from monai.data import MetaTensor
from monai.transforms import Compose, EnsureChannelFirstd, LazyTrait, LoadImaged, RandomizableTrait
from monai.transforms.lazy.functional import apply_pending

from app.inference.postprocess import PostPlan, plan_postprocessing
from app.inference.resample import axis_aligned, is_identity, resample_to_grid, target_to_source_voxel
from app.inference.stitching import (
    WindowSpec,
    choose_stitch_device,
    estimate_stitch_bytes,
    sliding_window_labels,
    target_span,
)
from app.io.nifti import load_nifti
from app.runtime.heap import retained_heap
from app.transforms.load import LoadCased

log = logging.getLogger(__name__)

LOADERS = (LoadImaged, EnsureChannelFirstd, LoadCased)


@dataclass
class Prediction:
    """Labels on the source grid: ``labels[i, j, k]`` (uint8) with the source's RAS affine.

    ``path`` says which path made them (``fast`` | ``plain``) and ``note`` why the plain one, if so.
    """

    labels: np.ndarray
    affine_ras: np.ndarray
    timings: dict = field(default_factory=dict)
    path: str = "fast"
    note: str = ""


class BundlePredictor:
    """Sliding-window prediction with a bundle's network, preprocessing, inferer and postprocessing.

    Args:
        network: the bundle's network with its weights, on ``device``.
        preprocessing: the bundle's preprocessing transforms (a list or Compose); its loader transforms
            (LoadImaged / EnsureChannelFirstd / LoadCased) are skipped: images come in memory.
        inferer: a MONAI inferer (``SlidingWindowInferer`` for the fast path).
        device: torch device.
        amp: autocast on CUDA.
        postprocessing: the bundle's postprocessing (a Compose, a list or None), see
            ``app.inference.postprocess``.
        image_key: the image key the transforms use.
        fast: the fused device path where the bundle allows it; False: always MONAI's plain way.
        stitch_budget_bytes: largest stitching buffer on a CUDA device before it falls back to the CPU
            (None: 90 % of the device's free memory).
    """

    def __init__(
        self,
        network: torch.nn.Module,
        preprocessing,
        inferer,
        device,
        amp: bool = False,
        postprocessing=None,
        image_key: str = "image",
        fast: bool = True,
        stitch_budget_bytes: int | None = None,
        where: str = "postprocessing",
    ):
        self.network = network.eval()
        transforms = list(preprocessing.flatten().transforms if isinstance(preprocessing, Compose) else preprocessing)
        self.full_preprocessing = preprocessing if isinstance(preprocessing, Compose) else Compose(transforms)
        self.core = Compose([t for t in transforms if not isinstance(t, LOADERS)], map_items=False)
        for t in self.core.transforms:  # label keys may be configured for training: not needed here
            if hasattr(t, "allow_missing_keys"):
                t.allow_missing_keys = True
        self.inferer = inferer
        self.device = torch.device(device)
        self.amp = bool(amp) and self.device.type == "cuda"
        self.image_key = image_key
        self.post: PostPlan = plan_postprocessing(postprocessing, where)
        self.fast = bool(fast)
        self.spec = WindowSpec.from_inferer(inferer)
        self.stitch_budget_bytes = stitch_budget_bytes
        self.channels_last = self.device.type == "cuda"  # cuDNN's fast 3D convs (fp16) want NDHWC
        self.last_stats: dict = {}
        self.preprocess_note = ""

    @classmethod
    def from_model(cls, model, fast: bool = True, **kwargs) -> BundlePredictor:
        """The predictor of a :class:`app.bundle.model.LoadedModel`."""
        return cls(
            model.network,
            model.preprocessing,
            model.inferer,
            model.device,
            amp=model.amp,
            postprocessing=model.postprocessing,
            fast=fast,
            where=str(model.config_file),
            **kwargs,
        )

    def fast_path_note(self) -> str:
        """Why the fused path cannot reproduce this bundle ('' when it can)."""
        if self.spec is None:
            return f"{type(self.inferer).__name__} is not a SlidingWindowInferer the fused path supports"
        return "" if self.post.fast else self.post.reason

    def predict_metatensor(
        self, image: MetaTensor, fast: bool | None = None, on_network: Callable[[], object] | None = None
    ) -> Prediction:
        """Predict labels for a channel-first MetaTensor (RAS affine) on its own voxel grid.

        ``fast`` overrides the predictor's setting for this call (the bundle may still need the plain path);
        ``on_network`` is called once the preprocessing is done, before the network runs.
        """
        if image.ndim != 4 or image.shape[0] != 1:
            raise ValueError(f"expected a one-channel (1, I, J, K) image, got shape {tuple(image.shape)}")
        use_fast = self.fast if fast is None else bool(fast)
        note = self.fast_path_note() if use_fast else "plain path requested"
        if not note:
            pred = self._predict_fast(image, on_network)
            if pred.path == "fast":
                return self._apply_label_steps(pred)
            note = pred.note  # the preprocessing did something the way back by affines cannot undo
        log.info("MONAI's plain path: %s", note)
        pred = self._predict_reference(image, on_network)
        pred.note = note
        return pred

    def _sync(self) -> None:
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)

    @torch.no_grad()
    def _predict_fast(self, image: MetaTensor, on_network: Callable[[], object] | None) -> Prediction:
        t0 = time.perf_counter()
        src_affine_ras = np.asarray(image.affine, dtype=np.float64)
        src_shape = tuple(int(s) for s in image.shape[1:])
        # the one host->device copy (a no-op on the CPU)
        on_dev = MetaTensor(
            torch.as_tensor(image.as_tensor(), dtype=torch.float32).to(self.device),
            affine=torch.as_tensor(src_affine_ras),
            meta={k: v for k, v in image.meta.items() if k != "affine"},
        )
        net_img, padding_mode = self._preprocess_on_device(on_dev)
        if self.preprocess_note:
            return Prediction(np.zeros(0, np.uint8), src_affine_ras, path="plain", note=self.preprocess_note)
        net_affine_ras = np.asarray(net_img.affine, dtype=np.float64)
        x = net_img.as_tensor().unsqueeze(0)
        self._sync()
        t1 = time.perf_counter()
        if on_network is not None:
            on_network()
        net_shape = tuple(x.shape[2:])
        identity = is_identity(net_affine_ras, src_affine_ras, net_shape, src_shape)
        cuda = self.device.type == "cuda"
        spec = self.spec
        assert spec is not None

        def stitch_device(n_classes: int) -> torch.device:  # decided once the first windows tell C
            axis, span = (
                (None, 0) if identity else target_span(net_affine_ras, src_affine_ras, net_shape, src_shape, n_classes)
            )
            aligned = identity or axis_aligned(target_to_source_voxel(net_affine_ras, src_affine_ras)) is not None
            est = estimate_stitch_bytes(
                n_classes,
                net_shape,
                spec.roi_size,
                spec.overlap,
                None if identity else src_shape,
                span=span,
                axis=axis,
                acc_bytes=2 if cuda else 4,
                in_channels=x.shape[1],
                sw_batch_size=spec.sw_batch_size,
                cells=aligned and n_classes <= 255,
                cross_rows=x.device.type == "cpu",
            )["streamed"]
            self.last_stats["estimated_bytes"] = est
            return choose_stitch_device(est, self.device, self.stitch_budget_bytes)

        if self.channels_last and cuda:
            self.network.to(memory_format=torch.channels_last_3d)  # type: ignore[call-overload]
        stats: dict = {}
        target: dict[str, Any] = (
            {}
            if identity
            else {
                "affine_net": net_affine_ras,
                "affine_dst": src_affine_ras,
                "dst_shape": src_shape,
                "padding_mode": padding_mode,
                "softmax": self.post.probabilities,
            }
        )
        self.last_stats = {"net_shape": list(net_shape)}
        with retained_heap(self.device.type == "cpu"):
            labels = sliding_window_labels(
                x,
                self.network,
                spec,
                stitch_device=stitch_device,
                amp=self.amp,
                channels_last=self.channels_last and cuda,
                stats=stats,
                **target,
            )
        labels_np = labels.cpu().numpy()  # the one device->host copy (uint8)
        if labels_np.dtype != np.uint8 and labels_np.max() < 256:
            labels_np = labels_np.astype(np.uint8)
        t2 = time.perf_counter()
        self.last_stats.update(stats)
        stitch_s = max(0.0, t2 - t1 - stats["network_s"] - stats["resample_s"])
        return Prediction(
            labels_np,
            src_affine_ras,
            {
                "preprocess_s": t1 - t0,
                "network_s": stats["network_s"],
                "stitch_s": stitch_s,
                "postprocess_s": stats["resample_s"],
            },
        )

    def _preprocess_on_device(self, image: MetaTensor) -> tuple[MetaTensor, str]:
        """The bundle's preprocessing on the device: spatial transforms lazily, then one resampling.

        Returns the image on the network grid and the padding mode of its resampling (what the way
        back to the source grid uses, as ``Invertd`` would). Sets :attr:`preprocess_note` when the
        way back by the two affines would not be what ``Invertd`` does (see :func:`inverse_note`).
        Transforms that need up-to-date data (``CropForegroundd`` computes its box from the voxels)
        run after the pending resampling is applied.
        """
        key = self.image_key
        data = {key: image}
        padding = "border"
        seen: list[dict] = []
        for t in self.core.transforms:
            lazy_ok = isinstance(t, LazyTrait) and not isinstance(t, RandomizableTrait)
            if lazy_ok and not t.requires_current_data:
                data = t(data, lazy=True)  # only records the geometry: MONAI decides the network grid
                continue
            seen += list(getattr(data[key], "pending_operations", []))
            data[key], padding = materialise(data[key], padding)
            data = t(data)
            seen += list(getattr(data[key], "applied_operations", []))
        seen += list(getattr(data[key], "pending_operations", []))
        img, padding = materialise(data[key], padding)
        self.preprocess_note = inverse_note(seen)
        return img, padding

    def _apply_label_steps(self, pred: Prediction) -> Prediction:
        """The bundle's label operations after the argmax (e.g. largest component), on the source grid."""
        if not self.post.label_steps:
            return pred
        t0 = time.perf_counter()
        data = {"pred": MetaTensor(torch.as_tensor(pred.labels[None]), affine=torch.as_tensor(pred.affine_ras))}
        for t in self.post.label_steps:
            data = t(data)
        out = torch.as_tensor(data["pred"]).cpu().numpy()[0]
        pred.labels = out.astype(np.uint8) if out.max(initial=0) < 256 else out.astype(np.uint16)
        pred.timings["label_steps_s"] = time.perf_counter() - t0
        return pred

    @torch.no_grad()
    def _predict_reference(self, image: MetaTensor, on_network: Callable[[], object] | None = None) -> Prediction:
        t0 = time.perf_counter()
        src_affine = np.asarray(image.affine, dtype=np.float64)
        src_shape = tuple(image.shape[1:])
        data = self.core({self.image_key: image})
        net_img = data[self.image_key]
        x = net_img.unsqueeze(0).to(self.device)
        t1 = time.perf_counter()
        if on_network is not None:
            on_network()
        ctx = torch.autocast(self.device.type, dtype=torch.float16) if self.amp else nullcontext()
        with ctx, retained_heap(self.device.type == "cpu"):
            logits = self.inferer(x, self.network)
        if isinstance(logits, (tuple, list)):  # deep supervision: the full-resolution output comes first
            logits = logits[0]
        self._sync()
        t2 = time.perf_counter()
        if self.post.plain is not None and self.post.inverts:
            pred = MetaTensor(logits[0].float().cpu(), meta=dict(net_img.meta))
            out = self.post.plain({self.image_key: net_img, "pred": pred})["pred"]
            out_t = torch.as_tensor(out)
            labels_t = out_t[0] if out_t.shape[0] == 1 else torch.argmax(out_t, dim=0)
            out_affine = np.asarray(out.affine, dtype=np.float64) if isinstance(out, MetaTensor) else src_affine
            labels = labels_t.round().to(torch.int64).numpy()
            if not is_identity(out_affine, src_affine, labels.shape, src_shape, atol=1e-3):
                raise ValueError("the bundle's Invertd did not return the prediction to the source grid")
        else:
            probs = torch.softmax(logits.float(), dim=1)[0]
            padding = resampling_padding(getattr(net_img, "applied_operations", []))
            net_affine = np.asarray(net_img.affine, dtype=np.float64)
            if not is_identity(net_affine, src_affine, probs.shape[1:], src_shape):
                probs = resample_to_grid(
                    probs,
                    net_affine,
                    src_affine,
                    src_shape,
                    mode="bilinear",
                    slab=64,
                    method="grid_sample",
                    padding_mode=padding,
                )
            labels = torch.argmax(probs, dim=0).cpu().numpy()
            if self.post.plain is not None:  # label steps of a bundle without Invertd, on the source grid
                d = {"pred": MetaTensor(torch.as_tensor(labels[None]), affine=torch.as_tensor(src_affine))}
                for t in self.post.label_steps:
                    d = t(d)
                labels = torch.as_tensor(d["pred"]).numpy()[0]
        labels = labels.astype(np.uint8) if labels.max(initial=0) < 256 else labels.astype(np.uint16)
        t3 = time.perf_counter()
        return Prediction(
            labels, src_affine, {"preprocess_s": t1 - t0, "network_s": t2 - t1, "postprocess_s": t3 - t2}, path="plain"
        )


_RESAMPLE_OPS = ("Orientation", "SpatialResample", "Spacing")
# what the fused way back (trilinear on the probabilities, one padding mode) reproduces of Invertd
_INVERTIBLE_PADS = ("zeros", "border")


def _interpolating(ops) -> list[dict]:
    """The extra_info of operations that interpolate (Spacing/SpatialResample/Affine...: they carry a
    ``mode``); Orientation (flips and permutations) and pads carry none."""
    infos = [op.get("extra_info") or {} for op in ops]
    return [e for e in infos if isinstance(e, dict) and "mode" in e and "padding_mode" in e]


def resampling_padding(ops, default: str = "border") -> str:
    """The padding mode of the last interpolating operation among ``ops`` (``default`` when none)."""
    found = _interpolating(ops)
    return str(found[-1]["padding_mode"]) if found else default


def inverse_note(ops) -> str:
    """Why resampling the probabilities back by the two affines (trilinear, one padding mode) would
    not be what MONAI's ``Invertd`` does after these preprocessing operations ('' when it would be).

    ``Invertd`` undoes a crop by padding zeros (background) and each resampling with its own
    interpolation and padding mode; the fused way back interpolates trilinearly with one padding
    mode, ``zeros`` or ``border`` (PyTorch's ``reflection`` depends on ``align_corners``, which the
    voxel-centre resampler does not model).
    """
    for op in ops:
        extra = op.get("extra_info") or {}
        cropped = extra.get("cropped") if isinstance(extra, dict) else None
        if cropped is not None and any(int(c) != 0 for c in np.ravel(cropped)):
            return f"the preprocessing crops the image ({op.get('class')}): Invertd pads it back with background"
    found = _interpolating(ops)
    modes = {str(e["mode"]) for e in found}
    pads = {str(e["padding_mode"]) for e in found}
    if modes - {"bilinear"}:
        return f"the preprocessing resamples with mode {sorted(modes)}: Invertd inverts with the same mode"
    if len(pads) > 1 or pads - set(_INVERTIBLE_PADS):
        return f"the preprocessing resamples with padding_mode {sorted(pads)}"
    return ""


def materialise(img: MetaTensor, padding_mode: str = "border") -> tuple[MetaTensor, str]:
    """Apply a MetaTensor's pending (lazy) spatial operations in one resampling on its device.

    Orientation/Spacing with bilinear or nearest interpolation and zeros/border padding go through
    our resampler (``resample_to_grid``: separable when the grids are axis-aligned) from the current
    affine to the pending one; anything else (crops, pads, spline orders, reflection) through
    MONAI's ``apply_pending``. Returns the image and the padding mode of the last interpolating
    operation (``padding_mode`` when none interpolates, e.g. Orientation alone).
    """
    ops = getattr(img, "pending_operations", [])
    if not ops:
        return img, padding_mode
    found = _interpolating(ops)
    modes = {str(e["mode"]) for e in found} or {"bilinear"}
    pads = {str(e["padding_mode"]) for e in found} or {padding_mode}
    mode, pad = next(iter(modes)), resampling_padding(ops, padding_mode)
    if (
        any(str(op.get("class")) not in _RESAMPLE_OPS for op in ops)
        or len(modes) > 1
        or len(pads) > 1
        or mode not in ("bilinear", "nearest")
        or pad not in _INVERTIBLE_PADS
    ):
        return apply_pending(img)[0], pad
    src_affine = np.asarray(img.affine, dtype=np.float64)
    dst_affine = np.asarray(img.peek_pending_affine(), dtype=np.float64)
    dst_shape = tuple(int(s) for s in img.peek_pending_shape())
    data = img.as_tensor()
    if not is_identity(src_affine, dst_affine, data.shape[1:], dst_shape):
        data = resample_to_grid(data, src_affine, dst_affine, dst_shape, mode=mode, padding_mode=pad)
    meta = {k: v for k, v in img.meta.items() if k != "affine"}
    return MetaTensor(data, affine=torch.as_tensor(dst_affine), meta=meta), pad


def load_image_metatensor(path: str | Path) -> MetaTensor:
    """A NIfTI image as a channel-first MetaTensor carrying the file's own voxel->RAS affine."""
    array, affine_ras = load_nifti(path)
    if array.ndim == 4:  # channels last in NIfTI
        array = np.moveaxis(array, -1, 0)
    elif array.ndim == 3:
        array = array[None]
    return MetaTensor(
        torch.as_tensor(np.asarray(array, dtype=np.float32)),
        affine=torch.as_tensor(affine_ras),
        meta={"filename_or_obj": str(path), "space": "RAS"},
    )
