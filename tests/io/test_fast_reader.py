"""The fast reader (header parsed once, pixels read from their file offset, compressed frames in worker
processes) equals the plain pydicom reader (``fast=False``) voxel for voxel, affine and errors."""

from __future__ import annotations

import os
import re
from pathlib import Path

import numpy as np
import pydicom
import pytest
from conftest import TEST_DATA
from dicom_phantoms import write_enhanced_multiframe, write_phantom_series
from pydicom.uid import ExplicitVRBigEndian, ImplicitVRLittleEndian, JPEG2000Lossless, RLELossless
from test_dicom_malformed import CASES

from app.errors import DicomError
from app.io.decode_pool import run_calls, shutdown_decode_pool
from app.io.dicom_decode import native_frames, pixel_description, reference_frames
from app.io.dicom_scan import scan, scan_files
from app.io.dicom_series import read_series, read_series_info


def _same(a, b) -> None:
    assert a.shape == b.shape
    np.testing.assert_array_equal(a.array, b.array)
    np.testing.assert_array_equal(a.affine_lps, b.affine_lps)
    assert a.source_files == b.source_files and a.frame_numbers == b.frame_numbers
    assert a.tile_numbers == b.tile_numbers


def test_fast_equals_plain_on_tests_data():
    """Every image stack under tests/data (CT, MR, mosaics in nine transfer syntaxes, JPEG 2000, multi-frame)."""
    result = scan(TEST_DATA)
    images = [s for s in result.series if s.is_image]
    assert len(images) >= 20 and any(s.mosaic for s in images) and any(s.multiframe for s in images)
    for s in images:
        fast = read_series_info(s, decode_workers=2)
        plain = read_series_info(s, fast=False, decode_workers=1)
        _same(fast, plain)
        assert fast.array.dtype == np.float32 and np.isfinite(fast.array).all(), s.key


@pytest.mark.parametrize("case", sorted(CASES))
def test_fast_and_plain_give_the_same_errors(tmp_path, case):
    folder = tmp_path / case
    folder.mkdir()
    path, kwargs, pattern, name = CASES[case](folder)
    for fast in (True, False):
        with pytest.raises(DicomError) as exc_info:
            read_series(path, fast=fast, **kwargs)
        message = str(exc_info.value)
        assert re.search(pattern, message, re.DOTALL), (fast, message)
        assert name in message


def _rewrite_pixels(
    path: Path, values: np.ndarray, bits_allocated: int, bits_stored: int, signed: bool, big_endian: bool = False
) -> None:
    ds = pydicom.dcmread(path)
    dtype = np.dtype(f"{'>' if big_endian else '<'}{'i' if signed else 'u'}{bits_allocated // 8}")
    ds.BitsAllocated, ds.BitsStored, ds.HighBit = bits_allocated, bits_stored, bits_stored - 1
    ds.PixelRepresentation = int(signed)
    ds.PixelData = values.astype(dtype).tobytes()
    ds["PixelData"].VR = "OB" if bits_allocated == 8 else "OW"
    if big_endian:
        ds.file_meta.TransferSyntaxUID = ExplicitVRBigEndian
        pydicom.dcmwrite(path, ds, implicit_vr=False, little_endian=False, enforce_file_format=True)
    else:
        ds.save_as(path)


@pytest.mark.parametrize(
    "bits_allocated,bits_stored,signed,big_endian",
    [
        (16, 12, False, False),  # high bits hold an overlay: cleared
        (16, 12, True, False),  # 12-bit signed: sign-extended
        (16, 16, True, True),
        (16, 10, True, True),
        (8, 8, False, False),  # 7x5 pixels: odd length, padded
        (8, 6, True, False),
        (32, 32, True, False),
        (32, 20, False, True),
    ],
)
def test_native_bit_depths(tmp_path, bits_allocated, bits_stored, signed, big_endian):
    info = write_phantom_series(tmp_path, shape=(7, 5, 4), modality="MR", rescale=(1.0, 0.0))
    rng = np.random.default_rng(bits_allocated * 100 + bits_stored)
    lo, hi = (-(1 << (bits_allocated - 1)), (1 << (bits_allocated - 1))) if signed else (0, 1 << bits_allocated)
    raw = [rng.integers(lo, hi, size=(5, 7), dtype=np.int64) for _ in info.files]
    for f, values in zip(info.files, raw):
        _rewrite_pixels(f, values, bits_allocated, bits_stored, signed, big_endian)
    fast, plain = read_series(tmp_path), read_series(tmp_path, fast=False)
    _same(fast, plain)
    # Independently of pydicom: the stored value is the low BitsStored bits (two's complement if signed).
    mask = (1 << bits_stored) - 1
    for k, values in enumerate(raw):
        expected = values & mask
        if signed:
            expected = np.where(expected >= 1 << (bits_stored - 1), expected - (1 << bits_stored), expected)
        np.testing.assert_array_equal(fast.array[:, :, k], expected.T.astype(np.float32))


def test_native_path_reads_from_the_offset(tmp_path):
    """The fast path really reads the bytes at the scan's offset (not via pydicom)."""
    info = write_phantom_series(tmp_path, shape=(8, 6, 4))
    s = scan(tmp_path).series[0]
    file = s.files[1]
    loc = s.pixel_locations[file]
    stored = native_frames(file, loc, pixel_description(s.headers[1]), pydicom.uid.ExplicitVRLittleEndian, [0])
    np.testing.assert_array_equal(stored, reference_frames(file, [0]))
    np.testing.assert_array_equal(stored[0].T, info.stored_ijk[:, :, 1])
    assert Path(file).read_bytes()[loc.offset : loc.offset + loc.length] == pydicom.dcmread(file).PixelData


@pytest.mark.parametrize("ts", [JPEG2000Lossless, RLELossless, ImplicitVRLittleEndian], ids=lambda u: u.name)
@pytest.mark.parametrize("workers", [1, 2])
def test_multiframe_in_worker_processes(tmp_path, ts, workers):
    """A compressed multi-frame object is split into chunks of frames over processes."""
    info = write_enhanced_multiframe(tmp_path / "mf.dcm", shape=(40, 36, 9), transfer_syntax=ts)
    fast = read_series(tmp_path, decode_workers=workers)
    np.testing.assert_array_equal(fast.array, info.array_ijk)
    _same(fast, read_series(tmp_path, fast=False))


def test_compressed_series_in_worker_processes(tmp_path):
    info = write_phantom_series(tmp_path, shape=(40, 36, 6), transfer_syntax=JPEG2000Lossless, orientation="oblique")
    result = scan(tmp_path)
    for workers in (1, 2, 4):
        vol = read_series(tmp_path, scan=result, decode_workers=workers)
        np.testing.assert_array_equal(vol.array, info.array_ijk)


def test_read_series_reuses_the_scan(tmp_path, monkeypatch):
    """With ``scan=`` no file header is parsed again (batch inference, a DICOM listener)."""
    write_phantom_series(tmp_path, shape=(8, 6, 5))
    result = scan(tmp_path)
    calls = []
    monkeypatch.setattr(pydicom, "dcmread", lambda *a, **k: calls.append(a) or (_ for _ in ()).throw(AssertionError))
    vol = read_series(tmp_path, scan=result)
    assert vol.shape == (8, 6, 5) and calls == []


def _die(file: str) -> None:
    os._exit(3)  # a decoder that kills its process (GDCM aborts like this on corrupt JPEG 2000)


def _double(file: str) -> str:
    return file * 2


def test_decode_pool_reports_a_dead_worker_and_recovers():
    with pytest.raises(DicomError, match=r"^a\.dcm: a pixel data decoder process died while decoding this file"):
        run_calls([(_die, ("a.dcm",)), (_double, ("b",))], workers=2)
    assert run_calls([(_double, ("x",)), (_double, ("y",))], workers=2) == ["xx", "yy"]  # a new pool
    assert run_calls([(_double, ("z",))], workers=2) == ["zz"]  # one call: in this process
    shutdown_decode_pool()


def test_scan_files_reads_only_the_given_files(tmp_path):
    a = write_phantom_series(tmp_path, shape=(8, 6, 5), file_prefix="a")
    write_phantom_series(tmp_path, shape=(8, 6, 7), file_prefix="b", study_uid=a.study_uid)
    result = scan_files(a.files)
    assert [s.uid for s in result.series] == [a.series_uid] and result.n_files == 5
    assert result.root == str(tmp_path)
    np.testing.assert_array_equal(read_series(result.root, scan=result).array, a.array_ijk)
