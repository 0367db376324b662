"""Property-based fuzzing of the DICOM series reader (hypothesis).

A small valid phantom (single-frame series, enhanced multi-frame object, Siemens mosaic) is copied
and damaged at random: geometry and pixel-module attributes deleted or given other values or VRs,
files truncated, bytes overwritten, files removed or duplicated. Every outcome must be

* a correct read: finite voxels, a finite non-singular affine whose voxel ``(0, 0, k)`` is slice
  ``k``'s ImagePositionPatient, one header per slice, the grid of the headers' Rows x Columns; and
  the fast reader gives the same volume as the plain pydicom reference (``fast=False``); or
* a ``SegappError`` (from both readers), never another exception.

CI runs a bounded, derandomised number of examples per property (``FUZZ_EXAMPLES``);
``bench/fuzz_dicom.py --examples N`` runs the same properties with N random examples each.
"""

from __future__ import annotations

import os
import shutil
import struct
import tempfile
import warnings
from pathlib import Path

import numpy as np
import pydicom
import pytest
from dicom_phantoms import write_enhanced_multiframe, write_mosaic, write_phantom_series
from hypothesis import HealthCheck, assume, given, settings
from hypothesis import strategies as st

from app.errors import SegappError
from app.io.dicom_series import read_series

FUZZ_EXAMPLES = int(os.environ.get("SEGAPP_FUZZ_EXAMPLES", "60"))

# Attributes a hostile file may lack or spoil: geometry, the pixel module, identity, rescale.
TAGS = [
    "ImagePositionPatient",
    "ImageOrientationPatient",
    "PixelSpacing",
    "SliceThickness",
    "SpacingBetweenSlices",
    "Rows",
    "Columns",
    "BitsAllocated",
    "BitsStored",
    "HighBit",
    "PixelRepresentation",
    "SamplesPerPixel",
    "PhotometricInterpretation",
    "RescaleSlope",
    "RescaleIntercept",
    "NumberOfFrames",
    "SeriesInstanceUID",
    "StudyInstanceUID",
    "SeriesNumber",
    "Modality",
    "ImageType",
    "PixelData",
    "EchoNumbers",
    "TemporalPositionIdentifier",
    "AcquisitionNumber",
    "PerFrameFunctionalGroupsSequence",
    "SharedFunctionalGroupsSequence",
    "PlanarConfiguration",
    "ModalityLUTSequence",
]
VRS = ["UN", "OB", "LO", "DS", "IS", "US", "SS", "UL", "FD", "FL", "CS", "SQ"]

_numbers = st.one_of(st.integers(-70000, 70000), st.floats(allow_nan=True, allow_infinity=True, width=32))
_texts = st.one_of(
    st.sampled_from(
        [
            "",
            "nan",
            "inf",
            "-inf",
            "0",
            "-1",
            "1e308",
            "-1e-320",
            "1\\0",
            "0\\0\\0\\0\\0\\0",
            "1\\0\\0\\0\\1\\0",
            "0\\1\\0\\0\\0\\-1",
            "1\\1",
            "-0.5\\0.5",
            "MONOCHROME1",
            "RGB",
            "YBR_FULL",
            "ORIGINAL\\PRIMARY\\MOSAIC",
            "2",
            "8",
            "12",
            "16",
            "32",
            "65535",
        ]
    ),
    st.text(st.characters(codec="latin-1"), max_size=20),
    _numbers.map(str),
    st.lists(_numbers.map(str), min_size=1, max_size=7).map("\\".join),
)

mutation = st.one_of(
    st.tuples(st.just("delete"), st.integers(0, 50), st.sampled_from(TAGS)),
    st.tuples(st.just("value"), st.integers(0, 50), st.sampled_from(TAGS), st.one_of(_texts, _numbers)),
    st.tuples(st.just("vr"), st.integers(0, 50), st.sampled_from(TAGS), st.sampled_from(VRS)),
    st.tuples(st.just("truncate"), st.integers(0, 50), st.floats(0.0, 1.0)),
    st.tuples(st.just("bytes"), st.integers(0, 50), st.floats(0.0, 1.0), st.binary(min_size=1, max_size=16)),
    st.tuples(st.just("remove"), st.integers(0, 50)),
    st.tuples(st.just("duplicate"), st.integers(0, 50)),
)

_TEMPLATES: dict[str, Path] = {}


def _template(kind: str) -> Path:
    """A valid phantom of ``kind`` written once per process."""
    if kind not in _TEMPLATES:
        root = Path(tempfile.mkdtemp(prefix=f"segapp_fuzz_{kind}_"))
        if kind == "series":
            write_phantom_series(root, shape=(8, 6, 5), orientation="oblique", rescale=(0.5, -100.0))
        elif kind == "multiframe":
            write_enhanced_multiframe(root / "mf.dcm", shape=(8, 6, 5), orientation="coronal")
        else:
            write_mosaic(root, shape=(6, 5, 5), orientation="oblique")
        _TEMPLATES[kind] = root
    return _TEMPLATES[kind]


def _apply(folder: Path, mutations: list[tuple]) -> bool:
    """Damage the copy in ``folder``; False when pydicom cannot even write the damage (not an example)."""
    for m in mutations:
        files = sorted(folder.iterdir())
        if not files:
            return True
        f = files[m[1] % len(files)]
        kind = m[0]
        if kind in ("delete", "value", "vr"):
            try:
                with warnings.catch_warnings():
                    warnings.simplefilter("ignore")
                    ds = pydicom.dcmread(f, force=True)
                    name = m[2]
                    if kind == "delete":
                        if name in ds:
                            delattr(ds, name)
                    elif kind == "value":
                        setattr(ds, name, m[3])
                    elif name in ds:
                        ds[name].VR = m[3]
                    ds.save_as(f)
            except Exception:  # noqa: BLE001 - pydicom refuses to write some damage: skip the example
                return False
        elif kind == "truncate":
            data = f.read_bytes()
            f.write_bytes(data[: int(len(data) * m[2])])
        elif kind == "bytes":
            data = bytearray(f.read_bytes())
            at = int(len(data) * m[2])
            data[at : at + len(m[3])] = m[3]
            f.write_bytes(bytes(data))
        elif kind == "remove":
            f.unlink()
        else:
            shutil.copy(f, folder / f"copy_{len(files)}_{f.name}")
    return True


def _check_volume(vol) -> None:
    """What a correct read must satisfy, whatever the damage."""
    ni, nj, nk = vol.shape
    assert len(vol.datasets) == len(vol.source_files) == len(vol.frame_numbers) == nk >= 1
    assert np.all(np.isfinite(vol.array))
    affine = vol.affine_lps
    assert np.all(np.isfinite(affine)) and abs(np.linalg.det(affine[:3, :3])) > 1e-9
    if vol.tile_numbers:
        return
    first = vol.datasets[0]
    assert (int(first.Rows), int(first.Columns)) == (nj, ni)
    for k, (ds, frame) in enumerate(zip(vol.datasets, vol.frame_numbers)):
        # Voxel (0, 0, k) is slice k's position: IPP, or the frame's PlanePositionSequence.
        if "PerFrameFunctionalGroupsSequence" in ds:
            value = ds.PerFrameFunctionalGroupsSequence[frame - 1].PlanePositionSequence[0].ImagePositionPatient
        else:
            value = ds.ImagePositionPatient
        ipp = np.array([float(v) for v in value])
        np.testing.assert_allclose(affine[:3, :3] @ [0, 0, k] + affine[:3, 3], ipp, atol=0.02 * (1 + nk))


def _outcome(folder: Path, fast: bool):
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # pydicom warns about the damage it reads
            return read_series(folder, fast=fast, decode_workers=1)
    except SegappError as exc:
        assert str(exc).strip(), "an error must say what is wrong"
        assert "cannot group the DICOM files" not in str(exc), f"grouping failed: {exc!r}"  # the scan's last resort
        return exc


def _brief(outcome) -> str:
    return repr(outcome) if isinstance(outcome, Exception) else f"volume {outcome.shape}"


def check_damaged(kind: str, mutations: list[tuple]) -> None:
    """The property: damage a copy of the ``kind`` phantom, read it fast and plain; both agree and are sane."""
    with tempfile.TemporaryDirectory(prefix="segapp_fuzz_") as tmp:
        folder = Path(tmp) / "case"
        shutil.copytree(_template(kind), folder)
        if not _apply(folder, mutations):
            assume(False)
        fast = _outcome(folder, True)
        plain = _outcome(folder, False)
        if isinstance(fast, SegappError) or isinstance(plain, SegappError):
            assert type(fast) is type(plain), f"fast: {_brief(fast)}; plain: {_brief(plain)}"
            return
        _check_volume(fast)
        np.testing.assert_array_equal(fast.array, plain.array)
        np.testing.assert_array_equal(fast.affine_lps, plain.affine_lps)


_SETTINGS = {
    "max_examples": FUZZ_EXAMPLES,
    "deadline": None,
    "database": None,
    "derandomize": True,
    "suppress_health_check": [HealthCheck.too_slow, HealthCheck.filter_too_much],
}


@settings(**_SETTINGS)
@given(mutations=st.lists(mutation, min_size=1, max_size=4))
def test_damaged_single_frame_series(mutations):
    check_damaged("series", mutations)


@settings(**_SETTINGS)
@given(mutations=st.lists(mutation, min_size=1, max_size=3))
def test_damaged_enhanced_multiframe(mutations):
    check_damaged("multiframe", mutations)


@settings(**_SETTINGS)
@given(mutations=st.lists(mutation, min_size=1, max_size=3))
def test_damaged_mosaic(mutations):
    check_damaged("mosaic", mutations)


def test_undamaged_templates_read():
    """The properties start from valid input (else every example would only test refusals)."""
    for kind in ("series", "multiframe", "mosaic"):
        vol = read_series(_template(kind))
        _check_volume(vol)
        assert vol.shape[2] == 5


def test_header_length_lies_are_refused(tmp_path):
    """A fixed example of the byte damage above: a Rows value element whose length points past the file."""
    info = write_phantom_series(tmp_path, shape=(8, 6, 5))
    data = bytearray(info.files[2].read_bytes())
    at = data.find(struct.pack("<HH", 0x0028, 0x0010) + b"US")
    data[at + 6 : at + 8] = struct.pack("<H", 0xFFF0)
    info.files[2].write_bytes(bytes(data))
    with pytest.raises(SegappError):
        read_series(tmp_path)
