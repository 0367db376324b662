"""Pick one image stack from a scan, by key, by study, by rules or by size, and say why.

Choices are named by key (see ``app.io.dicom_scan``), modality, description, size and plane; never
by patient name or ID. A selection that would be a guess is refused with the exact selector to pass:

* several studies or patients among the image series, and no series or study UID given;
* a 4D series (``UID#vol1`` ...) or a multi-echo series (``UID#echo1`` ...) asked for as a whole
  or picked by the rules/size: one volume or echo must be named (``--series-uid UID#vol5`` or
  ``--volume 5``);
* a split UID whose largest stacks tie in size.
"""

from __future__ import annotations

import logging
import re
from collections.abc import Sequence
from typing import Any

from app.errors import ConfigError, DicomError
from app.io.dicom_info import SeriesInfo

logger = logging.getLogger(__name__)

_RULE_KEYS = {"modality", "min_slices", "max_slices", "description_regex", "orientation"}
# Keys listed one by one up to this many; longer sets as "first, second, ..., last".
_LIST_KEYS = 6


def check_rules(rules: dict | None) -> dict:
    """Validate selection rules; raises ``ConfigError`` on unknown keys or bad values."""
    rules = dict(rules or {})
    unknown = set(rules) - _RULE_KEYS
    if unknown:
        raise ConfigError(f"unknown series selection rule(s) {sorted(unknown)}; allowed: {sorted(_RULE_KEYS)}")
    for name in ("modality", "orientation"):
        if name in rules and isinstance(rules[name], str):
            rules[name] = [rules[name]]
    if "description_regex" in rules:
        try:
            re.compile(rules["description_regex"])
        except re.error as exc:
            raise ConfigError(f"bad description_regex {rules['description_regex']!r}: {exc}") from exc
    return rules


def _rules_text(rules: dict) -> str:
    parts = []
    if "modality" in rules:
        parts.append("modality " + "/".join(rules["modality"]))
    if "orientation" in rules:
        parts.append("orientation " + "/".join(rules["orientation"]))
    if "min_slices" in rules:
        parts.append(f"with >= {rules['min_slices']} slices")
    if "max_slices" in rules:
        parts.append(f"with <= {rules['max_slices']} slices")
    if "description_regex" in rules:
        parts.append(f"description matching /{rules['description_regex']}/")
    return " ".join(parts)


def _matches(s: SeriesInfo, rules: dict) -> bool:
    if "modality" in rules and s.modality.upper() not in {m.upper() for m in rules["modality"]}:
        return False
    if "orientation" in rules and s.orientation not in set(rules["orientation"]):
        return False
    if "min_slices" in rules and s.n_slices < int(rules["min_slices"]):
        return False
    if "max_slices" in rules and s.n_slices > int(rules["max_slices"]):
        return False
    return "description_regex" not in rules or bool(re.search(rules["description_regex"], s.description, re.IGNORECASE))


def _key_list(keys: Sequence[str]) -> str:
    keys = list(keys)
    if len(keys) <= _LIST_KEYS:
        return ", ".join(keys)
    return f"{keys[0]}, {keys[1]}, ..., {keys[-1]}"


def _numbers(values: list[int]) -> str:
    """1..5 for a run, else the values (shortened past ``_LIST_KEYS``)."""
    if len(values) > 2 and values == list(range(values[0], values[-1] + 1)):
        return f"{values[0]}..{values[-1]}"
    return _key_list([str(v) for v in values])


def _set_parts(members: list[SeriesInfo]) -> tuple[str, str, str, str]:
    """(what the set holds, the key pattern, its ranges, the kind) of a 4D / multi-echo set."""
    first = members[0]
    echoes = sorted({m.echo for m in members if m.echo is not None})
    volumes = sorted({m.volume for m in members if m.volume is not None})
    what = []
    if echoes:
        what.append(f"{len(echoes)} echo(es) (EchoNumbers {_numbers(echoes)})")
    if volumes:
        what.append(f"{len(volumes)} volume(s) (by {first.volume_attribute})")
    sizes = sorted({m.n_slices for m in members})
    size = f"{sizes[0]}" if len(sizes) == 1 else f"{sizes[0]}-{sizes[-1]}"
    unit = "frame(s)" if first.multiframe else "slice(s)"
    pattern, ranges = first.group_key, []
    if echoes:
        pattern += f"#echo{echoes[0]}" if len(echoes) == 1 else "#echoE"
        if len(echoes) > 1:
            ranges.append(f"E = {_numbers(echoes)}")
    if volumes:
        pattern += f"#vol{volumes[0]}" if len(volumes) == 1 else "#volN"
        if len(volumes) > 1:
            ranges.append(f"N = {_numbers(volumes)}")
    kind = "4D and multi-echo" if echoes and volumes else "4D" if volumes else "multi-echo"
    return f"{' x '.join(what)} of {size} {unit} each", pattern, ", ".join(ranges), kind


def _set_line(members: list[SeriesInfo]) -> str:
    """One listing line for a 4D / multi-echo set."""
    first = members[0]
    what, pattern, ranges, _ = _set_parts(members)
    return (
        f"{pattern} ({ranges + '; ' if ranges else ''}{what}) | {first.modality or '?'} | '{first.description}' | "
        f"{first.n_slices} "
        f"{'frame(s)' if first.multiframe else 'slice(s)'}{' (mosaic)' if first.mosaic else ''} | "
        f"{first.columns}x{first.rows} | {first.orientation}"
    )


def _entries(series: list[SeriesInfo]) -> list[list[SeriesInfo]]:
    """Series with the members of each 4D / multi-echo set collapsed into one entry, in scan order."""
    out: list[list[SeriesInfo]] = []
    sets: dict[str, list[SeriesInfo]] = {}
    for s in series:
        if s.group_key:
            if s.group_key not in sets:
                sets[s.group_key] = []
                out.append(sets[s.group_key])
            sets[s.group_key].append(s)
        else:
            out.append([s])
    return out


def _line(entry: list[SeriesInfo]) -> str:
    return entry[0].summary() if len(entry) == 1 and not entry[0].group_key else _set_line(entry)


def describe_series(series: list[SeriesInfo]) -> str:
    """Multi-line listing of series for messages (no patient data); grouped by study when there are several."""
    if not series:
        return "  (none)"
    studies: dict[str, list[SeriesInfo]] = {}
    for s in series:
        studies.setdefault(s.study_uid, []).append(s)
    if len(studies) == 1:
        return "\n".join(f"  {_line(e)}" for e in _entries(series))
    lines = []
    for uid, members in studies.items():
        entries = _entries(members)
        lines.append(f"  study {uid or '(blank StudyInstanceUID)'} ({len(entries)} series):")
        lines.extend(f"    {_line(e)}" for e in entries)
    return "\n".join(lines)


def list_series(series: list[SeriesInfo]) -> list[dict[str, Any]]:
    """The choices as rows for a listing (``segapp`` could print them as a table or JSON): one row per
    stack, 4D / multi-echo sets as one row with their selectable ``keys``. No patient data."""
    rows = []
    for entry in _entries(series):
        s = entry[0]
        is_set = bool(s.group_key)
        rows.append(
            {
                "key": s.group_key if is_set else s.key,
                "selectable_keys": [m.key for m in entry] if is_set else [s.key],
                "study_uid": s.study_uid,
                "series_uid": s.uid,
                "series_number": s.series_number,
                "modality": s.modality,
                "description": s.description,
                "n_slices": s.n_slices,
                "n_volumes": len({m.volume for m in entry if m.volume is not None}) or 1,
                "n_echoes": len({m.echo for m in entry if m.echo is not None}) or 1,
                "columns": s.columns,
                "rows": s.rows,
                "orientation": s.orientation,
                "is_image": s.is_image,
                "mosaic": s.mosaic,
                "multiframe": s.multiframe,
            }
        )
    return rows


def _set_advice(members: list[SeriesInfo], volume: int | None) -> str:
    first = members[0]
    what, pattern, ranges, kind = _set_parts(members)
    echoes = {m.echo for m in members if m.echo is not None}
    volumes = {m.volume for m in members if m.volume is not None}
    advice = f"--series-uid {pattern} (series_uid={'; ' + ranges if ranges else ''}), e.g. --series-uid {first.key}"
    if len(volumes) > 1:
        advice += (
            ", or --volume N (volume=N)"
            if not echoes
            else f", or --series-uid {first.group_key}#echo{first.echo} with --volume N (volume=N)"
        )
    asked = f" (--volume {volume} leaves {len(members)})" if volume is not None else ""
    return f"series {first.group_key} is {kind}: {what}{asked}; select one stack: {advice}"


def _resolve(entry: list[SeriesInfo], volume: int | None, how: str) -> tuple[SeriesInfo, str]:
    """One stack of a selected entry (a plain stack or a 4D / multi-echo set), honouring ``volume``."""
    if not entry[0].group_key:
        s = entry[0]
        if volume is not None and volume != 1:
            raise DicomError(f"series {s.key} is one 3D volume: --volume {volume} does not apply")
        return s, how
    members = entry
    if volume is not None:
        members = [m for m in entry if m.volume == volume]
        if not members:
            vols = sorted({m.volume for m in entry if m.volume is not None})
            if not vols:
                raise DicomError(f"{_set_advice(entry, None)} (--volume does not apply: it has no volumes)")
            raise DicomError(
                f"series {entry[0].group_key} has volumes {vols[0]}..{vols[-1]}, not {volume}; "
                f"{_set_advice(entry, None)}"
            )
    if len(members) > 1:
        raise DicomError(_set_advice(members, volume))
    pick = members[0]
    return pick, how + (f" (volume {volume} of {pick.group_key}: {pick.key})" if volume is not None else "")


def _check_one_study(images: list[SeriesInfo], study_uid: str | None) -> None:
    studies = {s.study_uid for s in images}
    patients = {s.patient_token for s in images}
    if len(studies) <= 1 and len(patients) <= 1:
        return
    parts = []
    if len(studies) > 1:
        parts.append(f"{len(studies)} studies")
    if len(patients) > 1:
        parts.append(f"{len(patients)} patients")
    where = f"study {study_uid} holds" if study_uid else "the folder holds"
    how = "--series-uid (series_uid=)" if study_uid else "--study-uid (study_uid=) or --series-uid (series_uid=)"
    raise DicomError(
        f"{where} image series of {' and '.join(parts)}: refusing to pick one; pass {how} to choose; "
        f"choices:\n{describe_series(images)}"
    )


def select_series(
    series: list[SeriesInfo],
    series_uid: str | None = None,
    rules: dict | None = None,
    *,
    study_uid: str | None = None,
    volume: int | None = None,
) -> tuple[SeriesInfo, str]:
    """Pick one image stack and say why.

    Args:
        series: from ``scan_folder`` / ``scan``.
        series_uid: a ``SeriesInfo.key`` (``UID``, ``UID#2``, ``UID#vol5``, ``UID#echo2``...), a 4D /
            multi-echo set's key, or a SeriesInstanceUID (``--series-uid``); overrides ``rules``. A UID
            split into several stacks selects its largest stack (the reason says so); ``UID#n``
            selects another.
        rules: ``{"modality": [...], "min_slices": n, "max_slices": n, "description_regex": str,
            "orientation": [...]}`` (all optional) from the bundle metadata.
        study_uid: only consider series of this StudyInstanceUID (``--study-uid``).
        volume: 1-based volume of a 4D series (``--volume``).

    Returns:
        (the stack, a human-readable reason).

    Raises:
        DicomError: nothing matches, the UID is unknown or not an image series, or the choice would be
            a guess (several studies/patients, a whole 4D / multi-echo set, tied stacks); the message
            lists the choices and names the selector to pass.
        ConfigError: malformed rules or volume.
    """
    rules = check_rules(rules)
    if volume is not None and (isinstance(volume, bool) or not isinstance(volume, int) or volume < 1):
        raise ConfigError(f"volume must be a positive integer (1 = the first volume), got {volume!r}")
    pool = series
    if study_uid:
        pool = [s for s in series if s.study_uid == study_uid]
        if not pool:
            raise DicomError(f"no series in study {study_uid}; available series:\n{describe_series(series)}")
    if series_uid:
        return _select_by_uid(pool, series, series_uid, rules, volume)

    images = [s for s in pool if s.is_image]
    _check_one_study(images, study_uid)
    entries = [e for e in _entries(images) if _matches(e[0], rules)]
    wanted = _rules_text(rules)
    what = f"series matching {wanted}" if wanted else "image series"
    if not entries:
        raise DicomError(
            f"no image series matches {wanted or 'the request'}; available series:\n{describe_series(series)}"
        )
    if len(entries) == 1:
        entry = entries[0]
        name = entry[0].group_key or entry[0].key
        reason = f"only {what} ({name}, {entry[0].n_slices} slices)"
    else:
        entries.sort(key=lambda e: -e[0].n_slices)
        entry = entries[0]
        name = entry[0].group_key or entry[0].key
        tie = entries[1][0].n_slices == entry[0].n_slices
        others = ", ".join(f"{e[0].group_key or e[0].key} ({e[0].n_slices})" for e in entries[1:])
        reason = (
            f"largest of {len(entries)} {what}: {name} with {entry[0].n_slices} slices"
            f"{' (tie; first in study/series-number order)' if tie else ''}; others: {others}"
        )
    pick, reason = _resolve(entry, volume, reason)
    if pick.split_note:
        reason += f"; note: {pick.split_note}"
    return pick, reason


def _select_by_uid(
    pool: list[SeriesInfo], series: list[SeriesInfo], series_uid: str, rules: dict, volume: int | None
) -> tuple[SeriesInfo, str]:
    chosen = [s for s in pool if s.key == series_uid]
    if not chosen:  # a 4D / multi-echo set, or one echo of a 4D multi-echo set
        chosen = [
            s for s in pool if s.group_key and (s.group_key == series_uid or s.key.startswith(series_uid + "#vol"))
        ]
    if not chosen:
        chosen = [s for s in pool if s.uid == series_uid]
    if not chosen:
        raise DicomError(f"no series with UID {series_uid}; available series:\n{describe_series(series)}")
    entries = _entries(chosen)
    entry = entries[0]  # stacks are ordered largest first
    first = entry[0]
    if not first.is_image:
        raise DicomError(
            f"series {series_uid} is a {first.modality} object, not an image series; "
            f"available series:\n{describe_series(series)}"
        )
    reason = f"chosen by --series-uid {series_uid}"
    if len(entries) > 1:
        note = first.split_note or entries[1][0].split_note
        if entries[1][0].n_slices == first.n_slices:
            raise DicomError(f"{note}; pass one of their keys to --series-uid")
        reason += (
            f" ({note}; used the largest, {first.group_key or first.key}, {first.n_slices} slices; "
            f"pass another key to use it)"
        )
    pick, reason = _resolve(entry, volume, reason)
    if rules and not _matches(pick, rules):
        logger.warning(
            "series %s does not match the bundle's rules (%s); using it as asked", pick.key, _rules_text(rules)
        )
    return pick, reason


__all__ = ["check_rules", "describe_series", "list_series", "select_series"]
