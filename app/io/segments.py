"""Segment descriptions shared by the SEG writer and reader: :class:`SegmentSpec`, the SEG SOP
classes, and the highdicom objects (codes, AlgorithmIdentification, SegmentDescription) built from
them."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING

from app.errors import ConfigError

if TYPE_CHECKING:  # highdicom is imported lazily: it takes ~1 s to import
    import highdicom as hd

SEG_STORAGE = "1.2.840.10008.5.1.4.1.1.66.4"
LABELMAP_SEG_STORAGE = "1.2.840.10008.5.1.4.1.1.66.7"

Code3 = tuple[str, str, str]  # (code value, coding scheme designator, code meaning)


@dataclass(frozen=True)
class SegmentSpec:
    """One label of a label map, described for DICOM.

    Attributes:
        label_value: voxel value of this label in the label map (> 0).
        label_name: human-readable name (SegmentLabel), e.g. ``"liver"``.
        category_code: SegmentedPropertyCategory as ``(value, scheme, meaning)``,
            e.g. ``("91723000", "SCT", "Anatomical Structure")`` (CID 7150).
        type_code: SegmentedPropertyType, e.g. ``("10200004", "SCT", "Liver")``.
        type_modifier_code: optional SegmentedPropertyTypeModifier, e.g. laterality
            ``("7771000", "SCT", "Left")`` (CID 244).
        color_rgb: optional display colour, 0-255 per channel.
    """

    label_value: int
    label_name: str
    category_code: Code3 = ("91723000", "SCT", "Anatomical Structure")
    type_code: Code3 = ("85756007", "SCT", "Tissue")
    color_rgb: tuple[int, int, int] | None = None
    type_modifier_code: Code3 | None = None

    @classmethod
    def from_dict(cls, d: dict) -> SegmentSpec:
        """Build from bundle metadata: keys ``label_value``, ``label_name``, ``category_code``,
        ``type_code`` (each a 3-item list) and optional ``type_modifier_code`` and ``color_rgb``."""
        try:
            return cls(
                label_value=int(d["label_value"]),
                label_name=str(d["label_name"]),
                category_code=tuple(d.get("category_code", cls.category_code)),
                type_code=tuple(d.get("type_code", cls.type_code)),
                color_rgb=tuple(d["color_rgb"]) if d.get("color_rgb") else None,
                type_modifier_code=tuple(d["type_modifier_code"]) if d.get("type_modifier_code") else None,
            )
        except (KeyError, TypeError, ValueError) as exc:
            raise ConfigError(f"bad segment description {d!r}: {exc}") from exc


def sorted_specs(segments: Sequence[SegmentSpec]) -> list[SegmentSpec]:
    """The specs in label-value order (segment ``n`` is the ``n``-th), checked: at least one, label
    values unique and in 1..65535."""
    if not segments:
        raise ConfigError("no segments described; a SEG needs at least one")
    specs = sorted(segments, key=lambda s: s.label_value)
    values = [s.label_value for s in specs]
    if len(set(values)) != len(values) or min(values) < 1 or max(values) > 65535:
        raise ConfigError(f"segment label values must be unique and in 1..65535, got {values}")
    return specs


def coded_concept(c: Code3, what: str) -> hd.sr.CodedConcept:
    """A highdicom CodedConcept from ``(value, scheme, meaning)``; ``what`` names it in the error."""
    from highdicom.sr import CodedConcept

    if len(c) != 3 or not all(isinstance(x, str) and x for x in c):
        raise ConfigError(f"{what} must be (value, scheme, meaning) strings, got {c!r}")
    return CodedConcept(value=c[0], scheme_designator=c[1], meaning=c[2])


def segment_descriptions(specs: Sequence[SegmentSpec], algorithm: tuple[str, str]) -> list[hd.seg.SegmentDescription]:
    """SegmentSequence items for ``specs`` (numbered 1..N in the given order), each with an
    AUTOMATIC AlgorithmIdentification ``(name, version)`` of family "Artificial Intelligence"."""
    import highdicom as hd
    from pydicom.sr.codedict import codes

    algo = hd.AlgorithmIdentificationSequence(
        name=str(algorithm[0]), family=codes.cid7162.ArtificialIntelligence, version=str(algorithm[1])
    )
    out = []
    for n, s in enumerate(specs, start=1):
        desc = hd.seg.SegmentDescription(
            segment_number=n,
            segment_label=s.label_name[:64],
            segmented_property_category=coded_concept(s.category_code, f"segment {s.label_name!r} category_code"),
            segmented_property_type=coded_concept(s.type_code, f"segment {s.label_name!r} type_code"),
            algorithm_type=hd.seg.SegmentAlgorithmTypeValues.AUTOMATIC,
            algorithm_identification=algo,
            display_color=hd.color.CIELabColor.from_rgb(*s.color_rgb) if s.color_rgb else None,
        )
        if s.type_modifier_code is not None:  # (0062,0011), nested in the property type's code item
            modifier = coded_concept(s.type_modifier_code, f"segment {s.label_name!r} type_modifier_code")
            desc.SegmentedPropertyTypeCodeSequence[0].SegmentedPropertyTypeModifierCodeSequence = [modifier]
        out.append(desc)
    return out
