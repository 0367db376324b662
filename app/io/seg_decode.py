"""Decoding a SEG's frames: pydicom for what it can, plus two small decoders for encodings pydicom 3
cannot handle (Deflated Image Frame Compression, 1-bit RLE Lossless)."""

from __future__ import annotations

import zlib

import numpy as np
from pydicom.dataset import Dataset

from app.errors import DicomError

# Supplement 244 "Deflated Image Frame Compression": each frame is a raw RFC 1951 deflate stream.
DEFLATED_IMAGE_FRAME = "1.2.840.10008.1.2.8.1"
RLE_LOSSLESS = "1.2.840.10008.1.2.5"


def _unpack_bits(data: bytes, n_pixels: int) -> np.ndarray:
    """DICOM 1-bit pixels: least significant bit first."""
    bits = np.unpackbits(np.frombuffer(data, dtype=np.uint8), bitorder="little")
    if bits.size < n_pixels:
        raise ValueError(f"frame holds {bits.size} bits, expected {n_pixels}")
    return bits[:n_pixels]


def decode_frames(ds: Dataset, path: str) -> np.ndarray:
    """All frames as ``(frames, rows, columns)``.

    pydicom decodes most encodings. Two it cannot (pydicom 3.0) are decoded here, per frame, each
    encapsulated frame being padded to a whole byte: Deflated Image Frame Compression
    (1.2.840.10008.1.2.8.1, raw deflate) and RLE Lossless with 1 bit allocated (one RLE segment of
    packed bits, decoded with pylibjpeg-rle).
    """
    from pydicom.encaps import generate_frames

    ts = str(ds.file_meta.get("TransferSyntaxUID", ""))
    rows, cols = int(ds.Rows), int(ds.Columns)
    n = int(ds.get("NumberOfFrames", 1) or 1)
    bits = int(ds.get("BitsAllocated", 8))
    try:
        if ts == DEFLATED_IMAGE_FRAME or (ts == RLE_LOSSLESS and bits == 1):
            dtype = np.dtype(f"<u{max(bits // 8, 1)}")
            frames = []
            for raw in generate_frames(ds.PixelData, number_of_frames=n):
                if ts == DEFLATED_IMAGE_FRAME:
                    data = zlib.decompress(raw, -15)
                else:
                    from rle.utils import decode_segment

                    header = np.frombuffer(raw[:64], dtype="<u4")
                    if header[0] != 1:
                        raise ValueError(f"1-bit RLE frame with {header[0]} segments (expected 1)")
                    data = decode_segment(raw[int(header[1]) :])
                if bits == 1:
                    frames.append(_unpack_bits(data, rows * cols).reshape(rows, cols))
                else:
                    frames.append(np.frombuffer(data, dtype=dtype)[: rows * cols].reshape(rows, cols))
            return np.stack(frames)
        arr = ds.pixel_array
    except Exception as exc:  # decoders raise many types; the user needs one clear message
        raise DicomError(f"cannot decode the SEG pixel data (transfer syntax {ts}): {exc}", path) from exc
    return arr.reshape(n, rows, cols)
