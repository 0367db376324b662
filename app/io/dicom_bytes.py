"""A tiny DICOM data-element encoder (little endian, explicit or implicit VR) for building large,
repetitive sequences as bytes instead of thousands of pydicom Datasets.

Why: a SEG with a few hundred frames has a few thousand small nested datasets in its per-frame
functional groups; building and writing them with pydicom costs more than everything else in the
SEG writer together. Encoded here, they go into the dataset as one ``RawDataElement``
(:func:`raw_element`), which pydicom writes as it is when the dataset's original encoding is set
to the target transfer syntax (``Dataset.set_original_encoding``).

Sequences and items are written with explicit lengths (PS3.5 7.5), values padded to even length
(UI with NUL, text with a space, PS3.5 6.2).
"""

from __future__ import annotations

import struct

from pydicom.dataelem import RawDataElement
from pydicom.dataset import Dataset
from pydicom.filebase import DicomBytesIO
from pydicom.filewriter import write_dataset
from pydicom.tag import Tag

# VRs whose explicit-VR header has 2 reserved bytes and a 4-byte length (PS3.5 table 7.1-1).
_LONG_VRS = frozenset({"OB", "OD", "OF", "OL", "OV", "OW", "SQ", "SV", "UC", "UN", "UR", "UT", "UV"})
_ITEM = struct.pack("<HH", 0xFFFE, 0xE000)


def element(tag: int, vr: str, value: bytes, implicit: bool) -> bytes:
    """One data element: header + ``value`` (padded to even length with NUL, or a space for text VRs)."""
    if len(value) % 2:
        value += b"\0" if vr in ("UI", "OB", "UN") else b" "
    group, elem = tag >> 16, tag & 0xFFFF
    if implicit:
        return struct.pack("<HHI", group, elem, len(value)) + value
    if vr in _LONG_VRS:
        return struct.pack("<HH2sHI", group, elem, vr.encode(), 0, len(value)) + value
    if len(value) > 0xFFFF:
        raise ValueError(f"value of ({group:04X},{elem:04X}) too long for VR {vr}")
    return struct.pack("<HH2sH", group, elem, vr.encode(), len(value)) + value


def text(tag: int, vr: str, value: str, implicit: bool) -> bytes:
    """A string element (UI, CS, DS, IS, SH, LO...); ``value`` is ASCII (multiple values joined by ``\\``)."""
    return element(tag, vr, value.encode("ascii"), implicit)


def item(content: bytes) -> bytes:
    """One sequence item of explicit length holding the encoded elements ``content``."""
    return _ITEM + struct.pack("<I", len(content)) + content


def sequence(tag: int, items: list[bytes], implicit: bool) -> bytes:
    """A sequence element of explicit length; ``items`` are the encoded item contents."""
    return element(tag, "SQ", b"".join(item(c) for c in items), implicit)


def encode_dataset(ds: Dataset, implicit: bool) -> bytes:
    """The encoded elements of ``ds`` (as pydicom writes them), for use as item content."""
    fp = DicomBytesIO()
    fp.is_little_endian = True
    fp.is_implicit_VR = implicit
    write_dataset(fp, ds)
    return fp.getvalue()


def raw_element(tag: int, vr: str, value: bytes, implicit: bool) -> RawDataElement:
    """A RawDataElement carrying the already-encoded ``value`` (e.g. the items of a sequence)."""
    return RawDataElement(Tag(tag), vr, len(value), value, 0, implicit, True)
