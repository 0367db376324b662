"""``app.io.derived_header`` builds the header highdicom's ``SOPClass`` (+ its copies of the source's
patient, study and specimen modules) and ``ContributingEquipment.for_image_acquisition`` build, raises
where they raise, and never parses highdicom's 22 MB module table."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import highdicom as hd
import pydicom
import pytest
from pydicom.dataset import Dataset
from pydicom.sequence import Sequence as DicomSequence
from pydicom.uid import generate_uid
from seg_compare import seg_differences

from app.io.derived_header import acquisition_equipment, sop_header
from app.io.segments import SEG_STORAGE

CT, MR, SC = "1.2.840.10008.5.1.4.1.1.2", "1.2.840.10008.5.1.4.1.1.4", "1.2.840.10008.5.1.4.1.1.7"
MR_SPECTROSCOPY = "1.2.840.10008.5.1.4.1.1.4.2"  # patient and study modules, no specimen, no pixel data
ARGS = {
    "sop_class_uid": SEG_STORAGE,
    "series_number": 900,
    "instance_number": 1,
    "modality": "SEG",
    "transfer_syntax_uid": pydicom.uid.ExplicitVRLittleEndian,
    "manufacturer": "segapp",
    "manufacturer_model_name": "segapp",
    "software_versions": "segapp 1.0",
    "device_serial_number": "0",
    "series_description": "segapp segmentation",
}


def _source(sop_class: str = CT, **attrs) -> Dataset:
    """A source header with attributes of every module the copy concerns, and some it must not copy."""
    ds = Dataset()
    ds.SOPClassUID, ds.SOPInstanceUID = sop_class, generate_uid()
    ds.StudyInstanceUID, ds.SeriesInstanceUID = generate_uid(), generate_uid()
    ds.SpecificCharacterSet = "ISO_IR 100"
    ds.PatientName, ds.PatientID, ds.PatientBirthDate, ds.PatientSex = "Doe^Jane", "P1", "19700102", "F"
    other = Dataset()
    other.PatientID, other.TypeOfPatientID = "X9", "TEXT"
    ds.OtherPatientIDsSequence = DicomSequence([other])  # patient module, a sequence
    ds.PatientAge, ds.PatientWeight = "054Y", "71.5"  # patient study
    ds.ClinicalTrialSponsorName, ds.ClinicalTrialTimePointID = "sponsor", "T2"  # clinical trial subject / study
    ds.StudyDate, ds.StudyTime, ds.StudyID, ds.AccessionNumber = "20240301", "101500", "S1", "A1"
    ds.StudyDescription, ds.ReferringPhysicianName = "abdomen", "Ref^Doc"
    ds.ContainerIdentifier = "C-7"  # specimen module (in the Image entity of CT and MR)
    ds.Manufacturer, ds.ManufacturerModelName, ds.StationName = "GE MEDICAL SYSTEMS", "Revolution", "CT01"
    ds.InstitutionName, ds.SoftwareVersions, ds.DeviceSerialNumber = "Hospital", "v1", "123"
    ds.AcquisitionDateTime = "20240301101600"
    ds.SliceThickness, ds.BodyPartExamined = "1.0", "ABDOMEN"  # not copied
    for keyword, value in attrs.items():
        if value is None:
            del ds[keyword]
        else:
            setattr(ds, keyword, value)
    return ds


def _highdicom(src: Dataset, sop_instance_uid: str, series_instance_uid: str) -> Dataset:
    a = {k: v for k, v in ARGS.items() if k != "series_description"}
    ds = hd.SOPClass(
        study_instance_uid=src.StudyInstanceUID,
        series_instance_uid=series_instance_uid,
        sop_instance_uid=sop_instance_uid,
        patient_id=src.get("PatientID"),
        patient_name=src.get("PatientName"),
        patient_birth_date=src.get("PatientBirthDate"),
        patient_sex=src.get("PatientSex"),
        accession_number=src.get("AccessionNumber"),
        study_id=src.get("StudyID"),
        study_date=src.get("StudyDate"),
        study_time=src.get("StudyTime"),
        referring_physician_name=src.get("ReferringPhysicianName"),
        specific_character_set=src.get("SpecificCharacterSet"),
        series_description=ARGS["series_description"],
        **a,
    )
    ds.copy_specimen_information(src)
    ds.copy_patient_and_study_information(src)
    return ds


def _seconds(ds: Dataset, kw: str) -> float:
    """A date or time attribute as seconds since midnight, day 0 (to compare two clocks read apart)."""
    v = str(ds[kw].value)
    return float(v[:2]) * 3600 + float(v[2:4]) * 60 + float(v[4:]) if kw.endswith("Time") else float(v) * 86400


def _both(src: Dataset):
    uids = {"sop_instance_uid": generate_uid(), "series_instance_uid": generate_uid()}
    ours = sop_header(src, **uids, **ARGS)  # type: ignore[arg-type]
    return ours, _highdicom(src, **uids)


@pytest.mark.parametrize(
    "sop_class, attrs",
    [
        (CT, {}),
        (MR, {"SpecificCharacterSet": ["ISO 2022 IR 6", "ISO 2022 IR 87"], "PatientSex": ""}),
        (SC, {"SpecificCharacterSet": None, "PatientBirthDate": None, "StudyTime": None}),
        (MR_SPECTROSCOPY, {"PatientName": "single"}),
    ],
    ids=["ct", "mr_code_extensions", "sc_absent_attributes", "no_specimen_module"],
)
def test_header_equals_highdicoms(sop_class, attrs):
    ours, ref = _both(_source(sop_class, **attrs))
    assert seg_differences(ours, ref) == []
    for kw in ("TransferSyntaxUID", "MediaStorageSOPClassUID", "MediaStorageSOPInstanceUID"):
        assert ours.file_meta[kw].value == ref.file_meta[kw].value, kw
    for kw in ("InstanceCreationDate", "InstanceCreationTime", "ContentDate", "ContentTime"):
        assert ours[kw].VR == ref[kw].VR and abs(_seconds(ours, kw) - _seconds(ref, kw)) < 5, kw  # both "now"
    assert ("ContainerIdentifier" in ours) == (sop_class != MR_SPECTROSCOPY)  # the copy could fail both ways
    assert "SliceThickness" not in ours and ours.PatientAge == "054Y"


@pytest.mark.parametrize(
    "attrs",
    [
        {"PatientSex": "U"},
        {"PatientBirthDate": "20201345"},
        {"SpecificCharacterSet": "ISO_IR 6"},
        {"SpecificCharacterSet": "ISO 2022 IR 100"},
        {"SpecificCharacterSet": ["ISO 2022 IR 87", "ISO 2022 IR 6"]},
        {"SpecificCharacterSet": ["ISO 2022 IR 6", "ISO 2022 IR 58"]},
        {"SOPClassUID": "1.2.3.4"},
    ],
    ids=["sex", "birth_date", "charset_term", "lone_extension", "multibyte_first", "not_extension", "sop_class"],
)
def test_raises_where_highdicom_raises(attrs):
    src = _source(**attrs)
    with pytest.raises((ValueError, KeyError)) as ref:
        _highdicom(src, generate_uid(), generate_uid())
    with pytest.raises(ref.type):
        sop_header(src, sop_instance_uid=generate_uid(), series_instance_uid=generate_uid(), **ARGS)  # type: ignore[arg-type]


@pytest.mark.parametrize(
    "sop_class, attrs",
    [(CT, {}), (MR, {"AcquisitionDateTime": None}), (SC, {"Manufacturer": ""}), (MR_SPECTROSCOPY, {})],
    ids=["ct", "no_datetime", "no_manufacturer", "not_an_image"],
)
def test_acquisition_equipment_equals_highdicoms(sop_class, attrs):
    src = _source(sop_class, **attrs)
    try:
        ref = hd.ContributingEquipment.for_image_acquisition(src)
    except (AttributeError, ValueError):
        ref = None
    ours = acquisition_equipment(src)
    assert (ours is None) == (ref is None) == (sop_class == MR_SPECTROSCOPY or "Manufacturer" in attrs)
    if ref is not None:
        assert ours == ref


def test_fast_seg_write_does_not_parse_highdicoms_module_table(tmp_path):
    """In a fresh process, a fast SEG write leaves highdicom's table loaders uncalled (a write through
    highdicom's Segmentation calls them: the check can fail)."""
    code = f"""
import sys; sys.path.insert(0, {str(Path(__file__).parents[1] / "helpers")!r})
import numpy as np
from dicom_phantoms import write_phantom_series
from app.io.dicom_series import read_series
from app.io.seg_write import write_seg
from app.io.segments import SegmentSpec
from highdicom._standard_utils import get_module_attribute_map
info = write_phantom_series({str(tmp_path / "ct")!r}, shape=(16, 12, 6))
vol = read_series({str(tmp_path / "ct")!r})
specs = [SegmentSpec(v, f"s{{v}}") for v in np.unique(info.mask_ijk) if v]
write_seg(vol, info.mask_ijk, specs, ("a", "1"), {str(tmp_path / "fast.dcm")!r}, engine=sys.argv[1])
print(get_module_attribute_map.cache_info().currsize)
"""
    engines = ("fast", "highdicom")
    run = [subprocess.run([sys.executable, "-c", code, e], capture_output=True, text=True) for e in engines]
    assert [r.returncode for r in run] == [0, 0], run[0].stderr[-2000:] + run[1].stderr[-2000:]
    assert [r.stdout.split()[-1] for r in run] == ["0", "1"]
    assert (tmp_path / "fast.dcm").stat().st_size > 0
