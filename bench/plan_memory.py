"""Benchmark (not a test): the planner's training-memory estimate against the measured peak.

For a few (patch, batch, features) choices, one child process per choice builds ``UNet3D`` (deep
supervision, instance norm), runs three training steps (Dice + CE, SGD with momentum) and reports
its peak memory above the process' baseline before the first step: the peak resident set size on
the CPU (``ru_maxrss``), ``torch.cuda.max_memory_allocated`` on CUDA (with AMP, as the bundles
train there). Printed next to ``app.planning.planner.estimate_training_bytes``.

    python bench/plan_memory.py                    # CPU, float32
    python bench/plan_memory.py --large            # also 96^3 (and 128^3) patches
    python bench/plan_memory.py --device cuda      # GPU, AMP, all sizes
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

CHOICES = [
    ([40, 56, 40], 2, [4, 8, 16, 32]),
    ([40, 56, 40], 2, [16, 32, 64, 128]),
    ([40, 56, 40], 4, [32, 64, 128, 256]),
    ([64, 64, 64], 2, [32, 64, 128, 256]),
]
LARGE = [([96, 96, 96], 2, [32, 64, 128, 160, 160]), ([128, 128, 128], 2, [32, 64, 128, 160, 160, 160])]


def _child(patch: list[int], batch: int, features: list[int], device: str) -> dict:
    import torch
    from monai.losses import DiceCELoss

    from app.networks.unet3d import UNet3D
    from app.training.deep_supervision import StackedDeepSupervisionLoss

    torch.set_num_threads(int(os.environ.get("OMP_NUM_THREADS", "1")))
    dev = torch.device(device)
    cuda = dev.type == "cuda"
    net = UNet3D(1, 3, features, norm="instance", deep_supervision=True).to(dev)
    opt = torch.optim.SGD(net.parameters(), lr=1e-3, momentum=0.99, nesterov=True)
    loss_fn = StackedDeepSupervisionLoss(DiceCELoss(to_onehot_y=True, softmax=True))
    x = torch.randn(batch, 1, *patch, device=dev)
    y = torch.randint(0, 3, (batch, 1, *patch), device=dev).float()
    if cuda:
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        base = torch.cuda.memory_allocated()
    else:
        base = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    for _ in range(3):
        opt.zero_grad(set_to_none=True)
        with torch.autocast("cuda", enabled=cuda):
            loss = loss_fn(net(x), y)
        loss.backward()
        opt.step()
    if cuda:
        torch.cuda.synchronize()
        peak = torch.cuda.max_memory_allocated() - base
    else:
        peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024 - base
    return {"measured_bytes": int(peak)}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--large", action="store_true", help="also 96^3 and 128^3 patches (minutes on a CPU)")
    ap.add_argument("--child", help=argparse.SUPPRESS)
    a = ap.parse_args()
    if a.child:
        patch, batch, feats = json.loads(a.child)
        print(json.dumps(_child(patch, batch, feats, a.device)))
        return
    from app.planning.planner import estimate_training_bytes

    cuda = a.device.startswith("cuda")
    print(f"device {a.device} ({'AMP' if cuda else 'float32'}), {platform.processor() or platform.machine()}")
    print(f"{'patch':>14s} {'batch':>5s} {'features':>24s} {'estimate MiB':>13s} {'measured MiB':>13s} {'ratio':>6s}")
    for patch, batch, feats in CHOICES + (LARGE if a.large or cuda else []):
        est = estimate_training_bytes(patch, batch, feats, 1, 3, True, 2 if cuda else 4, 1)
        proc = subprocess.run(
            [sys.executable, __file__, "--device", a.device, "--child", json.dumps([patch, batch, feats])],
            capture_output=True,
            text=True,
        )
        if proc.returncode:
            print(f"{str(patch):>14s} {batch:5d} {str(feats):>24s} failed: {proc.stderr.strip().splitlines()[-1]}")
            continue
        meas = json.loads(proc.stdout.strip().splitlines()[-1])["measured_bytes"]
        print(
            f"{str(patch):>14s} {batch:5d} {str(feats):>24s} {est / 2**20:13.0f} {meas / 2**20:13.0f} {meas / est:6.2f}"
        )


if __name__ == "__main__":
    main()
