"""End-to-end inference speed: a CT-like DICOM series -> DICOM SEG, segapp vs. the MONAI-default way.

Writes a synthetic CT-like axial series (air, body, fat, lungs, spine; int16 + RescaleIntercept) to a
temporary folder, then times the same job twice:

  segapp  ``segapp infer BUNDLE --input SERIES --format seg`` (in process, through ``app.cli.main``):
          parallel decode, preprocessing resampled on the device, streamed sliding-window stitching
          fused with the resampling back to the source grid and the argmax, SEG by ``write_seg``
  monai   LoadImaged (PydicomReader, the DICOM folder) -> EnsureChannelFirstd -> Orientationd ->
          Spacingd -> NormalizeIntensityd -> sliding_window_inference -> softmax -> Invertd ->
          argmax -> SaveImaged (NIfTI), then the SEG by highdicom from the labels and the source files

Both use the bundle's preprocessing settings (RAS, ``--spacing-net`` mm, z-score), the same network
weights and window settings (``--roi``, overlap 0.5, Gaussian blending, 4 windows per batch). The
network is the bundle's UNet3D (``--features``) plus an intensity-band head, so the labels are CT
structures, not noise; it is written into the bundle config by ``--override`` (with the series rule
``modality: CT``, since the hippocampus bundle accepts MR only, and one SEG segment per class).
Each path runs in a Python process of its own (warm-up on a tiny series first; ``--cold``: none, the
first run of the process is timed, as a one-shot ``segapp infer`` pays it), so the peak resident
set size printed for each is that path's (above the RSS of the imported libraries, the same for
both). It prints the per-stage breakdown of each path, their totals and ratio, their peak RSS, the
per-label Dice between the two label maps (on the source grid) and the device.

    python bench/infer_speed.py                                   # 256x256x120, about a minute on 2 CPU cores
    python bench/infer_speed.py --shape 512 512 300 --device auto # the full-size series
    python bench/infer_speed.py --shape 512 512 300 --cold        # its first run in a fresh process

Defaults: a 3 mm network grid (TotalSegmentator's ``--fast``), a 4-8-16 U-Net, and a window fitted to
the network grid (``--roi fit``: the grid rounded up to the U-Net's pooling multiple, at most 128 per
axis, as nnU-Net CT models): a planned bundle's window is never larger than its images
(``app.planning.planner.plan_network`` and nnU-Net cap the patch at the median image shape). The
network is the same in both paths, what differs is everything around it; with these defaults it is
4-6 % of MONAI's total on the 2-core CPU machine at both sizes (on an H100: 0.4-0.8 s of MONAI's
5.5 s, 7-15 %). A window larger than the
grid (``--roi 128 128 128`` on the default series' 60 x 60 x 41 grid) pads it tenfold and makes the
network most of both totals on a CPU, so the table also prints the totals without the network.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(Path(__file__).resolve().parent))  # so the bundle config can build CTBenchNet

import pydicom  # noqa: E402
from pydicom.dataset import FileDataset, FileMetaDataset  # noqa: E402
from pydicom.uid import PYDICOM_IMPLEMENTATION_UID, CTImageStorage, ExplicitVRLittleEndian, generate_uid  # noqa: E402

from app.networks.unet3d import UNet3D  # noqa: E402

BUNDLE = "hippocampus_unet3d"


class CTBenchNet(torch.nn.Module):
    """The bundle's UNet3D (random weights, scaled down) plus fixed intensity-band logits per class.

    Class ``c`` wins where the z-scored intensity is nearest the ``c``-th band centre, so the label
    map has CT-like structures with smooth boundaries while the compute is a real 3D U-Net's.
    """

    def __init__(self, in_channels: int = 1, out_channels: int = 4, features=(8, 16, 32), norm: str = "instance", **_):
        super().__init__()
        torch.manual_seed(0)
        self.body = UNet3D(in_channels, out_channels, features, norm)
        self.register_buffer("centres", torch.linspace(-1.2, 2.0, out_channels).view(1, -1, 1, 1, 1))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        band = -8.0 * (x - self.centres) ** 2
        return band + 0.05 * self.body(x)


def ct_slice(shape_ij: tuple[int, int], k: int, nk: int, rng: np.random.Generator) -> np.ndarray:
    """HU of axial slice ``k`` as ``[i, j]``: air, an elliptic body with fat rim, lungs in the upper
    half of the slices, a spine, and noise."""
    ni, nj = shape_ij
    i, j = np.meshgrid(
        np.linspace(-1, 1, ni, dtype=np.float32), np.linspace(-1, 1, nj, dtype=np.float32), indexing="ij"
    )
    z = k / max(1, nk - 1)
    body = (i / 0.85) ** 2 + (j / 0.65) ** 2
    hu = np.full(shape_ij, -1000.0, dtype=np.float32)
    hu[body < 1.0] = -90.0  # fat
    hu[body < 0.8] = 40.0  # soft tissue
    if z > 0.4:
        r = 0.28 + 0.05 * np.sin(np.pi * (z - 0.4) / 0.6)
        for ci in (-0.38, 0.38):
            hu[((i - ci) / r) ** 2 + ((j + 0.05) / (r * 1.3)) ** 2 < 1.0] = -820.0
    hu[(i / 0.09) ** 2 + ((j - 0.42) / 0.09) ** 2 < 1.0] = 650.0  # spine
    hu += rng.normal(0.0, 12.0, size=shape_ij).astype(np.float32)
    return hu


def write_ct_series(folder: Path, shape: tuple[int, int, int], spacing: tuple[float, float, float]) -> Path:
    """An axial CT Image Storage series, one file per slice, LPS geometry: ``i`` = +x (L), ``j`` = +y (P)."""
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(0)
    study, series, frame_of_ref = generate_uid(), generate_uid(), generate_uid()
    ni, nj, nk = shape
    origin = np.array([-(ni - 1) * spacing[0] / 2, -(nj - 1) * spacing[1] / 2, -600.0])
    for k in range(nk):
        sop = generate_uid()
        meta = FileMetaDataset()
        meta.MediaStorageSOPClassUID, meta.MediaStorageSOPInstanceUID = CTImageStorage, sop
        meta.TransferSyntaxUID, meta.ImplementationClassUID = ExplicitVRLittleEndian, PYDICOM_IMPLEMENTATION_UID
        ds = FileDataset(str(folder / f"ct{k:04d}.dcm"), {}, file_meta=meta, preamble=b"\0" * 128)
        ds.SpecificCharacterSet = "ISO_IR 100"
        ds.SOPClassUID, ds.SOPInstanceUID = CTImageStorage, sop
        ds.StudyDate = ds.SeriesDate = ds.ContentDate = "20240102"
        ds.StudyTime = ds.SeriesTime = ds.ContentTime = "030405"
        ds.AccessionNumber, ds.Modality, ds.Manufacturer, ds.ReferringPhysicianName = "BENCH1", "CT", "bench", ""
        ds.PatientName, ds.PatientID, ds.PatientBirthDate, ds.PatientSex = "Bench^Phantom", "BENCH", "19700101", "O"
        ds.StudyInstanceUID, ds.SeriesInstanceUID, ds.FrameOfReferenceUID = study, series, frame_of_ref
        ds.StudyID, ds.SeriesNumber, ds.InstanceNumber, ds.PositionReferenceIndicator = "1", 1, k + 1, ""
        ds.ImageType = ["ORIGINAL", "PRIMARY", "AXIAL"]
        ds.ImagePositionPatient = [f"{v:.4f}" for v in origin + [0, 0, k * spacing[2]]]
        ds.ImageOrientationPatient = [1, 0, 0, 0, 1, 0]
        ds.PixelSpacing = [f"{spacing[1]:.6g}", f"{spacing[0]:.6g}"]
        ds.SliceThickness = f"{spacing[2]:.6g}"
        ds.Rows, ds.Columns = nj, ni
        ds.SamplesPerPixel, ds.PhotometricInterpretation = 1, "MONOCHROME2"
        ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation = 16, 16, 15, 1
        ds.RescaleSlope, ds.RescaleIntercept, ds.RescaleType, ds.KVP = "1", "-1024", "HU", "120"
        stored = np.clip(ct_slice((ni, nj), k, nk, rng) + 1024.0, -32768, 32767).astype(np.int16)
        ds.PixelData = np.ascontiguousarray(stored.T).tobytes()  # rows = j, columns = i
        ds.save_as(ds.filename, enforce_file_format=True)
    return folder


def bench_bundle(work: Path, classes: int) -> Path:
    """A copy of the hippocampus bundle whose metadata describes the bench's CT classes (series rules,
    label names, segment codes): segapp takes those from a bundle's metadata file."""
    root = work / "bench_bundle"
    shutil.rmtree(root, ignore_errors=True)
    shutil.copytree(REPO / "bundles" / BUNDLE, root)
    meta_file = root / "configs" / "metadata.json"
    meta = json.loads(meta_file.read_text())
    names = {str(c): ("background" if c == 0 else f"class {c}") for c in range(classes)}
    meta["network_data_format"]["outputs"]["pred"].update(num_channels=classes, channel_def=names)
    meta["series_rules"] = {"modality": ["CT"], "min_slices": 8}
    meta["segments"] = [
        {
            "label_value": c,
            "label_name": f"class {c}",
            "category_code": ["91723000", "SCT", "Anatomical Structure"],
            "type_code": ["85756007", "SCT", "Tissue"],
        }
        for c in range(1, classes)
    ]
    meta_file.write_text(json.dumps(meta, indent=4))
    return root


def bundle_overrides(classes: int, features: list[int], roi: list[int], spacing_net: float) -> dict:
    return {
        "network_def": {
            "_target_": "infer_speed.CTBenchNet",
            "in_channels": 1,
            "out_channels": classes,
            "features": features,
        },
        "num_classes": classes,
        "patch_size": roi,
        "target_spacing": [spacing_net] * 3,
    }


def run_segapp(
    bundle: Path, series: Path, out: Path, ckpt: Path, overrides: dict, device: str
) -> tuple[dict, np.ndarray]:
    from app.cli import main

    t0 = time.perf_counter()
    rc = main(
        [
            "infer",
            str(bundle),
            "--trust-bundle",
            "--input",
            str(series),
            "--output",
            str(out),
            "--format",
            "seg",
            "--checkpoint",
            str(ckpt),
            "--device",
            device,
            "--override",
            json.dumps(overrides),
        ]
    )
    wall = time.perf_counter() - t0
    peak_kib = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss  # before the check below reads the SEG back
    if rc != 0:
        raise SystemExit(f"segapp infer failed with exit code {rc}")
    (summary,) = list(out.glob("*_summary.json"))
    timings = json.loads(summary.read_text())["timings"]
    from app.io.dicom_series import read_series
    from app.io.seg_read import read_seg

    labels, _ = read_seg(json.loads(summary.read_text())["outputs"]["seg"], read_series(series))
    return {**timings, "wall_s": wall, "peak_kib": peak_kib}, labels


def run_monai(
    series: Path,
    out: Path,
    ckpt: Path,
    classes: int,
    features: list[int],
    roi: list[int],
    spacing_net: float,
    device: torch.device,
) -> tuple[dict, np.ndarray, np.ndarray]:
    """The MONAI-default pipeline; returns timings, labels and their RAS affine (MONAI's grid)."""
    import highdicom as hd
    from monai.data import PydicomReader
    from monai.inferers import sliding_window_inference
    from monai.transforms import (
        Activationsd,
        AsDiscreted,
        Compose,
        EnsureChannelFirstd,
        Invertd,
        LoadImaged,
        NormalizeIntensityd,
        Orientationd,
        SaveImaged,
        Spacingd,
    )
    from pydicom.sr.codedict import codes

    sync = (lambda: torch.cuda.synchronize(device)) if device.type == "cuda" else (lambda: None)
    t = {}
    t0 = time.perf_counter()
    pre = Compose(
        [
            LoadImaged("image", reader=PydicomReader()),
            EnsureChannelFirstd("image"),
            Orientationd("image", axcodes="RAS"),
            Spacingd("image", pixdim=[spacing_net] * 3, mode="bilinear"),
            NormalizeIntensityd("image", nonzero=True, channel_wise=True),
        ]
    )
    data = pre({"image": str(series)})
    t["load_preprocess_s"] = time.perf_counter() - t0
    t0 = time.perf_counter()
    net = CTBenchNet(1, classes, features).to(device).eval()
    state = torch.load(ckpt, map_location=device, weights_only=True)
    net.load_state_dict(state)
    amp = device.type == "cuda"
    with torch.no_grad(), torch.autocast(device.type, dtype=torch.float16, enabled=amp):
        data["pred"] = sliding_window_inference(data["image"][None].to(device), roi, 4, net, 0.5, "gaussian")[0]
    sync()
    t["network_s"] = time.perf_counter() - t0
    t0 = time.perf_counter()
    post = Compose(
        [
            Activationsd("pred", softmax=True),
            Invertd("pred", transform=pre, orig_keys="image", nearest_interp=False, to_tensor=True),
            AsDiscreted("pred", argmax=True),
            SaveImaged(
                "pred",
                output_dir=str(out),
                output_postfix="seg",
                separate_folder=False,
                output_dtype=np.uint8,
                print_log=False,
            ),
        ]
    )
    data["pred"] = data["pred"].float()
    data = post(data)
    sync()
    t["invert_save_s"] = time.perf_counter() - t0
    t0 = time.perf_counter()
    labels = data["pred"][0].cpu().numpy().astype(np.uint8)
    affine_ras = np.asarray(data["pred"].affine, dtype=np.float64)
    # SEG: the source headers sorted along the slice normal, the label map as (frames, rows, columns)
    headers = [pydicom.dcmread(f, stop_before_pixels=True) for f in sorted(series.iterdir())]
    normal = np.cross(*np.asarray(headers[0].ImageOrientationPatient, float).reshape(2, 3))
    headers.sort(key=lambda h: float(np.dot(np.asarray(h.ImagePositionPatient, float), normal)))
    affine_lps = np.diag([-1.0, -1.0, 1.0, 1.0]) @ affine_ras
    # MONAI's labels -> the files' pixel grid [i = column, j = row, k = file order]: a permutation and
    # flips for an axis-aligned series (as a careful MONAI user would do it with numpy)
    row, col = np.asarray(headers[0].ImageOrientationPatient, float).reshape(2, 3)
    sp = np.asarray(headers[0].PixelSpacing, float)
    files_lps = np.eye(4)
    files_lps[:3, 0], files_lps[:3, 1] = row * sp[1], col * sp[0]
    first, last = (np.asarray(h.ImagePositionPatient, float) for h in (headers[0], headers[-1]))
    files_lps[:3, 2] = (last - first) / max(1, len(headers) - 1)
    files_lps[:3, 3] = np.asarray(headers[0].ImagePositionPatient, float)
    m = np.linalg.inv(affine_lps) @ files_lps  # files voxel -> MONAI voxel
    perm = [int(np.argmax(np.abs(m[:3, ax]))) for ax in range(3)]
    on_files = labels.transpose(perm)
    for ax in range(3):
        if m[perm[ax], ax] < 0:
            on_files = np.flip(on_files, axis=ax)
    frames = np.ascontiguousarray(on_files.transpose(2, 1, 0))  # (frames, rows, columns)
    algo = hd.AlgorithmIdentificationSequence(
        name="monai-default", family=codes.cid7162.ArtificialIntelligence, version="1"
    )
    desc = [
        hd.seg.SegmentDescription(
            segment_number=c,
            segment_label=f"class {c}",
            segmented_property_category=codes.SCT.AnatomicalStructure,
            segmented_property_type=codes.SCT.Tissue,
            algorithm_type=hd.seg.SegmentAlgorithmTypeValues.AUTOMATIC,
            algorithm_identification=algo,
        )
        for c in range(1, classes)
    ]
    sources = [pydicom.dcmread(f) for f in sorted(series.iterdir())]
    by_uid = {s.SOPInstanceUID: s for s in sources}
    seg = hd.seg.Segmentation(
        source_images=[by_uid[h.SOPInstanceUID] for h in headers],
        pixel_array=frames,
        segmentation_type="BINARY",
        segment_descriptions=desc,
        series_instance_uid=generate_uid(),
        series_number=901,
        sop_instance_uid=generate_uid(),
        instance_number=1,
        manufacturer="bench",
        manufacturer_model_name="monai-default",
        software_versions="1",
        device_serial_number="0",
    )
    seg.save_as(out / "monai_seg.dcm")
    t["seg_write_s"] = time.perf_counter() - t0
    return t, frames.transpose(2, 1, 0), affine_lps  # [i, j, k] on the files' grid


def dice_per_label(a: np.ndarray, b: np.ndarray, classes: int) -> dict[int, float]:
    out = {}
    for c in range(1, classes):
        x, y = a == c, b == c
        d = int(x.sum()) + int(y.sum())
        out[c] = 1.0 if d == 0 else 2.0 * int((x & y).sum()) / d
    return out


def _write_json(path: Path | None, figures: dict) -> None:
    if path is not None:
        path.write_text(json.dumps(figures, indent=1, default=float))


def _child(a: argparse.Namespace, work: Path, device: torch.device) -> None:
    """One path in this process (``--child segapp|monai``): a warm-up on a tiny series, then the timed
    run; writes ``<path>.json`` (timings and the process' peak RSS above its RSS once the libraries
    are imported; segapp's taken when ``segapp infer`` returns, before the bench reads its SEG back)
    and ``<path>_labels.npy``."""
    if not a.cold:
        import highdicom  # noqa: F401  (both paths' libraries loaded before the baseline is read)
    import monai.transforms  # noqa: F401

    import app.cli  # noqa: F401

    base_mib = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # Linux: KiB
    ckpt, bundle = work / "bench_net.pt", work / "bench_bundle"
    overrides = bundle_overrides(a.classes, a.features, a.roi, a.spacing_net)
    for d in (f"warm_{a.child}", f"out_{a.child}"):
        shutil.rmtree(work / d, ignore_errors=True)
        (work / d).mkdir(parents=True)
    if a.child == "segapp":
        if not a.cold:
            run_segapp(bundle, work / "tiny", work / "warm_segapp", ckpt, {**overrides, "patch_size": [32, 32, 32]},
                       str(device))  # fmt: skip
        timings, labels = run_segapp(bundle, work / "series", work / "out_segapp", ckpt, overrides, str(device))
    else:
        if not a.cold:
            tiny = (work / "tiny", work / "warm_monai", ckpt, a.classes, a.features, [32, 32, 32], a.spacing_net)
            run_monai(*tiny, device)
        timings, labels, _ = run_monai(
            work / "series", work / "out_monai", ckpt, a.classes, a.features, a.roi, a.spacing_net, device
        )
    np.save(work / f"{a.child}_labels.npy", labels)
    peak_mib = timings.pop("peak_kib", resource.getrusage(resource.RUSAGE_SELF).ru_maxrss) / 1024
    (work / f"{a.child}.json").write_text(json.dumps({"timings": timings, "peak_rss_mib": peak_mib - base_mib}))


def _run_child(path: str, work: Path) -> tuple[dict, np.ndarray, float]:
    """``path`` in a fresh Python process (so that its peak RSS is its own); its timings, labels, peak RSS."""
    cmd = [sys.executable, __file__, "--child", path, "--workdir", str(work), *sys.argv[1:]]
    proc = subprocess.run(cmd, capture_output=True, text=True)
    if proc.returncode != 0:
        raise SystemExit(f"the {path} path failed:\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}")
    doc = json.loads((work / f"{path}.json").read_text())
    return doc["timings"], np.load(work / f"{path}_labels.npy"), float(doc["peak_rss_mib"])


def parse_roi(
    ap: argparse.ArgumentParser,
    roi: list[str],
    shape: list[int],
    spacing: list[float],
    spacing_net: float,
    features: list[int],
) -> list[int]:
    """``--roi``: three sizes, or ``fit``: the network grid (what MONAI's ``Spacing`` gives the series,
    read lazily, no voxel resampled) rounded up to the U-Net's pooling multiple, at most 128."""
    if roi != ["fit"]:
        if len(roi) != 3 or not all(r.isdigit() and int(r) > 0 for r in roi):
            ap.error(f"--roi takes three positive sizes or 'fit', got {' '.join(roi)}")
        return [int(r) for r in roi]
    from monai.data import MetaTensor
    from monai.transforms import Spacing

    probe = MetaTensor(
        torch.zeros((1, 1, 1, 1)).expand(1, *shape),
        affine=torch.diag(torch.tensor([*spacing, 1.0], dtype=torch.float64)),
    )
    grid = Spacing(pixdim=[spacing_net] * 3)(probe, lazy=True).peek_pending_shape()
    step = 2 ** (len(features) - 1)
    return [min(128, -(-int(g) // step) * step) for g in grid]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--shape", type=int, nargs=3, default=[256, 256, 120], help="columns rows slices")
    ap.add_argument("--spacing", type=float, nargs=3, default=[0.7, 0.7, 1.0], help="source voxel size (mm)")
    ap.add_argument("--spacing-net", type=float, default=3.0, help="the bundle's target spacing (mm)")
    ap.add_argument("--classes", type=int, default=5)
    ap.add_argument("--features", type=int, nargs="+", default=[4, 8, 16])
    ap.add_argument("--roi", nargs="+", default=["fit"], help="window size (3 voxel counts), or 'fit' (default)")
    ap.add_argument("--device", default="auto")
    ap.add_argument("--workdir", help="keep the series and outputs here (default: a temporary folder)")
    ap.add_argument("--skip-monai", action="store_true")
    ap.add_argument(
        "--cold",
        action="store_true",
        help="time each path's first run in its fresh process (no warm-up; highdicom imported when a path needs "
        "it): what a one-shot CLI run pays",
    )
    ap.add_argument("--json", type=Path, help="also write the figures here")
    ap.add_argument("--child", choices=("segapp", "monai"), help=argparse.SUPPRESS)
    a, _ = ap.parse_known_args()  # a child gets the parent's argv again after its own --workdir
    if min(a.shape) < 1 or min(a.spacing) <= 0 or a.spacing_net <= 0 or a.classes < 2:
        ap.error("--shape needs positive sizes, --spacing/--spacing-net positive mm, --classes at least 2")
    if a.json is not None and not a.json.parent.is_dir():
        ap.error(f"--json: folder {a.json.parent} does not exist")
    a.roi = parse_roi(ap, a.roi, a.shape, a.spacing, a.spacing_net, a.features)

    from app.errors import ConfigError
    from app.runtime.device import resolve_device

    try:
        device = resolve_device(a.device)
    except ConfigError as exc:
        ap.error(str(exc))
    work = Path(a.workdir) if a.workdir else Path(tempfile.mkdtemp(prefix="infer_speed_"))
    if a.child:
        _child(a, work, device)
        return
    series = work / "series"
    t0 = time.perf_counter()
    if not series.is_dir():
        write_ct_series(series, tuple(a.shape), tuple(a.spacing))
    print(f"series {a.shape[0]}x{a.shape[1]}x{a.shape[2]} at {a.spacing} mm ready in {time.perf_counter() - t0:.1f} s")
    torch.save(CTBenchNet(1, a.classes, a.features).state_dict(), work / "bench_net.pt")
    bench_bundle(work, a.classes)
    tiny = work / "tiny"  # the warm-up series: imports and one-time initialisation are not timed
    if not tiny.is_dir():
        write_ct_series(tiny, (48, 48, 24), tuple(a.spacing))

    seg_t, seg_labels, seg_rss = _run_child("segapp", work)
    cpu = (
        f"CPU ({platform.processor() or platform.machine()}, {os.cpu_count()} cores, {torch.get_num_threads()} threads)"
    )
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else cpu
    print(
        f"\ndevice: {name}; torch {torch.__version__}; classes {a.classes}; network grid {a.spacing_net} mm; "
        f"roi {a.roi}; features {a.features}; {'cold: first run of each process' if a.cold else 'after a warm-up'}\n"
    )
    rows = [
        ("read + decode", seg_t["read_s"]),
        ("preprocess (to network grid)", seg_t["preprocess_s"]),
        ("network", seg_t["network_s"]),
        ("stitching", seg_t["stitch_s"]),
        ("postprocess + inverse resampling", seg_t["postprocess_s"]),
        ("SEG write", seg_t["seg_write_s"]),
    ]
    print(f"{'segapp infer':<36}{'s':>8}")
    for k, v in rows:
        print(f"  {k:<34}{v:8.2f}")
    print(f"  {'total (CLI, incl. config + model)':<34}{seg_t['wall_s']:8.2f}")
    print(f"  {'peak RSS above imports (MiB)':<34}{seg_rss:8.0f}")
    figures: dict = {"device": name, "shape": a.shape, "classes": a.classes, "cold": a.cold}
    figures.update(segapp=seg_t, segapp_rss_mib=seg_rss)
    if a.skip_monai:
        _write_json(a.json, figures)
        return
    mon_t, mon_labels, mon_rss = _run_child("monai", work)
    mon_total = sum(mon_t.values())
    print(f"\n{'MONAI default':<36}{'s':>8}")
    for k, v in [
        ("LoadImaged + preprocessing", mon_t["load_preprocess_s"]),
        ("network (sliding window)", mon_t["network_s"]),
        ("softmax + Invertd + argmax + SaveImaged", mon_t["invert_save_s"]),
        ("SEG write (highdicom)", mon_t["seg_write_s"]),
    ]:
        print(f"  {k:<34}{v:8.2f}")
    print(f"  {'total':<34}{mon_total:8.2f}")
    print(f"  {'peak RSS above imports (MiB)':<34}{mon_rss:8.0f}")
    dice = dice_per_label(seg_labels, mon_labels, a.classes)
    print(
        f"\nspeed-up (MONAI total / segapp total): {mon_total / seg_t['wall_s']:.2f}x; without the network: "
        f"{mon_total - mon_t['network_s']:.2f} s / {seg_t['wall_s'] - seg_t['network_s']:.2f} s = "
        f"{(mon_total - mon_t['network_s']) / (seg_t['wall_s'] - seg_t['network_s']):.2f}x"
    )
    print(f"peak RSS segapp / MONAI: {seg_rss:.0f} / {mon_rss:.0f} MiB = {seg_rss / mon_rss:.2f}")
    print("Dice segapp vs MONAI per label: " + ", ".join(f"{c}: {d:.4f}" for c, d in dice.items()))
    print(f"labels equal on {100.0 * float((seg_labels == mon_labels).mean()):.3f} % of voxels")
    figures.update(
        monai=mon_t,
        monai_rss_mib=mon_rss,
        speedup=mon_total / seg_t["wall_s"],
        dice={str(c): d for c, d in dice.items()},
    )
    _write_json(a.json, figures)
    print(f"work folder: {work}")
    if not a.workdir:
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
