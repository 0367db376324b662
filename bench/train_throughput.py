"""Training throughput with four augmentation pipelines (synthetic data; prints figures, not a test).

Pipelines, all on the same network, optimiser and crops:

  a  MONAI on the CPU: Rand3DElasticd + RandAffined + flips + intensity in DataLoader workers
  b  MONAI on the device: the same dict transforms applied per sample to device tensors
  c  segapp BatchAugment on the device, through AugmentPrepareBatch (one grid_sample per batch)
  d  no augmentation (random crops only): the data-pipeline ceiling

plus "net": the network alone on a batch already on the device (the training ceiling).
For each it prints patches/s of the whole training loop, the ratio to (d), and the augmentation time
per batch measured on its own (a: one CPU core, the way one worker runs it; b, c: on the device).

Setups: ``spleen`` (MONAI spleen-bundle UNet, 96^3 crops, 8 per step) and ``hippo`` (segapp's UNet3D,
48x64x48 crops, 8 per step; MONAI's UNet if app.networks.unet3d is missing). AMP when on CUDA.

    python bench/train_throughput.py --device auto --steps 30 --warmup 5 --workers 8
    python bench/train_throughput.py --quick          # tiny sizes, < 2 min on 2 CPU cores
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import monai  # noqa: E402
from monai.data import DataLoader, Dataset  # noqa: E402
from monai.engines.utils import default_prepare_batch  # noqa: E402
from monai.losses import DiceCELoss  # noqa: E402
from monai.transforms import (  # noqa: E402
    Compose,
    Rand3DElasticd,
    RandAdjustContrastd,
    RandAffined,
    RandFlipd,
    RandGaussianNoised,
    RandScaleIntensityd,
    RandShiftIntensityd,
    RandSpatialCropd,
)

from app.training.prepare_batch import AugmentPrepareBatch  # noqa: E402
from app.transforms.batch_augment import BatchAugment, monai_elastic_rms  # noqa: E402

KEYS = ("image", "label")

# One augmentation recipe, written for MONAI and for BatchAugment with the same meaning.
SIGMA = (5.0, 8.0)
MONAI_MAGNITUDE = (100.0, 200.0)
ROTATE, SCALE, TRANSLATE = 0.26, 0.1, 5.0  # radians (15 deg), factor +-10 %, voxels


@dataclass
class Setup:
    name: str
    roi: tuple[int, int, int]
    volume: tuple[int, int, int]
    batch: int
    classes: int


def make_setups(quick: bool) -> dict[str, Setup]:
    if quick:
        return {
            "spleen": Setup("spleen", (32, 32, 32), (48, 48, 40), 2, 2),
            "hippo": Setup("hippo", (16, 24, 16), (24, 32, 24), 2, 3),
        }
    return {
        "spleen": Setup("spleen", (96, 96, 96), (160, 160, 128), 8, 2),
        "hippo": Setup("hippo", (48, 64, 48), (64, 80, 64), 8, 3),
    }


def make_network(setup: Setup) -> tuple[torch.nn.Module, str]:
    if setup.name == "spleen":
        net = monai.networks.nets.UNet(
            spatial_dims=3,
            in_channels=1,
            out_channels=2,
            channels=(16, 32, 64, 128, 256),
            strides=(2, 2, 2, 2),
            num_res_units=2,
            norm="batch",
        )
        return net, "monai UNet (spleen bundle)"
    try:
        from app.networks.unet3d import UNet3D

        return UNet3D(
            in_channels=1, out_channels=setup.classes, features=(16, 32, 64, 128)
        ), "segapp UNet3D(16,32,64,128)"
    except ImportError:
        net = monai.networks.nets.UNet(
            spatial_dims=3,
            in_channels=1,
            out_channels=setup.classes,
            channels=(16, 32, 64, 128),
            strides=(2, 2, 2),
            num_res_units=2,
            norm="batch",
        )
        return net, "monai UNet(16,32,64,128) (UNet3D missing)"


def synthetic_volumes(setup: Setup, n: int = 4, seed: int = 0) -> list[dict]:
    """Smooth random images; label = intensity bands (so classes are spatially coherent)."""
    g = torch.Generator().manual_seed(seed)
    items = []
    for _ in range(n):
        coarse = torch.randn(1, 1, *[max(2, s // 8) for s in setup.volume], generator=g)
        img = F.interpolate(coarse, size=setup.volume, mode="trilinear", align_corners=True)[0]
        img = (img - img.mean()) / img.std()
        label = torch.zeros_like(img)
        for c in range(1, setup.classes):
            label[img > 0.5 * c] = float(c)
        items.append({"image": img.contiguous(), "label": label.contiguous()})
    return items


def monai_aug(device: torch.device | None) -> list:
    """MONAI's dict transforms for the recipe (``device`` set: grids made and resampled there)."""
    dev = {"device": device} if device is not None else {}
    return [
        Rand3DElasticd(
            KEYS,
            sigma_range=SIGMA,
            magnitude_range=MONAI_MAGNITUDE,
            prob=1.0,
            mode=("bilinear", "nearest"),
            padding_mode="zeros",
            **dev,
        ),
        RandAffined(
            KEYS,
            prob=1.0,
            rotate_range=(ROTATE,) * 3,
            scale_range=(SCALE,) * 3,
            translate_range=(TRANSLATE,) * 3,
            mode=("bilinear", "nearest"),
            padding_mode="zeros",
            **dev,
        ),
        *[RandFlipd(KEYS, prob=0.5, spatial_axis=a) for a in range(3)],
        RandScaleIntensityd("image", factors=0.1, prob=0.5),
        RandShiftIntensityd("image", offsets=0.1, prob=0.5),
        RandAdjustContrastd("image", gamma=(0.7, 1.5), prob=0.3),
        RandGaussianNoised("image", std=0.05, prob=0.3),
    ]


def segapp_aug(seed: int) -> BatchAugment:
    return BatchAugment(
        prob_elastic=1.0,
        sigma_range=SIGMA,
        # the same RMS displacement as MONAI's magnitude_range at the sigma ends
        magnitude_range=(
            monai_elastic_rms(SIGMA[1], MONAI_MAGNITUDE[0]),
            monai_elastic_rms(SIGMA[0], MONAI_MAGNITUDE[1]),
        ),
        prob_affine=1.0,
        rotate_range=ROTATE,
        scale_range=SCALE,
        translate_range=TRANSLATE,
        prob_flip=0.5,
        flip_axes=(0, 1, 2),
        prob_contrast=0.5,
        contrast_range=0.1,
        prob_brightness=0.5,
        brightness_range=0.1,
        prob_gamma=0.3,
        gamma_range=(0.7, 1.5),
        prob_noise=0.3,
        noise_std=0.05,
        seed=seed,
    )


class MonaiDevicePrepare:
    """Pipeline (b): move the batch, then MONAI's dict transforms sample by sample on the device."""

    def __init__(self, device: torch.device, seed: int):
        self.tf = Compose(monai_aug(device)).set_random_state(seed)

    def __call__(self, batch, device, non_blocking=False):
        img, lab = default_prepare_batch(batch, device, non_blocking)
        outs = [self.tf({"image": img[i], "label": lab[i]}) for i in range(img.shape[0])]
        return (
            torch.stack([torch.as_tensor(o["image"]) for o in outs]),
            torch.stack([torch.as_tensor(o["label"]) for o in outs]),
        )


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def train_loop(setup, net, loader_iter, prepare, device, steps, warmup) -> float:
    """Patches/s over ``steps`` training steps after ``warmup`` (data loading included)."""
    loss_fn = DiceCELoss(to_onehot_y=True, softmax=True)
    opt = torch.optim.Adam(net.parameters(), 1e-4)
    amp = device.type == "cuda"
    scaler = torch.amp.GradScaler("cuda", enabled=amp)
    net.train()
    t0 = 0.0
    for step in range(warmup + steps):
        if step == warmup:
            sync(device)
            t0 = time.perf_counter()
        img, lab = prepare(next(loader_iter), device, True)
        opt.zero_grad(set_to_none=True)
        with torch.autocast(device.type, enabled=amp):
            loss = loss_fn(net(img), lab)
        scaler.scale(loss).backward()
        scaler.step(opt)
        scaler.update()
    sync(device)
    return steps * setup.batch / (time.perf_counter() - t0)


def time_per_batch(fn, device, reps: int) -> float:
    fn()  # warm-up (allocations, kernels)
    sync(device)
    t0 = time.perf_counter()
    for _ in range(reps):
        fn()
    sync(device)
    return (time.perf_counter() - t0) / reps


def run_setup(setup: Setup, args, device: torch.device) -> list[dict]:
    vols = synthetic_volumes(setup, seed=args.seed)
    crop = RandSpatialCropd(KEYS, roi_size=setup.roi, random_size=False)
    n_items = (args.warmup + args.steps) * setup.batch
    pin = device.type == "cuda"

    def loader(transforms, workers):
        ds = Dataset([vols[i % len(vols)] for i in range(n_items)], Compose(transforms).set_random_state(args.seed))
        return iter(DataLoader(ds, batch_size=setup.batch, num_workers=workers, pin_memory=pin, shuffle=False))

    net_template, net_name = make_network(setup)
    print(
        f"\n== {setup.name}: {net_name}, crop {setup.roi}, {setup.batch} patches/step, "
        f"AMP {'on' if device.type == 'cuda' else 'off'}",
        flush=True,
    )

    # a sample batch, to time the augmentations on their own
    sample = next(loader([crop], 0))
    dev_img, dev_lab = default_prepare_batch(sample, device)
    cpu_tf = Compose(monai_aug(None)).set_random_state(args.seed)
    dev_prep = MonaiDevicePrepare(device, args.seed)
    seg_aug = segapp_aug(args.seed)

    def cpu_one_core():
        for i in range(setup.batch):
            cpu_tf({"image": sample["image"][i], "label": sample["label"][i]})

    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # a DataLoader worker runs on one thread
    aug_a = time_per_batch(cpu_one_core, torch.device("cpu"), args.aug_reps)
    torch.set_num_threads(threads)
    aug_b = time_per_batch(lambda: dev_prep(sample, device), device, args.aug_reps)
    aug_c = time_per_batch(lambda: seg_aug(dev_img, dev_lab), device, args.aug_reps)

    results = []
    if args.aug_only:
        print(
            f"augmentation alone, ms/batch: (a) MONAI CPU {aug_a * 1e3:.1f} (1 core)  "
            f"(b) MONAI on device {aug_b * 1e3:.1f}  (c) segapp BatchAugment {aug_c * 1e3:.1f}"
        )
        return [
            {"setup": setup.name, "pipeline": k, "aug_ms_per_batch": v * 1e3}
            for k, v in (("a", aug_a), ("b", aug_b), ("c", aug_c))
        ]

    def fresh_net():
        net, _ = make_network(setup)
        net.load_state_dict(net_template.state_dict())
        return net.to(device)

    # the network alone: the same batch, already on the device
    staged = {"image": dev_img, "label": dev_lab}

    def forever(item):
        while True:
            yield item

    net_rate = train_loop(setup, fresh_net(), forever(staged), default_prepare_batch, device, args.steps, args.warmup)
    plan = {
        "a": (
            "MONAI CPU workers",
            lambda: loader([crop, *monai_aug(None)], args.workers),
            default_prepare_batch,
            aug_a,
        ),
        "b": ("MONAI on device", lambda: loader([crop], args.workers), dev_prep, aug_b),
        "c": ("segapp BatchAugment", lambda: loader([crop], args.workers), AugmentPrepareBatch(seg_aug), aug_c),
        "d": ("crops only", lambda: loader([crop], args.workers), default_prepare_batch, 0.0),
    }
    rates = {}
    for key in args.pipelines:
        label, make_loader, prep, aug_s = plan[key]
        rates[key] = train_loop(setup, fresh_net(), make_loader(), prep, device, args.steps, args.warmup)
        results.append(
            {
                "setup": setup.name,
                "pipeline": key,
                "name": label,
                "patches_per_s": rates[key],
                "aug_ms_per_batch": aug_s * 1e3,
            }
        )
    results.append(
        {
            "setup": setup.name,
            "pipeline": "net",
            "name": "network only",
            "patches_per_s": net_rate,
            "aug_ms_per_batch": 0.0,
        }
    )

    base = rates.get("d")
    print(f"{'pipeline':<28}{'patches/s':>10}{'vs (d)':>9}{'aug ms/batch':>14}")
    for r in results:
        ratio = f"{r['patches_per_s'] / base:8.2f}x" if base else "        -"
        note = " (1 CPU core)" if r["pipeline"] == "a" else ""
        head = f"({r['pipeline']}) {r['name']}"
        print(f"{head:<28}{r['patches_per_s']:10.1f}{ratio}{r['aug_ms_per_batch']:14.1f}{note}")
    if "a" in rates:
        print(
            f"    (a) CPU ceiling with {args.workers} workers: {args.workers * setup.batch / aug_a:.1f} patches/s "
            f"(augmentation alone, ideal scaling)"
        )
    return results


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--device", default="auto", choices=["auto", "cpu", "cuda"])
    ap.add_argument("--steps", type=int, default=None, help="timed steps per pipeline (default 20; 3 with --quick)")
    ap.add_argument("--warmup", type=int, default=None, help="untimed steps first (default 5; 1 with --quick)")
    ap.add_argument("--workers", type=int, default=None, help="DataLoader workers (default min(8, cores))")
    ap.add_argument("--setups", default="spleen,hippo")
    ap.add_argument("--pipelines", default="a,b,c,d")
    ap.add_argument("--quick", action="store_true", help="tiny crops and batches (smoke run on a laptop CPU)")
    ap.add_argument("--aug-reps", type=int, default=None, help="repetitions when timing augmentation alone")
    ap.add_argument("--aug-only", action="store_true", help="only time the augmentations (no training)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--json", type=Path, help="also write the figures here")
    args = ap.parse_args(argv)
    args.steps = args.steps or (3 if args.quick else 20)
    args.warmup = args.warmup if args.warmup is not None else (1 if args.quick else 5)
    args.aug_reps = args.aug_reps or (2 if args.quick else 5)
    args.workers = args.workers if args.workers is not None else min(8, os.cpu_count() or 1)
    args.pipelines = [p for p in args.pipelines.split(",") if p]
    if args.device == "auto":
        args.device = "cuda" if torch.cuda.is_available() else "cpu"
    device = torch.device(args.device)
    torch.manual_seed(args.seed)
    if device.type == "cuda":
        torch.backends.cudnn.benchmark = True
        where = f"cuda: {torch.cuda.get_device_name(device)}"
    else:
        cpu = platform.processor() or platform.machine()
        where = f"cpu: {cpu}, {os.cpu_count()} cores, {torch.get_num_threads()} torch threads"
    print(
        f"device {where}; torch {torch.__version__}, monai {monai.__version__}; workers {args.workers}; "
        f"steps {args.steps} (+{args.warmup} warm-up){'; QUICK sizes' if args.quick else ''}",
        flush=True,
    )

    setups = make_setups(args.quick)
    results = []
    for name in [s for s in args.setups.split(",") if s]:
        if name not in setups:
            ap.error(f"unknown setup {name!r}; choose from {sorted(setups)}")
        results += run_setup(setups[name], args, device)
    if args.json:
        args.json.write_text(json.dumps({"device": where, "quick": args.quick, "results": results}, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
