"""A DICOM SR Measurement Report (TID 1500) of segment volumes, each referencing its segment in a SEG.

:func:`write_volume_sr` writes a Comprehensive 3D SR with highdicom: one TID 1411 "Volumetric ROI
Measurements" group per segment of the SEG, referencing the segment (SEG SOP Instance UID + segment
number, and the source images the segment was derived from), with finding type = the segment's
property type and one measurement "Volume" (SCT 118565006) in millilitres (UCUM ``ml``).
:func:`read_volume_sr` reads the volumes back with highdicom.

The SR joins the SEG's study (patient and study attributes come from the SEG, which copied them
from its source); its evidence lists the SEG and the source images.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping, Sequence
from pathlib import Path

import pydicom
from pydicom.dataset import Dataset
from pydicom.uid import generate_uid

from app import __version__
from app.errors import DicomError
from app.io.atomic import atomic_path

logger = logging.getLogger(__name__)

VOLUME = ("118565006", "SCT", "Volume")
MILLILITRE = ("ml", "UCUM", "milliliter")
IMAGING_PROCEDURE = ("363679005", "SCT", "Imaging procedure")
# A root of our own for the device observer UID would need a registered root: derive one per node name.
_DEVICE_NAME = "segapp"


def _concept(code: Sequence[str]):
    from highdicom.sr import CodedConcept

    return CodedConcept(value=str(code[0]), scheme_designator=str(code[1]), meaning=str(code[2]))


def _series_reference(seg_ds: Dataset, number: int, where: str):
    import highdicom as hd

    try:
        series_uid = str(seg_ds.ReferencedSeriesSequence[0].SeriesInstanceUID)
    except (AttributeError, IndexError) as exc:
        raise DicomError(f"segment {number} has no frames and the SEG names no source series", where) from exc
    return hd.sr.ReferencedSegment(
        sop_class_uid=str(seg_ds.SOPClassUID),
        sop_instance_uid=str(seg_ds.SOPInstanceUID),
        segment_number=number,
        source_series=hd.sr.SourceSeriesForSegmentation(series_uid),
    )


def write_volume_sr(
    seg: str | Path | Dataset,
    source_images: Sequence[Dataset],
    volumes_ml: Mapping[int, float],
    algorithm: tuple[str, str],
    output_path: str | Path,
    *,
    series_number: int = 901,
    series_description: str = "segapp volumes",
) -> Path:
    """Write a TID 1500 Measurement Report with each SEG segment's volume.

    Args:
        seg: the DICOM SEG (file or dataset) whose segments are measured.
        source_images: the SEG's source image headers (pixel data not needed), for the evidence.
        volumes_ml: ``{segment number: volume in mL}``; every key must be a segment of ``seg``.
        algorithm: ``(name, version)`` of the model that made the SEG.
        output_path: the SR file (written atomically).
        series_number, series_description: of the new SR series.

    Raises:
        DicomError: ``seg`` is not a SEG, a volume names a segment the SEG lacks, or highdicom refuses.
    """
    import highdicom as hd

    seg_ds = seg if isinstance(seg, Dataset) else pydicom.dcmread(seg)
    where = str(seg) if not isinstance(seg, Dataset) else "SEG"
    if str(seg_ds.get("SOPClassUID", "")) not in ("1.2.840.10008.5.1.4.1.1.66.4", "1.2.840.10008.5.1.4.1.1.66.7"):
        raise DicomError("not a DICOM SEG: cannot reference its segments in an SR", where)
    segments = {int(s.SegmentNumber): s for s in seg_ds.SegmentSequence}
    unknown = sorted(set(int(n) for n in volumes_ml) - set(segments))
    if unknown:
        raise DicomError(f"segment number(s) {unknown} are not in the SEG (it has {sorted(segments)})", where)
    algo = hd.sr.AlgorithmIdentification(name=str(algorithm[0]), version=str(algorithm[1]))
    groups = []
    for number in sorted(int(n) for n in volumes_ml):
        item = segments[number]
        label = str(item.get("SegmentLabel", f"segment {number}"))
        try:
            reference = hd.sr.ReferencedSegment.from_segmentation(seg_ds, number)
        except ValueError:
            # an empty segment has no frames (omitted) to name its source images: reference the series
            reference = _series_reference(seg_ds, number, where)
        except AttributeError as exc:
            raise DicomError(f"cannot reference segment {number} ({label!r}) of the SEG: {exc}", where) from exc
        type_item = item.SegmentedPropertyTypeCodeSequence[0]
        groups.append(
            hd.sr.VolumetricROIMeasurementsAndQualitativeEvaluations(
                tracking_identifier=hd.sr.TrackingIdentifier(uid=generate_uid(), identifier=f"segment {number}"),
                referenced_segment=reference,
                finding_type=_concept((type_item.CodeValue, type_item.CodingSchemeDesignator, type_item.CodeMeaning)),
                algorithm_id=algo,
                measurements=[
                    hd.sr.Measurement(
                        name=_concept(VOLUME),
                        value=float(volumes_ml[number]),
                        unit=_concept(MILLILITRE),
                        algorithm_id=algo,
                    )
                ],
            )
        )
    observer = hd.sr.ObserverContext(
        observer_type=_concept(("121007", "DCM", "Device")),
        observer_identifying_attributes=hd.sr.DeviceObserverIdentifyingAttributes(
            uid=generate_uid(entropy_srcs=[_DEVICE_NAME, str(algorithm[0])]),
            name=f"{_DEVICE_NAME} {algorithm[0]}"[:64],
            manufacturer_name="segapp",
            model_name=str(algorithm[0])[:64],
        ),
    )
    report = hd.sr.MeasurementReport(
        observation_context=hd.sr.ObservationContext(observer_device_context=observer),
        procedure_reported=_concept(IMAGING_PROCEDURE),
        imaging_measurements=groups,
    )
    try:
        sr = hd.sr.Comprehensive3DSR(
            evidence=[seg_ds, *source_images],
            content=report,
            series_instance_uid=generate_uid(),
            series_number=int(series_number),
            sop_instance_uid=generate_uid(),
            instance_number=1,
            manufacturer="segapp",
            is_complete=True,
            software_versions=f"segapp {__version__}",
        )
    except (ValueError, TypeError, AttributeError) as exc:
        raise DicomError(f"highdicom refused to build the SR: {exc}", where) from exc
    sr.SeriesDescription = series_description[:64]
    output_path = Path(output_path)
    with atomic_path(output_path) as tmp:
        sr.save_as(tmp, enforce_file_format=True)
    logger.info("wrote SR with %d volume measurement(s)", len(groups))
    return output_path


def read_volume_sr(path: str | Path) -> dict[tuple[str, int], float]:
    """``{(SEG SOP Instance UID, segment number): volume in mL}`` of a TID 1500 report (highdicom)."""
    import highdicom as hd

    try:
        sr = hd.sr.srread(path)
    except Exception as exc:  # noqa: BLE001 - pydicom/highdicom raise many types on bad files
        raise DicomError(f"not a readable DICOM SR: {type(exc).__name__}: {exc}", str(path)) from exc
    out: dict[tuple[str, int], float] = {}
    report = sr.content
    if not isinstance(report, hd.sr.MeasurementReport):
        raise DicomError("not a TID 1500 Measurement Report", str(path))
    for group in report.get_volumetric_roi_measurement_groups():
        ref = group.referenced_segment
        if ref is None or not ref.referenced_segment_numbers:
            continue
        number = int(ref.referenced_segment_numbers[0])
        for m in group.get_measurements(name=_concept(VOLUME)):
            if m.unit is not None and m.unit.value.lower() != MILLILITRE[0]:
                raise DicomError(f"volume in {m.unit.value}, expected mL", str(path))
            out[(str(ref.referenced_sop_instance_uid), number)] = float(m.value)
    return out
