"""SEG writing speed: segapp's fast engine vs highdicom's ``Segmentation(...)`` + ``save_as``.

The case of issue "Speed where the time goes": a 512 x 512 x 300 series, 3 labels, 150 non-empty
frames. The source headers are copies of a real GE CT header (``tests/data/dicom_seg_refs``, 111
attributes, pixel data dropped) with per-slice UIDs and positions, so highdicom does the work it
does on a real series.

Timed (best and median of ``--repeats``, after one untimed warm-up of each, each write into a new file;
highdicom alone and fast one after the other in every repeat, highdicom with its input in a loop of its
own):

  highdicom  ``hd.seg.Segmentation(...)`` + ``save_as`` alone: its inputs (the [k, j, i] segment-number
             array, the repaired source headers, the segment descriptions) are built outside the timing;
             once more saved as segapp saves every output (a temp file, fsync, rename: ``save_as`` alone
             leaves the file in the page cache, segapp's write waits until it is on disk); and once more
             with the [k, j, i] array made from the same [i, j, k] label map inside the timing
  fast       ``write_seg(..., engine="fast")`` from the ``[i, j, k]`` label map to the file: every
             check, the source headers, the descriptions, the frames, the file
  write_seg(engine="highdicom") is printed too: what write_seg cost before (its own preparation + highdicom)

And the first write of a fresh process (``--first``, each in its own process, highdicom and segapp
imported before the clock starts): what a one-shot ``segapp infer`` pays, highdicom's module tables
included (a 22 MB JSON its ``SOPClass`` parses once per process; the fast engine does not read it).

Then it checks that both files carry the same attributes and pixel data (``tests/helpers/seg_compare.py``),
that highdicom and segapp read the fast file back equal to the label map, and prints it all.

    python bench/seg_write_speed.py                # about 30 s on 2 CPU cores
    python bench/seg_write_speed.py --repeats 9
"""

from __future__ import annotations

import argparse
import copy
import statistics
import sys
import tempfile
import time
import warnings
from pathlib import Path

import numpy as np
import pydicom
from pydicom.uid import generate_uid

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "tests" / "helpers"))  # seg_compare
# app modules are imported where used, after the path is set

CT_HEADER = ROOT / "tests" / "data" / "dicom_seg_refs" / "dcmqi" / "data" / "segmentations" / "ct-3slice" / "01.dcm"
ALGO = ("bench", "1")


def specs():
    from app.io.segments import SegmentSpec

    return [
        SegmentSpec(1, "liver", type_code=("10200004", "SCT", "Liver")),
        SegmentSpec(2, "spleen", type_code=("78961009", "SCT", "Spleen")),
        SegmentSpec(3, "kidney", type_code=("64033007", "SCT", "Kidney")),
    ]


def series_like_ct(nk: int):
    """``nk`` headers copied from a real 512 x 512 CT header (new UIDs, positions 1 mm apart), no pixels."""
    template = pydicom.dcmread(CT_HEADER, stop_before_pixels=True)
    study, series, frame_ref = generate_uid(), generate_uid(), generate_uid()
    iop = [float(v) for v in template.ImageOrientationPatient]
    row, col = np.array(iop[:3]), np.array(iop[3:])
    normal = np.cross(row, col)
    origin = np.array([float(v) for v in template.ImagePositionPatient])
    ps = [float(v) for v in template.PixelSpacing]
    headers = []
    for k in range(nk):
        d = copy.deepcopy(template)  # a copy per slice: assigning to shared elements would change them all
        d.StudyInstanceUID, d.SeriesInstanceUID, d.FrameOfReferenceUID = study, series, frame_ref
        d.SOPInstanceUID = generate_uid()
        d.InstanceNumber = k + 1
        d.ImagePositionPatient = [f"{v:.3f}" for v in origin + k * 1.0 * normal]
        d.SliceThickness = "1.0"
        headers.append(d)
    affine = np.eye(4)
    affine[:3, 0], affine[:3, 1], affine[:3, 2] = row * ps[1], col * ps[0], normal * 1.0
    affine[:3, 3] = origin
    from app.io.volume import SeriesVolume

    return SeriesVolume(
        np.zeros((int(template.Columns), int(template.Rows), nk), np.float32), affine, headers, [1] * nk
    )


def labels_for(shape) -> np.ndarray:
    """Three boxes: 60 + 60 + 30 = 150 non-empty frames (on a 300-slice grid)."""
    labels = np.zeros(shape, np.uint8)
    labels[100:250, 100:300, 100:160] = 1
    labels[260:400, 150:350, 110:170] = 2
    labels[50:90, 300:450, 120:150] = 3
    return labels


def highdicom_inputs(vol, labels: np.ndarray):
    from app.io.dicom_source import prepare_source_headers
    from app.io.segments import segment_descriptions

    return (
        prepare_source_headers(vol),
        np.ascontiguousarray(labels.transpose(2, 1, 0)),
        segment_descriptions(specs(), ALGO),
    )


def run_highdicom(inputs, out: Path, labels_ijk: np.ndarray | None = None) -> None:
    """highdicom's Segmentation + save_as; with ``labels_ijk``, its pixel array is made from it first."""
    import highdicom as hd

    sources, pixels, descriptions = inputs
    if labels_ijk is not None:
        pixels = np.ascontiguousarray(labels_ijk.transpose(2, 1, 0))  # highdicom wants [frame, row, column]
    seg = hd.seg.Segmentation(
        source_images=sources,
        pixel_array=pixels,
        segmentation_type="BINARY",
        segment_descriptions=descriptions,
        series_instance_uid=generate_uid(),
        series_number=900,
        sop_instance_uid=generate_uid(),
        instance_number=1,
        manufacturer="segapp",
        manufacturer_model_name="segapp",
        software_versions="segapp",
        device_serial_number="0",
        content_label="SEGAPP",
        content_description="segapp segmentation",
    )
    seg.save_as(out, enforce_file_format=True)


def first_write(engine: str, slices: int) -> float:
    """Seconds of the first write of this process: ``engine`` "fast" (write_seg) or "highdicom" (alone)."""
    import highdicom  # noqa: F401  (imported before the clock starts, as app.io.seg_write is)

    from app.io.seg_write import write_seg

    warnings.filterwarnings("ignore", category=UserWarning)
    vol = series_like_ct(slices)
    labels = labels_for(vol.shape)
    with tempfile.TemporaryDirectory() as tmp:
        inputs = highdicom_inputs(vol, labels) if engine == "highdicom" else None
        t0 = time.perf_counter()
        if engine == "highdicom":
            run_highdicom(inputs, Path(tmp) / "hd.dcm")
        else:
            write_seg(vol, labels, specs(), ALGO, Path(tmp) / "fast.dcm", engine="fast")
        return time.perf_counter() - t0


def first_writes(slices: int, runs: int = 3) -> dict[str, list[float]]:
    """:func:`first_write` of each engine, ``runs`` fresh processes each, alternating."""
    import subprocess

    out: dict[str, list[float]] = {"highdicom": [], "fast": []}
    for _ in range(runs):
        for engine in out:
            cmd = [sys.executable, __file__, "--slices", str(slices), "--first", engine]
            proc = subprocess.run(cmd, capture_output=True, text=True, check=True)
            out[engine].append(float(proc.stdout.split()[-1]))
    return out


def timed_interleaved(writers: dict, repeats: int, folder: Path) -> dict[str, list[float]]:
    """Seconds of each ``writers[name](path)``, one of each in turn per repeat (this VM's speed drifts
    from one minute to the next: each ratio then compares writes made side by side). Every write
    makes a new file, as every series' SEG is one (writing over a file first frees the old one's
    blocks); each is removed after its timing."""
    for name, write in writers.items():  # warm-up: imports, highdicom's module tables
        write(folder / f"{name}_warm.dcm")
    out: dict[str, list[float]] = {name: [] for name in writers}
    for r in range(repeats):
        for name, write in writers.items():
            path = folder / f"{name}_{r}.dcm"
            t0 = time.perf_counter()
            write(path)
            out[name].append(time.perf_counter() - t0)
            path.unlink()
    return out


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--slices", type=int, default=300)
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--first", choices=("fast", "highdicom"), help="(internal) time this process's first write")
    args = ap.parse_args(argv)
    if args.slices < 170 or args.repeats < 1:
        ap.error("--slices needs at least 170 (the labels lie on slices 100-169), --repeats at least 1")
    if args.first:
        print(f"{first_write(args.first, args.slices):.4f}")
        return 0
    from app.io.atomic import atomic_write
    from app.io.seg_read import read_seg
    from app.io.seg_write import write_seg

    seg_specs = specs()
    warnings.filterwarnings("ignore", category=UserWarning)
    vol = series_like_ct(args.slices)
    labels = labels_for(vol.shape)
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        inputs = highdicom_inputs(vol, labels)
        times = timed_interleaved(
            {
                "highdicom": lambda path: run_highdicom(inputs, path),
                "fast": lambda path: write_seg(vol, labels, seg_specs, ALGO, path, engine="fast"),
                "highdicom_atomic": lambda path: atomic_write(path, lambda tmp: run_highdicom(inputs, tmp)),
            },
            args.repeats,
            tmp,
        )
        hd_s, fast_s, hd_atomic_s = times["highdicom"], times["fast"], times["highdicom_atomic"]
        # on its own: its 78 MB transpose would leave the next write of a shared loop a cold cache
        hd_t_s = timed_interleaved(
            {"highdicom_with_input": lambda path: run_highdicom(inputs, path, labels)}, args.repeats, tmp
        )["highdicom_with_input"]
        ws_hd_s = timed_interleaved(
            {"ws_hd": lambda path: write_seg(vol, labels, seg_specs, ALGO, path, engine="highdicom")},
            max(1, args.repeats // 2),
            tmp,
        )["ws_hd"]

        from seg_compare import assert_same_seg

        write_seg(vol, labels, seg_specs, ALGO, tmp / "fast.dcm", engine="fast")
        write_seg(vol, labels, seg_specs, ALGO, tmp / "ref.dcm", engine="highdicom")
        try:
            fast_ds, _ = assert_same_seg(tmp / "fast.dcm", tmp / "ref.dcm")
            same = "yes (every attribute, frame order, per-frame groups, pixel data)"
        except AssertionError as exc:
            fast_ds, same = pydicom.dcmread(tmp / "fast.dcm"), f"NO: {exc}"
        back, _ = read_seg(tmp / "fast.dcm", vol)
        ours_equal = bool(np.array_equal(back, labels))
        import highdicom as hd

        uids = [str(d.SOPInstanceUID) for d in vol.datasets]  # k order
        hd_px = hd.seg.segread(tmp / "fast.dcm").get_pixels_by_source_instance(uids, combine_segments=True)
        hd_equal = bool(np.array_equal(hd_px, labels.transpose(2, 1, 0)))  # [k, row j, column i]
        size_mb = (tmp / "fast.dcm").stat().st_size / 1e6

    firsts = first_writes(args.slices)

    def fmt(xs):
        return f"best {min(xs):.3f} s, median {statistics.median(xs):.3f} s"

    print(
        f"case: {vol.shape[0]}x{vol.shape[1]}x{vol.shape[2]}, 3 labels, {int(fast_ds.NumberOfFrames)} frames, "
        f"SEG {size_mb:.1f} MB; source headers: copies of a GE CT header"
    )
    print(f"highdicom Segmentation + save_as (inputs prepared outside): {fmt(hd_s)}")
    print(f"highdicom, saved as segapp saves (temp file, fsync, rename): {fmt(hd_atomic_s)}")
    print(f"highdicom, its [k, j, i] input made from labels_ijk too:     {fmt(hd_t_s)}")
    print(f"segapp write_seg(engine='fast'), labels_ijk -> file:        {fmt(fast_s)}")
    print(f"segapp write_seg(engine='highdicom') (the previous path):    {fmt(ws_hd_s)}")
    print(
        f"ratio highdicom alone / fast: {min(hd_s) / min(fast_s):.1f}x (best), "
        f"{statistics.median(hd_s) / statistics.median(fast_s):.1f}x (median); "
        f"both saved alike (fsync): {min(hd_atomic_s) / min(fast_s):.1f}x (best), "
        f"{statistics.median(hd_atomic_s) / statistics.median(fast_s):.1f}x (median); "
        f"with its input: {min(hd_t_s) / min(fast_s):.1f}x (best), "
        f"{statistics.median(hd_t_s) / statistics.median(fast_s):.1f}x (median); "
        f"previous write_seg / fast: {min(ws_hd_s) / min(fast_s):.1f}x (best)"
    )
    print(
        f"first write of a fresh process (3 each): highdicom alone {fmt(firsts['highdicom'])}; "
        f"fast {fmt(firsts['fast'])}; ratio {min(firsts['highdicom']) / min(firsts['fast']):.1f}x (best)"
    )
    print(f"same object as highdicom's: {same}")
    print(f"fast SEG read back equal: segapp read_seg {ours_equal}, highdicom segread/get_volume {hd_equal}")
    return 0 if same.startswith("yes") and ours_equal and hd_equal else 1


if __name__ == "__main__":
    sys.exit(main())
