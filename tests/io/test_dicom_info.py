"""``convert_element`` (the scan's direct conversion of raw header elements) gives what pydicom's
``Dataset.__getitem__`` gives: the same elements, values and VRs, and the same errors on damage."""

from __future__ import annotations

import io
import struct
import warnings
from pathlib import Path

import pydicom
import pytest
from conftest import TEST_DATA
from dicom_phantoms import write_phantom_series
from pydicom.datadict import tag_for_keyword
from pydicom.dataelem import DataElement, RawDataElement
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.filebase import DicomBytesIO
from pydicom.filewriter import write_dataset
from pydicom.sequence import Sequence
from pydicom.uid import ExplicitVRLittleEndian, generate_uid

from app.io.dicom_info import convert_element, damaged_element


def _files(limit_per_folder: int = 3) -> list:
    files = []
    for folder in sorted({p.parent for p in TEST_DATA.rglob("*") if p.is_file()}):
        files += sorted(p for p in folder.iterdir() if p.is_file() and p.suffix.lower() in ("", ".dcm"))[
            :limit_per_folder
        ]
    return files


def _read(path):
    try:
        return pydicom.dcmread(path, stop_before_pixels=True)
    except Exception:  # noqa: BLE001 - not DICOM (e.g. a licence note)
        return None


def test_convert_element_equals_getitem_on_every_element_of_tests_data():
    checked, vrs = 0, set()
    for path in _files():
        fast, plain = _read(path), _read(path)
        if fast is None:
            continue
        for part_fast, part_plain in ((fast, plain), (fast.file_meta, plain.file_meta)):
            for tag in list(part_fast.keys()):
                raw = isinstance(part_fast.get_item(tag), RawDataElement)  # dcmread converts a few itself
                a, b = convert_element(part_fast, tag), part_plain[tag]
                assert (a.tag, a.VR, a.VM) == (b.tag, b.VR, b.VM), (path, tag)
                assert a.value == b.value, (path, tag)
                assert part_fast[tag] is a  # stored: converted once
                checked += raw
                vrs.add(a.VR)
    assert checked > 1000
    assert {"CS", "DS", "IS", "UI", "US", "SQ", "LO", "DA", "OB"} <= vrs, vrs


def _outcome(convert, ds, tag):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # pydicom warns on some damaged values instead of raising
        try:
            return ("value", convert(ds, tag).value)
        except Exception as exc:  # noqa: BLE001 - the type is what is compared
            return ("error", type(exc))


@pytest.mark.parametrize(
    ("keyword", "raw_value"),
    [
        ("Rows", b"\x01\x02\x03"),  # US of 3 bytes
        ("ImagePositionPatient", b"1\\x\\3 "),  # DS that is no number
        ("SeriesNumber", b"1.5 "),  # IS with a fraction
        ("PixelSpacing", b"0.5\\0.5"),  # intact, for contrast
    ],
)
def test_convert_element_gives_what_getitem_gives_on_damaged_values(tmp_path, keyword, raw_value):
    path = Path(write_phantom_series(tmp_path, shape=(8, 6, 4)).files[0])

    def damaged():
        ds = pydicom.dcmread(path, stop_before_pixels=True)
        tag = tag_for_keyword(keyword)
        raw = ds.get_item(tag)
        ds[tag] = raw._replace(value=raw_value, length=len(raw_value))
        return ds, tag

    fast = _outcome(convert_element, *damaged())
    plain = _outcome(lambda ds, tag: ds[tag], *damaged())
    assert fast == plain
    verdict = damaged_element(damaged()[0])
    assert verdict.startswith(f"damaged {keyword}") == (fast[0] == "error"), verdict


def _un_encoded_modality_lut(pixel_representation: int) -> bytes:
    """An explicit VR file whose ModalityLUTSequence is written as UN (its items implicit VR, PS3.5
    6.2.2), as a system that did not know the tag leaves it; the item holds US-or-SS LUTDescriptor."""
    item = Dataset()
    item.add(DataElement(0x00283002, "US", [2, 0, 16]))  # LUTDescriptor
    item.ModalityLUTType = "HU"
    item.add(DataElement(0x00283006, "US", [0, 100]))  # LUTData
    inner = DicomBytesIO()
    inner.is_little_endian, inner.is_implicit_VR = True, True
    holder = Dataset()
    holder.ModalityLUTSequence = Sequence([item])
    write_dataset(inner, holder)
    value = inner.getvalue()[8:]  # the sequence's value: after its tag and length
    ds = Dataset()
    ds.Modality, ds.PixelRepresentation = "CT", pixel_representation
    ds.file_meta = FileMetaDataset()
    ds.file_meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds.file_meta.MediaStorageSOPClassUID = "1.2.840.10008.5.1.4.1.1.2"
    ds.file_meta.MediaStorageSOPInstanceUID = generate_uid()
    out = io.BytesIO()
    pydicom.dcmwrite(out, ds, enforce_file_format=True)
    out.write(struct.pack("<HH2sHI", 0x0028, 0x3000, b"UN", 0, len(value)) + value)  # the last element
    return out.getvalue()


@pytest.mark.parametrize("pixel_representation", [0, 1])
def test_convert_element_equals_getitem_on_a_sequence_written_as_un(pixel_representation):
    data = _un_encoded_modality_lut(pixel_representation)
    fast, plain = (pydicom.dcmread(io.BytesIO(data)) for _ in range(2))
    tag = 0x00283000
    assert fast.get_item(tag).VR == "UN"
    a, b = convert_element(fast, tag), plain[tag]
    assert a.VR == b.VR == "SQ"
    for keyword in ("LUTDescriptor", "ModalityLUTType", "LUTData"):
        ea, eb = a.value[0][keyword], b.value[0][keyword]
        assert (ea.VR, ea.value) == (eb.VR, eb.value), keyword
    assert damaged_element(fast) == ""
