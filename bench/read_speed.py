"""DICOM read speed: segapp's ``read_series`` against ``dcm2niix -z n``, side by side in one run.

    python bench/read_speed.py [--runs 5] [--slices 300] [--workers N] [--synthetic-dir DIR] [--no-shared]
                               [--idle S]

Series: a synthetic uncompressed 512 x 512 x ``--slices`` CT series (written once to
``--synthetic-dir``, default a temporary folder), and every image series under the shared data
folder (``SEGAPP_SHARED_DATA``, or ``../shared/data`` beside the checkout) that dcm2niix converts.
Each series is put alone in a folder of symbolic links, so both tools read exactly its files.

Per series it prints the median wall time of ``--runs`` runs of each (interleaved, so that both see
the same load, after one warm-up run, so that both read from the page cache; segapp in this process,
scan included; dcm2niix as a process, writing its NIfTI, flushed to disk after its timing so that the
flush does not fall in segapp's next run), their ratio, the ratio of the best runs
(on a VM whose cores now and then run at half speed, the median can land on slowed runs of one tool
and not of the other), the median CPU time (user + system) of each, and two checks of segapp's volume:

* ``=pydicom``: voxels and affine equal a plain pydicom reader written here (``dcmread`` and
  ``pixel_array`` per file, sorted along the normal, affine from the first and last position);
  ``n/a`` for mosaics, which a plain reader cannot unpack;
* ``=dcm2niix``: voxels equal dcm2niix's NIfTI (re-indexed onto segapp's grid) and the affines agree
  within 0.01 mm; ``n/a`` where dcm2niix wrote several files or another shape.

Memory: segapp's volume of one run is freed before the next, so that each run of either tool starts with
no memory of its own, as dcm2niix's process does. On a VM whose guest reports freed memory to the host
(Linux free page reporting with virtio-balloon, ``page_reporting`` on the kernel command line), memory
freed more than about 2 s earlier can cost a host fault per page at its next touch; the table's first
line prints what filling the synthetic series' float32 volume (314.6 MB at 300 slices) costs with memory
freed just before and 3 s before. ``--idle S`` waits S seconds before each timed run of either tool,
so that each meets memory the host may have reclaimed, as a freshly started process does; segapp
fills twice the memory dcm2niix does (float32 against its int16), so it loses more there.

Then the JPEG 2000 series (tests/data/totalseg_example/ct_dicom, 20 slices 512 x 512) decoded with
1 and 2 worker processes, the scan reused (``read_series(..., scan=...)``): the ratio of the medians of
``--runs`` and of the best runs.
Figures depend on the machine and on what else runs on it: quote them with the machine.
"""

from __future__ import annotations

import argparse
import logging
import os
import resource
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import nibabel as nib
import numpy as np
import pydicom

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from app.io.dicom_scan import scan  # noqa: E402  (after the sys.path line)
from app.io.dicom_series import read_series  # noqa: E402

SYNTHETIC_SIZE = 512  # rows = columns of the synthetic series
REFILL_IDLE_S = 3.0  # the refill line's second wait: past the ~2 s after which the host may reclaim


def shared_root() -> Path | None:
    env = os.environ.get("SEGAPP_SHARED_DATA")
    for p in ([Path(env)] if env else []) + [REPO.parent / "shared" / "data", REPO.parents[1] / "shared" / "data"]:
        if p.is_dir():
            return p
    return None


def write_synthetic(folder: Path, n: int, size: int = SYNTHETIC_SIZE) -> Path:
    """An uncompressed int16 CT series, ``size`` x ``size`` x ``n``, oblique-free, 0.7 x 0.7 x 1.25 mm."""
    if folder.is_dir() and len(list(folder.glob("*.dcm"))) == n:
        return folder
    from pydicom.dataset import FileDataset, FileMetaDataset
    from pydicom.uid import CTImageStorage, ExplicitVRLittleEndian, generate_uid

    folder.mkdir(parents=True, exist_ok=True)
    study, series, frame = generate_uid(), generate_uid(), generate_uid()
    j, i = np.mgrid[0:size, 0:size]
    for k in range(n):
        meta = FileMetaDataset()
        meta.MediaStorageSOPClassUID = CTImageStorage
        meta.MediaStorageSOPInstanceUID = uid = generate_uid()
        meta.TransferSyntaxUID = ExplicitVRLittleEndian
        ds = FileDataset(str(folder / f"ct{k:04d}.dcm"), {}, file_meta=meta, preamble=b"\0" * 128)
        ds.SOPClassUID, ds.SOPInstanceUID = CTImageStorage, uid
        ds.Modality, ds.Manufacturer, ds.SeriesDescription = "CT", "segapp-bench", "synthetic"
        ds.PatientName, ds.PatientID = "Bench^Synthetic", "BENCH"
        ds.StudyInstanceUID, ds.SeriesInstanceUID, ds.FrameOfReferenceUID = study, series, frame
        ds.StudyDate = ds.SeriesDate = "20240101"
        ds.StudyTime = ds.SeriesTime = "120000"
        ds.SeriesNumber, ds.InstanceNumber, ds.AcquisitionNumber = 1, k + 1, 1
        ds.ImageType = ["ORIGINAL", "PRIMARY", "AXIAL"]
        ds.ImagePositionPatient = [-179.3, -200.15, f"{-300 + 1.25 * k:.2f}"]
        ds.ImageOrientationPatient = [1, 0, 0, 0, 1, 0]
        ds.PixelSpacing = ["0.7", "0.7"]
        ds.SliceThickness, ds.KVP = "1.25", "120"
        ds.SliceLocation = f"{-300 + 1.25 * k:.2f}"
        ds.Rows = ds.Columns = size
        ds.SamplesPerPixel, ds.PhotometricInterpretation = 1, "MONOCHROME2"
        ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation = 16, 16, 15, 1
        ds.RescaleSlope, ds.RescaleIntercept, ds.RescaleType = "1", "-1024", "HU"
        ds.WindowCenter, ds.WindowWidth = "40", "400"
        ds.PixelData = (((i + 3 * j + 7 * k) % 3000) - 1000).astype(np.int16).tobytes()
        ds.save_as(ds.filename, enforce_file_format=True)
    return folder


def shared_series(root: Path, work: Path) -> list[tuple[str, Path]]:
    """Every image stack under ``root`` as (name, folder of links to its files)."""
    out = []
    for top in sorted(p for p in root.iterdir() if p.is_dir()):
        try:
            result = scan(top)
        except Exception as exc:  # noqa: BLE001 - not a DICOM folder
            print(f"skipping {top.name}: {exc}".splitlines()[0])
            continue
        for s in result.series:
            if not s.is_image:
                continue
            name = f"{top.name}/{s.description or s.key[-12:]}#{s.series_number}"
            folder = work / f"s{len(out):03d}"
            folder.mkdir()
            for n, f in enumerate(s.files):
                os.symlink(os.path.abspath(f), folder / f"{n:05d}.dcm")
            out.append((name, folder))
    return out


def plain_pydicom(folder: Path) -> tuple[np.ndarray, np.ndarray] | None:
    """The plain way: read every file with pydicom, sort along the normal, rescale; (array [i, j, k], LPS affine)."""
    dss = [pydicom.dcmread(f) for f in sorted(folder.iterdir())]
    if len(dss) == 1 and "MOSAIC" in [str(v).upper() for v in dss[0].get("ImageType", [])]:
        return None
    if any("NumberOfFrames" in ds for ds in dss):
        return None
    iop = np.array([float(v) for v in dss[0].ImageOrientationPatient])
    normal = np.cross(iop[:3], iop[3:])
    dss.sort(key=lambda ds: float(np.dot([float(v) for v in ds.ImagePositionPatient], normal)))
    slices = [ds.pixel_array * float(ds.get("RescaleSlope", 1)) + float(ds.get("RescaleIntercept", 0)) for ds in dss]
    array = np.stack(slices, axis=-1).transpose(1, 0, 2).astype(np.float32)
    first, last = (np.array([float(v) for v in ds.ImagePositionPatient]) for ds in (dss[0], dss[-1]))
    dr, dc = (float(v) for v in dss[0].PixelSpacing)
    affine = np.eye(4)
    affine[:3, 0], affine[:3, 1], affine[:3, 3] = iop[:3] * dc, iop[3:] * dr, first
    affine[:3, 2] = (last - first) / (len(dss) - 1) if len(dss) > 1 else normal * float(dss[0].get("SliceThickness", 1))
    return array, affine


def _cpu_children() -> float:
    """CPU seconds of this process' children: ended ones (getrusage) and live ones (the kept decoding
    processes of app.io.decode_pool, read from /proc)."""
    r = resource.getrusage(resource.RUSAGE_CHILDREN)
    total = r.ru_utime + r.ru_stime
    me, tick = os.getpid(), os.sysconf("SC_CLK_TCK")
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        if int(fields[1]) == me:  # ppid
            total += (int(fields[11]) + int(fields[12])) / tick  # utime + stime
    return total


def _dcm2niix_once(exe: str, folder: Path, out: Path) -> tuple[float, float, list[Path]]:
    if out.exists():
        shutil.rmtree(out)
    out.mkdir(parents=True)
    c0, t0 = _cpu_children(), time.perf_counter()
    proc = subprocess.run(
        [exe, "-z", "n", "-o", str(out), "-f", "series", str(folder)], check=False, capture_output=True
    )
    wall, cpu = time.perf_counter() - t0, _cpu_children() - c0
    files = sorted(out.glob("*.nii"))
    return wall, cpu, files if proc.returncode == 0 else []


def time_both(folder: Path, runs: int, workers: int | None, out: Path, idle: float = 0.0):
    """Interleaved runs (segapp, dcm2niix, segapp, ...) so that both see the same load; after one
    warm-up run of each. Returns medians (wall s, CPU s) of both, segapp's volume, dcm2niix's files."""
    exe = shutil.which("dcm2niix")
    read_series(folder, decode_workers=workers)  # warm-up: page cache, imports
    niis = _dcm2niix_once(exe, folder, out)[2] if exe else []
    seg, seg_cpu, d2n, d2n_cpu, vol = [], [], [], [], None
    for _ in range(runs):
        # Free the last run's volume first: held, it would keep its memory from this read (which must then
        # take pages the host may have reclaimed) and hand it to dcm2niix's run, freshly freed and cheap.
        vol = None
        time.sleep(idle)
        c0, k0, t0 = time.process_time(), _cpu_children(), time.perf_counter()
        vol = read_series(folder, decode_workers=workers)
        seg.append(time.perf_counter() - t0)
        seg_cpu.append(time.process_time() - c0 + _cpu_children() - k0)  # decoding processes included
        if exe and niis:
            time.sleep(idle)
            wall, cpu, niis = _dcm2niix_once(exe, folder, out)
            d2n.append(wall)
            d2n_cpu.append(cpu)
            os.sync()  # its NIfTI's writeback would otherwise run during segapp's next timed read
    med = statistics.median
    return (
        (med(seg), min(seg), med(seg_cpu)),
        (med(d2n), min(d2n), med(d2n_cpu)) if d2n else (None, None, None),
        vol,
        niis,
    )


def compare_nifti(vol, nii_path: Path) -> str:
    img = nib.load(nii_path)
    if len(img.shape) != 3:
        return f"n/a ({len(img.shape)}D)"
    ours = nib.orientations.io_orientation(img.affine)
    target = nib.orientations.io_orientation(vol.affine_ras)
    transform = nib.orientations.ornt_transform(ours, target)
    data = nib.orientations.apply_orientation(np.asarray(img.get_fdata(), dtype=np.float64), transform)
    affine = img.affine @ nib.orientations.inv_ornt_aff(transform, img.shape)
    if data.shape != vol.shape:
        return f"n/a (shape {data.shape})"
    diff = float(np.max(np.abs(data - vol.array))) if data.size else 0.0
    mm = float(np.max(np.abs(affine - vol.affine_ras)))
    ok = diff < 1e-3 and mm <= 0.01
    return f"{'yes' if ok else 'NO'} (max {diff:.3g}, {mm:.4f} mm)"


def compare_plain(vol, folder: Path) -> str:
    ref = plain_pydicom(folder)
    if ref is None:
        return "n/a"
    array, affine = ref
    ok = (
        array.shape == vol.shape and np.array_equal(array, vol.array) and np.allclose(affine, vol.affine_lps, atol=1e-6)
    )
    return "yes" if ok else "NO"


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--runs", type=int, default=5)
    ap.add_argument("--slices", type=int, default=300)
    ap.add_argument("--workers", type=int, default=None, help="read_series decode_workers (default: its default)")
    ap.add_argument("--synthetic-dir", type=Path, default=None)
    ap.add_argument("--no-shared", action="store_true")
    ap.add_argument(
        "--idle", type=float, default=0.0, help="seconds to wait before each timed run of either tool (see above)"
    )
    ap.add_argument("--j2k-only", action="store_true", help="only the JPEG 2000 1 vs 2 processes figure")
    a = ap.parse_args(argv)
    if a.runs < 1 or a.slices < 2 or (a.workers is not None and a.workers < 1) or not 0 <= a.idle <= 60:
        ap.error("--runs and --workers need at least 1, --slices at least 2, --idle 0 to 60 s")
    if a.synthetic_dir is not None:
        try:
            a.synthetic_dir.mkdir(parents=True, exist_ok=True)
        except OSError as exc:
            ap.error(f"--synthetic-dir {a.synthetic_dir}: cannot create it ({exc.strerror})")
    logging.disable(logging.WARNING)
    print(
        f"machine: {os.cpu_count()} CPU(s), load average {os.getloadavg()[0]:.2f}; dcm2niix: "
        f"{shutil.which('dcm2niix') or 'not installed (pip install dcm2niix)'}"
    )
    if not a.j2k_only:
        series_table(a)
    j2k_processes(a.runs)
    return 0


def series_table(a: argparse.Namespace) -> None:
    voxels = SYNTHETIC_SIZE**2 * a.slices
    warm, reclaimed = refill_cost(voxels, REFILL_IDLE_S)
    print(
        f"filling the synthetic float32 volume's {voxels * 4 / 1e6:.1f} MB of memory freed just before: "
        f"{warm:.3f} s, freed {REFILL_IDLE_S:g} s before: {reclaimed:.3f} s; idle before each timed run: {a.idle:g} s"
    )
    with tempfile.TemporaryDirectory(prefix="segapp_read_speed_") as tmp:
        work = Path(tmp)
        synthetic = write_synthetic(a.synthetic_dir or work / "synthetic", a.slices)
        cases = [(f"synthetic CT {SYNTHETIC_SIZE}x{SYNTHETIC_SIZE}x{a.slices} (uncompressed)", synthetic)]
        root = None if a.no_shared else shared_root()
        if root is not None:
            links = work / "links"
            links.mkdir()
            cases += shared_series(root, links)
        print(
            f"{'series':52s} {'files':>5s} {'shape':>12s} {'segapp s':>8s} {'dcm2niix s':>10s} {'ratio':>5s} "
            f"{'best':>5s} {'CPU s (segapp/d2n)':>18s} {'=pydicom':>8s}  =dcm2niix"
        )
        for n, (name, folder) in enumerate(cases):
            (t_seg, b_seg, c_seg), (t_d2n, b_d2n, c_d2n), vol, niis = time_both(
                folder, a.runs, a.workers, work / f"nii{n}", a.idle
            )
            ratio = f"{t_seg / t_d2n:5.2f} {b_seg / b_d2n:5.2f}" if t_d2n and b_d2n else "  n/a   n/a"
            d2n = f"{t_d2n:10.3f}" if t_d2n else "       n/a"
            cpu = f"{c_seg:.3f}/{c_d2n:.3f}" if c_d2n is not None else f"{c_seg:.3f}/n/a"
            same_d2n = compare_nifti(vol, niis[0]) if len(niis) == 1 else f"n/a ({len(niis)} files)"
            shape = "x".join(map(str, vol.shape))
            print(
                f"{name[:52]:52s} {len(list(folder.iterdir())):5d} {shape:>12s} {t_seg:8.3f} {d2n} {ratio} "
                f"{cpu:>18s} {compare_plain(vol, folder):>8s}  {same_d2n}",
                flush=True,
            )


def refill_cost(voxels: int, idle: float) -> tuple[float, float]:
    """Seconds to fill a fresh float32 array of ``voxels`` right after freeing as much, and after ``idle``
    seconds more (the second is larger where the guest reports freed memory to the host)."""

    def fill() -> float:
        t0 = time.perf_counter()
        np.empty(voxels, np.float32).fill(1.0)  # freed on return
        return time.perf_counter() - t0

    fill()
    warm = fill()
    time.sleep(idle)
    return warm, fill()


def _burn(n: int) -> float:
    t0, x = time.perf_counter(), 0
    for i in range(n):
        x += i * i
    return time.perf_counter() - t0


def free_core_speedup(n: int = 3_000_000) -> float:
    """How much faster two processes burn CPU than one right now (2.0 = two free cores)."""
    import multiprocessing as mp

    t0 = time.perf_counter()
    _burn(n)
    _burn(n)
    serial = time.perf_counter() - t0
    with mp.get_context("fork").Pool(2) as pool:
        t0 = time.perf_counter()
        pool.map(_burn, [n, n])
        parallel = time.perf_counter() - t0
    return serial / parallel


def j2k_processes(runs: int) -> None:
    """The JPEG 2000 series decoded with 1 and 2 worker processes (scan reused), interleaved runs."""
    j2k = REPO / "tests" / "data" / "totalseg_example" / "ct_dicom"
    result = scan(j2k)
    wall: dict[int, list[float]] = {1: [], 2: []}
    cpu: dict[int, list[float]] = {1: [], 2: []}
    for workers in (1, 2):  # warm-up: page cache, the decoding processes
        read_series(j2k, scan=result, decode_workers=workers)
    for _ in range(runs):  # interleaved, so that both see the same load
        for workers in (1, 2):
            c0, k0, t0 = time.process_time(), _cpu_children(), time.perf_counter()
            read_series(j2k, scan=result, decode_workers=workers)
            wall[workers].append(time.perf_counter() - t0)
            cpu[workers].append(time.process_time() - c0 + _cpu_children() - k0)
    med = statistics.median
    print(
        f"JPEG 2000 CT 512x512x20, scan reused: 1 process {med(wall[1]):.3f} s (CPU {med(cpu[1]):.3f} s), "
        f"2 processes {med(wall[2]):.3f} s (CPU {med(cpu[2]):.3f} s): speed-up {med(wall[1]) / med(wall[2]):.2f}x "
        f"(best runs: {min(wall[1]) / min(wall[2]):.2f}x; load average now {os.getloadavg()[0]:.2f}; "
        f"a plain 2-process CPU burn: {free_core_speedup():.2f}x)"
    )


if __name__ == "__main__":
    sys.exit(main())
