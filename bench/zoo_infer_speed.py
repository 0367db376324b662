"""The model zoo's spleen_ct_segmentation on a real CT series: ``segapp infer`` vs MONAI's own runner.

Both run the zoo's unmodified ``configs/inference.json`` (a temporary copy; no zoo weights can be
downloaded here, so its ``network_def`` with seeded weights, the final biases shifted so that the
labels have structure: see ``tests/helpers/zoo_bundles.py``), on the CPU, one after the other in
this run, each as its own process (interpreter start and imports included, as a user runs them):

  monai         ``python -m monai.bundle run --config_file configs/inference.json`` from the bundle's
                folder, ``dataset_dir``/``output_dir`` pointed at the series as NIfTI (written by
                segapp's reader): LoadImaged ... SlidingWindowInferer ... Invertd, AsDiscreted, SaveImaged
  segapp dicom  ``segapp infer BUNDLE --input SERIES --format nifti,seg`` (reads and decodes the JPEG 2000
                DICOM series itself, writes NIfTI and a DICOM SEG)
  segapp nifti  ``segapp infer BUNDLE --input CT.nii.gz`` (the very file MONAI reads, NIfTI out)

It prints each wall time, MONAI's engine time (from its log), segapp's per-stage timings, the ratio
and the Dice between MONAI's and segapp's labels. The series: ``--series`` (default: the shared data's
``totalseg_example/ct_dicom``, else the test copy).

    python bench/zoo_infer_speed.py
    python bench/zoo_infer_speed.py --repeats 3 --threads 2
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import re
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import nibabel as nib
import numpy as np

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "tests" / "helpers"))

from zoo_bundles import copy_spleen, dice, seeded_weights, series_to_nifti  # noqa: E402


def shared_data() -> Path:
    return Path(os.environ.get("SEGAPP_SHARED_DATA") or REPO.parent / "shared" / "data")


def default_series() -> Path:
    shared = shared_data() / "totalseg_example" / "ct_dicom"
    return shared if shared.is_dir() else REPO / "tests" / "data" / "totalseg_example" / "ct_dicom"


def timed(cmd: list[str], cwd: Path, env: dict) -> tuple[float, subprocess.CompletedProcess]:
    t0 = time.perf_counter()
    proc = subprocess.run(cmd, cwd=cwd, env=env, capture_output=True, text=True)
    wall = time.perf_counter() - t0
    if proc.returncode != 0:
        sys.exit(f"failed: {' '.join(cmd)}\n{proc.stderr[-3000:]}")
    return wall, proc


def engine_seconds(log: str) -> float | None:
    m = re.search(r"Engine run finished\. Time taken: (\d+):(\d+):([\d.]+)", log)
    return None if m is None else int(m[1]) * 3600 + int(m[2]) * 60 + float(m[3])


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--series", type=Path, default=default_series())
    ap.add_argument("--repeats", type=int, default=1, help="runs of each; the fastest is reported")
    ap.add_argument("--threads", type=int, default=None, help="torch threads in both (default: torch's)")
    ap.add_argument("--keep", type=Path, default=None, help="work folder to keep (default: a temporary one)")
    args = ap.parse_args()

    import torch

    from app.bundle.config import bundle_parser
    from app.io.dicom_series import read_series

    work = args.keep or Path(tempfile.mkdtemp(prefix="zoo_speed_"))
    work.mkdir(parents=True, exist_ok=True)
    root = copy_spleen(work / "spleen_ct_segmentation")
    nifti = series_to_nifti(args.series, work / "data" / "imagesTs" / "ct.nii.gz")
    pre = bundle_parser(root, ["inference"]).get_parsed_content("preprocessing")
    net_img = pre({"image": str(nifti)})["image"]
    shares = seeded_weights(root, seed=0, sample=net_img, roi=(96, 96, 96))
    volume = read_series(args.series)

    env = {
        **os.environ,
        "PYTHONPATH": os.pathsep.join([str(REPO), os.environ.get("PYTHONPATH", "")]),
        "SEGAPP_NO_PROGRESS": "1",
        "SEGAPP_HOME": str(work / "home"),
        "CUDA_VISIBLE_DEVICES": "",
    }
    if args.threads:
        env.update(OMP_NUM_THREADS=str(args.threads), MKL_NUM_THREADS=str(args.threads))
    monai_cmd = [sys.executable, "-m", "monai.bundle", "run", "--config_file", "configs/inference.json"]
    monai_cmd += [
        "--dataset_dir",
        str(work / "data"),
        "--output_dir",
        str(work / "monai"),
        "--dataloader#num_workers",
        "0",
    ]
    segapp = [sys.executable, "-m", "app.cli", "infer", str(root), "--device", "cpu", "--trust-bundle"]
    runs = {
        "monai": (monai_cmd, root),
        "segapp dicom": (
            [
                *segapp,
                "--input",
                str(args.series),
                "--output",
                str(work / "ours_dicom"),
                "--format",
                "nifti,seg",
                "--allow-generated-uids",
            ],
            work,
        ),  # fmt: skip
        "segapp nifti": ([*segapp, "--input", str(nifti), "--output", str(work / "ours_nifti")], work),
    }
    best: dict[str, tuple[float, str]] = {}
    for _ in range(args.repeats):
        for name, (cmd, cwd) in runs.items():
            wall, proc = timed(cmd, cwd, env)
            if name not in best or wall < best[name][0]:
                best[name] = (wall, proc.stdout + proc.stderr)

    theirs = np.rint(np.asarray(nib.load(work / "monai" / "ct" / "ct_trans.nii.gz").dataobj)).astype(np.int64)
    theirs = theirs.reshape(volume.shape)
    (summary,) = (work / "ours_dicom").glob("*_summary.json")
    timings = json.loads(summary.read_text())["timings"]
    ours = np.asarray(nib.load(json.loads(summary.read_text())["outputs"]["nifti"]).dataobj).astype(np.int64)
    ours_nifti = np.asarray(nib.load(next((work / "ours_nifti").glob("*_seg.nii.gz"))).dataobj).astype(np.int64)

    print(f"series   {args.series} ({' x '.join(map(str, volume.shape))}, spacing {np.round(volume.spacing, 3)} mm)")
    print(f"network  grid {' x '.join(map(str, net_img.shape[1:]))} at 1.5 x 1.5 x 2 mm, 96^3 windows, overlap 0.5")
    print(f"labels   spleen share in the central window after the bias shift: {shares[1]:.2f}")
    print(
        f"machine  {platform.processor() or platform.machine()}, {os.cpu_count()} CPUs, torch "
        f"{torch.__version__} threads {args.threads or torch.get_num_threads()}, load average "
        f"{' '.join(f'{x:.1f}' for x in os.getloadavg())}, best of {args.repeats}"
    )
    print()
    engine = engine_seconds(best["monai"][1])
    print(f"{'run':14s} {'wall s':>8s}")
    print(f"{'monai':14s} {best['monai'][0]:8.1f}   (engine: {engine:.1f} s)" if engine else "")
    for name in ("segapp dicom", "segapp nifti"):
        print(f"{name:14s} {best[name][0]:8.1f}   ({best['monai'][0] / best[name][0]:.2f}x MONAI's wall time)")
    stages = re.search(r"^timings: (.*)$", best["segapp dicom"][1], re.M)  # the fastest run's own line
    print("segapp dicom stages: " + (stages[1] if stages else "  ".join(f"{k} {v:.2f}" for k, v in timings.items())))
    print(
        f"Dice vs MONAI: spleen {dice(ours, theirs, 1):.4f} (DICOM in), {dice(ours_nifti, theirs, 1):.4f} (NIfTI in); "
        f"foreground {100 * (theirs == 1).mean():.1f} % MONAI, {100 * (ours == 1).mean():.1f} % segapp"
    )
    # the sliding window alone, in this process, alternating (the same network, windows and input)
    from monai.inferers import SlidingWindowInferer

    from app.inference.stitching import WindowSpec, sliding_window_labels

    parser = bundle_parser(root, ["inference"])
    net = parser.get_parsed_content("network_def").eval()
    net.load_state_dict(torch.load(root / "models" / "model.pt", weights_only=True))
    inferer = parser.get_parsed_content("inferer")
    spec = WindowSpec.from_inferer(inferer)
    assert isinstance(inferer, SlidingWindowInferer) and spec is not None
    x = torch.as_tensor(net_img)[None].float()
    sw = {"monai": [], "segapp": []}
    with torch.no_grad():
        for _ in range(args.repeats):
            t = time.perf_counter()
            ref = inferer(x, net)[0].argmax(0)
            sw["monai"].append(time.perf_counter() - t)
            t = time.perf_counter()
            lab = sliding_window_labels(x, net, spec)
            sw["segapp"].append(time.perf_counter() - t)
    same = float((lab.long() == ref.long()).float().mean())
    print(
        f"sliding window + argmax on the network grid, in process: MONAI {min(sw['monai']):.1f} s, "
        f"segapp {min(sw['segapp']):.1f} s (labels equal on {100 * same:.3f} % of the voxels)"
    )
    if args.keep is None:
        import shutil

        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
