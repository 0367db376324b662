"""Siemens CSA headers: the private "SV10" blocks in (0029,xx10) (image) and (0029,xx20) (series).

A small strict reader for the one layout Siemens has written since syngo VB (the "CSA2" format,
starting with ``b"SV10"``). nibabel has a reader (``nibabel.nicom.csareader``), but importing
``nibabel.nicom`` warns that its DICOM readers are experimental, it checks with ``assert`` (gone under
``python -O``) and it lets ``struct.error``/``ValueError`` out on damaged headers. A reader of the
two values segapp needs (NumberOfImagesInMosaic, SliceNormalVector) that raises one ``CsaError`` on
anything unexpected is shorter than wrapping it; ``tests/io/test_mosaic.py`` checks both agree on
the real Siemens file.

Layout (little endian): ``"SV10"``, 4 unused bytes, ``uint32 n_tags``, ``uint32`` (77); then per tag
``char name[64]``, ``int32 vm``, ``char vr[4]``, ``int32 syngodt``, ``int32 n_items``, ``int32``
(77 or 205); then per item four ``int32`` of which the second is the item's length in bytes, the
item's bytes (a NUL-terminated string), padded to a multiple of 4.
"""

from __future__ import annotations

import struct

from pydicom.dataset import Dataset

# Limits against hostile headers: real headers hold about 100 tags of a few items each.
_MAX_TAGS = 1000
_MAX_ITEMS = 1000

_NUMERIC_VRS = {"FL", "FD", "DS", "SS", "US", "SL", "UL", "IS"}


class CsaError(ValueError):
    """A CSA header that is not the SV10 layout or is damaged (the caller words it for the user)."""


def parse_csa(data: bytes) -> dict[str, list[str]]:
    """Tag name -> its non-empty item strings (values as written; convert with ``csa_floats``).

    Raises:
        CsaError: not an SV10 header, or damaged (counts out of range, items past the end).
    """
    if not isinstance(data, (bytes, bytearray)) or data[:4] != b"SV10":
        raise CsaError("not a Siemens CSA header in the SV10 format")
    end = len(data)
    try:
        n_tags = struct.unpack_from("<I", data, 8)[0]
        if not 0 < n_tags <= _MAX_TAGS:
            raise CsaError(f"CSA header claims {n_tags} tags")
        pos = 16
        tags: dict[str, list[str]] = {}
        for _ in range(n_tags):
            name_raw, _vm, _vr, _syngodt, n_items, _xx = struct.unpack_from("<64si4s3i", data, pos)
            pos += 84
            if not 0 <= n_items <= _MAX_ITEMS:
                raise CsaError(f"CSA tag claims {n_items} items")
            items = []
            for _ in range(n_items):
                length = struct.unpack_from("<4i", data, pos)[1]
                pos += 16
                if length < 0 or pos + length > end:
                    raise CsaError("CSA item runs past the end of the header")
                if length:
                    items.append(data[pos : pos + length].split(b"\0", 1)[0].decode("latin-1").strip())
                pos += (length + 3) // 4 * 4
            tags[name_raw.split(b"\0", 1)[0].decode("latin-1")] = [v for v in items if v]
        return tags
    except struct.error as exc:
        raise CsaError("CSA header ends inside a tag") from exc


def csa_floats(tags: dict[str, list[str]], name: str) -> list[float] | None:
    """The items of tag ``name`` as floats (``None`` when absent or empty).

    Raises:
        CsaError: an item is not a number.
    """
    items = tags.get(name)
    if not items:
        return None
    try:
        return [float(v) for v in items]
    except ValueError as exc:
        raise CsaError(f"CSA {name} is not numeric ({items[:3]!r})") from exc


def csa_image_header(ds: Dataset) -> bytes | None:
    """The raw bytes of the CSA image header (0029,xx10) under private creator "SIEMENS CSA HEADER",
    or ``None`` when the dataset has none."""
    return _private_bytes(ds, 0x0029, 0x10, "SIEMENS CSA HEADER")


def _private_bytes(ds: Dataset, group: int, offset: int, creator: str) -> bytes | None:
    try:
        value = ds.get_private_item(group, offset, creator).value
    except Exception:  # noqa: BLE001 - KeyError when absent; a damaged private block counts as absent
        return None
    return bytes(value) if isinstance(value, (bytes, bytearray)) else None


__all__ = ["CsaError", "csa_floats", "csa_image_header", "parse_csa"]
