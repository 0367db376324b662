"""Hostile NIfTI files: a valid, asymmetric, oblique base image and edits of its header bytes.

``base_image()`` is a small int16 volume (a ramp plus an off-centre block, so flips and shifts show)
on an oblique grid with sform and qform set. ``nifti_bytes(img, edits, gz, cut)`` writes it with
NIfTI-1 header fields overwritten at their byte offsets (``FIELDS``), optionally gzipped and cut
short. ``mutations()`` is the hypothesis strategy the fuzz test (``tests/inference/test_nifti_fuzz.py``)
and ``bench/fuzz_nifti.py`` draw from: random dims, pixdim, datatype, bitpix, sform/qform codes and
values, vox_offset, scl_slope/inter, magic, compression and truncation.
"""

from __future__ import annotations

import gzip
import math
import struct
from dataclasses import dataclass, field

import nibabel as nib
import numpy as np
from hypothesis import strategies as st

BASE_SHAPE = (11, 9, 7)

# NIfTI-1 header: field -> (byte offset, struct format of one element, number of elements)
FIELDS = {
    "sizeof_hdr": (0, "i", 1),
    "dim": (40, "h", 8),
    "datatype": (70, "h", 1),
    "bitpix": (72, "h", 1),
    "pixdim": (76, "f", 8),
    "vox_offset": (108, "f", 1),
    "scl_slope": (112, "f", 1),
    "scl_inter": (116, "f", 1),
    "qform_code": (252, "h", 1),
    "sform_code": (254, "h", 1),
    "quatern": (256, "f", 3),  # b, c, d
    "qoffset": (268, "f", 3),
    "srow_x": (280, "f", 4),
    "srow_y": (296, "f", 4),
    "srow_z": (312, "f", 4),
    "magic": (344, "4s", 1),
}
NIFTI_TYPES = [2, 4, 8, 16, 32, 64, 128, 256, 512, 768, 1024, 1280, 1536, 1792, 2048, 2304]


def oblique_affine() -> np.ndarray:
    """Voxel -> RAS: 1.3 x 0.9 x 2.1 mm voxels, rotated 20 deg about z and 10 deg about x, off-centre."""
    a, b = math.radians(20), math.radians(10)
    rz = np.array([[math.cos(a), -math.sin(a), 0], [math.sin(a), math.cos(a), 0], [0, 0, 1]])
    rx = np.array([[1, 0, 0], [0, math.cos(b), -math.sin(b)], [0, math.sin(b), math.cos(b)]])
    aff = np.eye(4)
    aff[:3, :3] = rz @ rx @ np.diag([1.3, 0.9, 2.1])
    aff[:3, 3] = [-12.5, 30.25, -7.0]
    return aff


def base_array(shape: tuple[int, ...] = BASE_SHAPE) -> np.ndarray:
    i, j, k = np.meshgrid(*(np.arange(s) for s in shape[:3]), indexing="ij")
    arr = (10 * i + 3 * j + k).astype(np.int16)
    arr[1:4, 5:8, 2:5] += 400  # an off-centre block
    return arr


def base_image(shape: tuple[int, ...] = BASE_SHAPE, dtype=np.int16) -> nib.Nifti1Image:
    img = nib.Nifti1Image(base_array(shape).astype(dtype), oblique_affine())
    img.set_sform(oblique_affine(), code=1)
    img.set_qform(oblique_affine(), code=1)
    return img


@dataclass
class Case:
    """One hostile file: header edits ``[(field, index, value)]``, gzip or not, and a cut (fraction kept)."""

    edits: list[tuple[str, int, object]] = field(default_factory=list)
    gz: bool = False
    cut: float | None = None

    @property
    def suffix(self) -> str:
        return ".nii.gz" if self.gz else ".nii"


def nifti_bytes(img: nib.Nifti1Image, edits=(), gz: bool = False, cut: float | None = None) -> bytes:
    """The file's bytes with header ``edits`` applied, gzipped when ``gz``, then cut to ``cut`` of its length."""
    raw = bytearray(img.to_bytes())
    for name, index, value in edits:
        offset, fmt, count = FIELDS[name]
        if index >= count:
            raise ValueError(f"{name} has {count} element(s)")
        size = struct.calcsize("<" + fmt)
        struct.pack_into("<" + fmt, raw, offset + index * size, value)
    data = gzip.compress(bytes(raw), mtime=0) if gz else bytes(raw)
    if cut is not None:
        data = data[: int(len(data) * cut)]
    return data


def write_case(path, case: Case, img: nib.Nifti1Image | None = None):
    path.write_bytes(nifti_bytes(img or base_image(), case.edits, case.gz, case.cut))
    return path


# -- hypothesis strategies ---------------------------------------------------------------------------------
_SPECIAL_FLOATS = [0.0, -0.0, 1.0, -1.0, 1e-30, 1e-6, 1e5, 1e30, -1e30, math.nan, math.inf, -math.inf]
_floats = st.one_of(st.sampled_from(_SPECIAL_FLOATS), st.floats(-1e4, 1e4, width=32))
_dims = st.one_of(st.sampled_from([-32768, -1, 0, 1, 2, 3, 4, 5, 7, 8, 3000, 30000, 32767]), st.integers(-3, 40))
_codes = st.one_of(st.integers(0, 4), st.sampled_from([-1, 5, 1000]))


def _edit() -> st.SearchStrategy[tuple[str, int, object]]:
    return st.one_of(
        st.tuples(st.just("dim"), st.integers(0, 7), _dims),
        st.tuples(st.just("pixdim"), st.integers(0, 7), _floats),
        st.tuples(st.just("datatype"), st.just(0), st.one_of(st.sampled_from(NIFTI_TYPES), st.integers(-1, 3000))),
        st.tuples(st.just("bitpix"), st.just(0), st.sampled_from([0, 1, 8, 16, 32, 64, 128, -8])),
        st.tuples(st.just("vox_offset"), st.just(0), st.sampled_from([0.0, 100.0, 348.0, 352.0, 353.5, 356.0, 1e6])),
        st.tuples(st.sampled_from(["scl_slope", "scl_inter"]), st.just(0), _floats),
        st.tuples(st.sampled_from(["qform_code", "sform_code"]), st.just(0), _codes),
        st.tuples(st.sampled_from(["quatern", "qoffset"]), st.integers(0, 2), _floats),
        st.tuples(st.sampled_from(["srow_x", "srow_y", "srow_z"]), st.integers(0, 3), _floats),
        st.tuples(st.just("magic"), st.just(0), st.sampled_from([b"n+1\0", b"ni1\0", b"n+2\0", b"xxxx"])),
        st.tuples(st.just("sizeof_hdr"), st.just(0), st.sampled_from([0, 348, 540, 1234])),
    )


def mutations() -> st.SearchStrategy[Case]:
    """Random hostile edits of the base file: 1-4 header edits, gzip or not, sometimes cut short."""
    return st.builds(
        Case,
        edits=st.lists(_edit(), min_size=1, max_size=4),
        gz=st.booleans(),
        cut=st.one_of(st.none(), st.none(), st.floats(0.0, 0.999)),
    )


# -- the property: a correct result or a SegappError, and nothing left behind on error ----------------------
def outcome_label(message: str, path) -> str:
    """The kind of refusal, without the file name and the numbers (for counting outcomes)."""
    text = message.removeprefix(f"{path}: ")
    for stop in ("(", ";", ":"):
        text = text.split(stop, 1)[0]
    return " ".join(w for w in text.split() if not any(c.isdigit() for c in w)).strip() or text


def check_infer_outcome(segmenter, case: Case, folder) -> str:
    """Run ``segapp infer``'s steps (``plan_nifti_jobs``, then ``Segmenter.nifti``) on one hostile file.

    Asserts: either every output is on the input's grid (shape and affine as nibabel reads the input),
    or a ``SegappError`` of one line naming the file, with nothing left in the output folder but the
    failed series' summary. Any other exception propagates (a bug). Returns ``ok`` or the refusal's kind.
    """
    import json

    from app.errors import SegappError
    from app.inference.jobs import plan_nifti_jobs

    src = write_case(folder / f"in{case.suffix}", case)
    out = folder / "out"
    try:
        results = [segmenter.nifti(job.path, out, stem=job.key) for job in plan_nifti_jobs(src, out)]
    except SegappError as exc:
        message = str(exc)
        assert "\n" not in message, message
        assert message.startswith((f"{src}: ", f"{out}: ")), message
        left = sorted(p.relative_to(out).as_posix() for p in out.rglob("*")) if out.exists() else []
        assert left in ([], ["in_summary.json"]), left
        if left:
            record = json.loads((out / "in_summary.json").read_text())
            assert record["status"] == "failed" and record["outputs"] == {} and record["error"] == message
        return f"{type(exc).__name__}: {outcome_label(message, src)}"
    (res,) = results
    ref = nib.load(str(src))
    seg = nib.load(res.outputs["nifti"])
    assert math.prod(ref.shape[3:]) == 1 and seg.shape == ref.shape[:3], (seg.shape, ref.shape)
    scale = max(1.0, float(np.abs(ref.affine).max()))
    np.testing.assert_allclose(seg.affine, ref.affine, rtol=0, atol=1e-5 * scale)
    assert sorted(res.outputs) == ["nifti"]
    return "ok"
