"""The header highdicom's ``SOPClass`` gives an object derived from a source image, without its module
tables.

``hd.SOPClass(...)``, its ``copy_specimen_information`` / ``copy_patient_and_study_information`` and
``hd.ContributingEquipment.for_image_acquisition`` each ask highdicom's copy of the standard's module
tables: does the new object's IOD have ContentDate, which modules of the *source's* IOD are copied, is
the source an image. Parsing those tables (a 22 MB JSON) costs 0.3 s once per process: in a one-shot
``segapp infer`` it was most of the SEG write (``bench/seg_write_speed.py`` prints the first write of a
fresh process). Their answers for every SOP class highdicom knows are in :mod:`app.io.iod_table`
(generated from the same tables and checked against them by ``tests/io/test_iod_table.py``); the rest
repeats ``SOPClass.__init__``'s assignments and checks with highdicom's public enums and constructors.
``tests/io/test_derived_header.py`` compares the result with highdicom's, attribute by attribute.
"""

from __future__ import annotations

import datetime
import functools
import logging
from collections.abc import Sequence

from pydicom.datadict import tag_for_keyword
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.uid import UID
from pydicom.valuerep import DA, TM

from app.io.iod_table import COPIED_MODULES, MODULE_ROOT_KEYWORDS, SOP_CLASSES

logger = logging.getLogger(__name__)


def _facts(sop_class_uid: str) -> tuple[int, bool | None, bool | None]:
    try:
        return SOP_CLASSES[str(sop_class_uid)]
    except KeyError:
        raise KeyError(f"No IOD found for SOP Class UID: {sop_class_uid}.") from None  # highdicom's error


@functools.cache
def _copied_tags(group: int) -> tuple[int, ...]:
    tags = []
    for module in COPIED_MODULES[group]:
        for keyword in MODULE_ROOT_KEYWORDS[module]:
            tag = tag_for_keyword(keyword)
            if tag is None:  # pydicom's dictionary older than highdicom's tables: highdicom raises too
                raise ValueError(f'No tag not found for keyword "{keyword}".')
            tags.append(tag)
    return tuple(tags)


def copy_source_modules(dst: Dataset, source: Dataset) -> None:
    """What ``copy_specimen_information(source)`` and ``copy_patient_and_study_information(source)``
    copy: the root attributes of the modules that the source's IOD has in its Patient and Study
    entities (and the Specimen module of its Image entity), as the source's own elements (not copies)."""
    group, _, _ = _facts(source.SOPClassUID)
    for tag in _copied_tags(group):
        try:
            dst.add(source[tag])
        except KeyError:
            continue


def _character_set(value: str | Sequence[str]) -> str | list[str]:
    """SpecificCharacterSet as ``SOPClass`` writes it, with its checks (ValueError where it raises)."""
    import highdicom as hd

    v = hd.SpecificCharacterSetValues
    multi_byte = {
        v.JAPANESE_KANJI_CODE_EXTENSIONS,
        v.JAPANESE_KANJI_SUPPLEMENTARY_CODE_EXTENSIONS,
        v.KOREAN_CODE_EXTENSIONS,
    }
    # highdicom's single-byte code extensions: every "ISO 2022 IR n" term but the multi-byte ones and IR 58
    extensions = {e for e in v if e.value.startswith("ISO 2022")} - {v.SIMPLIFIED_CHINESE_CODE_EXTENSIONS}
    if isinstance(value, str):
        terms = [v(value)]
    else:
        terms = [v(t) for t in value]
        if not terms:
            raise ValueError("Parameter 'specific_character_set' must not be empty.")
        if len(terms) > 1:
            if terms[0] in multi_byte:
                raise ValueError("a multi-valued SpecificCharacterSet may not start with a multi-byte encoding")
            if any(t not in extensions for t in terms):
                raise ValueError("when SpecificCharacterSet is multi-valued, all encodings must use code extensions")
            return [t.value for t in terms]
    if terms[0] in extensions:
        raise ValueError("encodings with code extensions should not be used when only one encoding is included")
    return terms[0].value


def _long_string(s: str) -> str:
    if len(s) > 64 or "\\" in s:
        raise ValueError(f"not a DICOM Long String (at most 64 characters, no backslash): {s!r}")
    return s


def sop_header(
    source: Dataset,
    *,
    sop_class_uid: str,
    sop_instance_uid: str,
    series_instance_uid: str,
    series_number: int,
    instance_number: int,
    modality: str,
    transfer_syntax_uid: str,
    manufacturer: str,
    manufacturer_model_name: str,
    software_versions: str,
    device_serial_number: str,
    series_description: str,
) -> Dataset:
    """The dataset of ``hd.SOPClass(...)`` for a new object of ``sop_class_uid`` derived from ``source``
    (its patient and study attributes passed from ``source``), after ``copy_specimen_information(source)``
    and ``copy_patient_and_study_information(source)``; no ContributingEquipmentSequence (see
    :func:`acquisition_equipment`). ``source`` is a header with the Study Instance UID to use.

    Raises:
        ValueError, TypeError, KeyError: where highdicom raises (an invalid PatientSex, date or character
        set, a source SOP class highdicom does not know).
    """
    import highdicom as hd

    _, _, has_content_date = _facts(sop_class_uid)
    if has_content_date is None:
        raise KeyError(f"highdicom's tables fail on SOP class {sop_class_uid}")
    if series_number < 1 or instance_number < 1:
        raise ValueError("series and instance numbers must be positive integers")
    ds = Dataset()
    ds.preamble = b"\0" * 128
    ds.file_meta = FileMetaDataset()
    ds.file_meta.TransferSyntaxUID = UID(transfer_syntax_uid)
    ds.file_meta.MediaStorageSOPClassUID = UID(sop_class_uid)
    ds.file_meta.MediaStorageSOPInstanceUID = UID(sop_instance_uid)
    ds.file_meta.FileMetaInformationVersion = b"\x00\x01"  # implementation UID and version: pydicom's, on save

    name = source.get("PatientName")
    if name is not None:
        try:
            hd.valuerep.check_person_name(name)  # warns about a one-component name
        except ValueError:
            logger.warning("source PatientName is potentially invalid")
    sex = source.get("PatientSex")
    ds.PatientID = source.get("PatientID")
    ds.PatientName = name
    ds.PatientBirthDate = DA(source.get("PatientBirthDate"))
    ds.PatientSex = hd.PatientSexValues(sex).value if sex not in (None, "") else sex
    ds.StudyInstanceUID = str(source.StudyInstanceUID)
    ds.AccessionNumber = source.get("AccessionNumber")
    ds.StudyID = source.get("StudyID")
    study_date, study_time = source.get("StudyDate"), source.get("StudyTime")
    ds.StudyDate = DA(study_date) if study_date is not None else None
    ds.StudyTime = TM(study_time) if study_time is not None else None
    ds.ReferringPhysicianName = source.get("ReferringPhysicianName")

    ds.SeriesInstanceUID = str(series_instance_uid)
    ds.SeriesNumber = series_number
    ds.Modality = modality
    ds.SeriesDescription = _long_string(series_description)
    ds.Manufacturer = _long_string(manufacturer)
    ds.ManufacturerModelName = _long_string(manufacturer_model_name)
    ds.DeviceSerialNumber = _long_string(device_serial_number)
    ds.SoftwareVersions = _long_string(software_versions)

    ds.SOPInstanceUID = str(sop_instance_uid)
    ds.SOPClassUID = str(sop_class_uid)
    ds.InstanceNumber = instance_number
    now = datetime.datetime.now()
    ds.InstanceCreationDate = DA(now.date())
    ds.InstanceCreationTime = TM(now.time())
    charset = source.get("SpecificCharacterSet")
    if charset is not None:
        ds.SpecificCharacterSet = _character_set(charset)
    if has_content_date:
        ds.ContentDate = DA(now.date())
        ds.ContentTime = TM(now.time())
    copy_source_modules(ds, source)
    return ds


def acquisition_equipment(source: Dataset) -> Dataset | None:
    """``hd.ContributingEquipment.for_image_acquisition(source)``, or None where that raises (the source
    is no image, or names no Manufacturer): the item highdicom's ``Segmentation`` then leaves out."""
    import highdicom as hd
    from pydicom.sr.codedict import codes

    _, image, _ = _facts(source.SOPClassUID)
    manufacturer = source.get("Manufacturer")
    if not image or manufacturer is None or manufacturer == "":
        return None
    when = source.get("AcquisitionDateTime")
    date, time = source.get("AcquisitionDate"), source.get("AcquisitionTime")
    if when is None and isinstance(date, datetime.date) and isinstance(time, datetime.time):
        when = datetime.datetime.combine(date, time)
    try:
        return hd.ContributingEquipment(
            manufacturer=manufacturer,
            purpose_of_reference=codes.DCM.AcquisitionEquipment,
            manufacturer_model_name=source.get("ManufacturerModelName"),
            software_versions=source.get("SoftwareVersions"),
            device_serial_number=source.get("DeviceSerialNumber"),
            institution_name=source.get("InstitutionName"),
            institutional_department_name=source.get("InstitutionalDepartmentName"),
            institution_address=source.get("InstitutionAddress"),
            station_name=source.get("StationName"),
            contribution_datetime=when,
            contribution_description="Acquisition equipment of the source image(s)",
        )
    except (AttributeError, ValueError, TypeError, KeyError) as exc:  # as highdicom's Segmentation: no item
        logger.debug("source acquisition equipment not described (%s)", exc)
        return None
