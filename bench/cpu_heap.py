"""What ``app.runtime.heap.retained_heap`` saves on the CPU (prints figures, not a test).

Two workloads on segapp's UNet3D, each run in a fresh process per mode (so that each peak RSS is
its own), the modes alternating ``--rounds`` times:

  infer  ``--batch`` windows of ``--roi``³ voxels through the network (eval, no grad)
  train  one optimiser step on the same batch (forward, DiceCE loss, backward, SGD)

Per workload and mode: median seconds per call over ``--calls`` calls after one untimed call,
page faults per call, and the process's peak RSS; then the speed-up and RSS ratio of
``retained`` (calls inside :func:`retained_heap`) over ``default`` (glibc as the process starts).

    python bench/cpu_heap.py                       # 96³ windows, batch 4, 8-16-32 features
    python bench/cpu_heap.py --roi 32 --calls 2    # a quick look
"""

from __future__ import annotations

import argparse
import json
import resource
import statistics
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))


def _child(a: argparse.Namespace) -> None:
    import torch
    from monai.losses import DiceCELoss

    from app.networks.unet3d import UNet3D
    from app.runtime.heap import retained_heap

    torch.manual_seed(0)
    net = UNet3D(1, 3, tuple(a.features), "instance")
    x = torch.randn(a.batch, 1, *[a.roi] * 3)
    y = torch.randint(0, 3, (a.batch, 1, *[a.roi] * 3))
    opt = torch.optim.SGD(net.parameters(), lr=0.01)
    loss = DiceCELoss(to_onehot_y=True, softmax=True)

    def call() -> None:
        if a.workload == "infer":
            with torch.no_grad():
                net.eval()(x)
        else:
            opt.zero_grad()
            loss(net.train()(x), y).backward()
            opt.step()

    times, faults = [], []
    with retained_heap(a.mode == "retained"):
        call()
        for _ in range(a.calls):
            f0, t0 = resource.getrusage(resource.RUSAGE_SELF).ru_minflt, time.perf_counter()
            call()
            times.append(time.perf_counter() - t0)
            faults.append(resource.getrusage(resource.RUSAGE_SELF).ru_minflt - f0)
    print(
        json.dumps(
            {"s": times, "faults": faults, "peak_mib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024}
        )
    )


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--roi", type=int, default=96, help="window edge (voxels)")
    ap.add_argument("--batch", type=int, default=4)
    ap.add_argument("--features", type=int, nargs="+", default=[8, 16, 32])
    ap.add_argument("--calls", type=int, default=4, help="timed calls per process")
    ap.add_argument("--rounds", type=int, default=2, help="processes per workload and mode, alternating")
    ap.add_argument("--workloads", default="infer,train")
    ap.add_argument("--child", nargs=2, metavar=("WORKLOAD", "MODE"), help=argparse.SUPPRESS)
    a = ap.parse_args()
    if len(a.features) < 2 or min(a.features) < 1:
        ap.error("--features takes at least two positive channel counts (one per level)")
    step = 2 ** (len(a.features) - 1)
    if a.roi < step or a.roi % step or min(a.batch, a.calls, a.rounds) < 1:
        ap.error(f"--roi must be a positive multiple of {step}; --batch, --calls and --rounds at least 1")
    workloads = a.workloads.split(",")
    if not set(workloads) <= {"infer", "train"}:
        ap.error("--workloads takes infer and/or train")
    if a.child:
        a.workload, a.mode = a.child
        _child(a)
        return

    from app.runtime.heap import heap_is_managed

    print(f"UNet3D {a.features}, batch {a.batch} x {a.roi}^3, {a.calls} calls per process, {a.rounds} rounds")
    if not heap_is_managed():
        print("note: retained_heap changes nothing in this process (not glibc, or the allocator is tuned by the user)")
    argv = sys.argv[1:]
    for w in workloads:
        got: dict[str, dict[str, list[float]]] = {
            m: {"s": [], "faults": [], "peak_mib": []} for m in ("default", "retained")
        }
        for _ in range(a.rounds):
            for mode in got:
                cmd = [sys.executable, __file__, *argv, "--child", w, mode]
                proc = subprocess.run(cmd, capture_output=True, text=True, check=False)
                if proc.returncode != 0:
                    raise SystemExit(f"{w}/{mode} failed:\n{proc.stderr[-2000:]}")
                doc = json.loads(proc.stdout.strip().splitlines()[-1])
                got[mode]["s"] += doc["s"]
                got[mode]["faults"] += doc["faults"]
                got[mode]["peak_mib"].append(doc["peak_mib"])
        med = {m: statistics.median(v["s"]) for m, v in got.items()}
        peak = {m: max(v["peak_mib"]) for m, v in got.items()}
        for m, v in got.items():
            print(
                f"{w:6s} {m:9s} {med[m]:7.3f} s/call (best {min(v['s']):.3f})  "
                f"{statistics.median(v['faults']):10.0f} faults/call  peak RSS {peak[m]:7.0f} MiB"
            )
        print(f"{w:6s} speed-up retained/default {med['default'] / med['retained']:.2f}x; "
              f"peak RSS {peak['retained'] / peak['default']:.2f}x")  # fmt: skip


if __name__ == "__main__":
    main()
