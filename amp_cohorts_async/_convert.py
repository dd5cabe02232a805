"""The private cattrs converter: wire JSON -> frozen models, with readable errors."""

from __future__ import annotations

import math
from datetime import UTC, datetime
from typing import Any, TypeVar

import attrs
import cattrs
from cattrs.gen import make_dict_structure_fn, override

from ._exceptions import ResponseValidationError
from ._models import (
    Cohort,
    CohortRequest,
    MembershipIdType,
    MembershipOutcome,
    Operation,
    RequestStatus,
    SyncMetadata,
    Usage,
)

__all__ = ("parse_datetime", "structure")

T = TypeVar("T")

# Amplitude sends epoch seconds; a few endpoints have been seen sending milliseconds.
_EPOCH_MS_THRESHOLD = 100_000_000_000


def parse_datetime(value: Any) -> datetime:
    """Epoch seconds (or milliseconds) or an ISO-8601 string -> aware datetime (UTC if naive)."""
    if isinstance(value, bool):
        raise ValueError(f"expected a timestamp, got {value!r}")
    if isinstance(value, int | float):
        if not math.isfinite(value):
            raise ValueError(f"expected a timestamp, got {value!r}")
        seconds = value / 1000 if abs(value) >= _EPOCH_MS_THRESHOLD else value
        return datetime.fromtimestamp(seconds, tz=UTC)
    if isinstance(value, str):
        text = value.strip()
        if text.lstrip("-").replace(".", "", 1).isdigit():
            return parse_datetime(float(text))
        parsed = datetime.fromisoformat(text)
        return parsed if parsed.tzinfo is not None else parsed.replace(tzinfo=UTC)
    raise ValueError(f"expected a timestamp, got {value!r}")


def _structure_str(value: Any, _type: Any) -> str:
    if isinstance(value, str):
        return value
    if isinstance(value, int) and not isinstance(value, bool):
        return str(value)  # ids are sometimes sent as numbers
    raise ValueError(f"expected a string, got {value!r}")


def _structure_int(value: Any, _type: Any) -> int:
    if isinstance(value, int) and not isinstance(value, bool):
        return value
    if isinstance(value, float) and value.is_integer():
        return int(value)
    if isinstance(value, str) and value.strip().lstrip("-").isdigit():
        return int(value)
    raise ValueError(f"expected an integer, got {value!r}")


def _structure_float(value: Any, _type: Any) -> float:
    if isinstance(value, int | float) and not isinstance(value, bool):
        return float(value)
    raise ValueError(f"expected a number, got {value!r}")


def _structure_bool(value: Any, _type: Any) -> bool:
    if isinstance(value, bool):
        return value
    if value in (0, 1):
        return bool(value)
    if isinstance(value, str) and value.lower() in ("true", "false"):
        return value.lower() == "true"
    raise ValueError(f"expected a boolean, got {value!r}")


def _structure_dict(value: Any, _type: Any) -> dict[str, Any]:
    if isinstance(value, dict):
        return value
    raise ValueError(f"expected an object, got {value!r}")


def _structure_request_status(value: Any, _type: Any) -> RequestStatus:
    base = _CONVERTER.structure(value, _StatusWire)
    status = base.async_status
    return RequestStatus(
        request_id=base.request_id,
        cohort_id=base.cohort_id,
        async_status=status,
        done=status is not None and status.upper() == "JOB COMPLETED",
    )


def _structure_usage(value: Any, _type: Any) -> Usage:
    if not isinstance(value, dict) or not isinstance(value.get("rest_download"), dict):
        raise ValueError("expected an object with a 'rest_download' object")
    wire = _CONVERTER.structure(value["rest_download"], _UsageWire)
    return Usage(
        limit=wire.limit,
        usage=wire.usage,
        resets_at=wire.resets_at,
        remaining=max(0, wire.limit - wire.usage),
    )


@attrs.frozen(kw_only=True)
class _StatusWire:
    request_id: str
    cohort_id: str | None = None
    async_status: str | None = None


@attrs.frozen(kw_only=True)
class _UsageWire:
    limit: int
    usage: int
    resets_at: datetime


@attrs.frozen(kw_only=True)
class CohortList:
    cohorts: list[Cohort]


@attrs.frozen(kw_only=True)
class UploadMetadataWire:
    matched: int = 0
    totals: int = 0
    invalid_ids_sample: list[str] = attrs.field(factory=list)


@attrs.frozen(kw_only=True)
class UploadWire:
    cohort_id: str = attrs.field(metadata={"wire": "cohortId"})
    metadata: UploadMetadataWire = attrs.field(metadata={"wire": "metadata"})


@attrs.frozen(kw_only=True)
class MembershipWire:
    cohort_id: str
    memberships_result: list[MembershipOutcome] = attrs.field(factory=list)


def _structure_id_type(value: Any, _type: Any) -> MembershipIdType | str:
    text = _structure_str(value, str)
    return MembershipIdType(text) if text in MembershipIdType.__members__ else text


def _structure_operation(value: Any, _type: Any) -> Operation | str:
    text = _structure_str(value, str)
    return Operation(text) if text in Operation.__members__ else text


def _structure_skipped(value: Any, _type: Any) -> list[str]:
    if value is None:
        return []
    if isinstance(value, list):
        return [_structure_str(item, str) for item in value]
    raise ValueError(f"expected a list, got {value!r}")


def _build_converter() -> cattrs.Converter:
    converter = cattrs.Converter(forbid_extra_keys=False)
    converter.register_structure_hook(str, _structure_str)
    converter.register_structure_hook(int, _structure_int)
    converter.register_structure_hook(float, _structure_float)
    converter.register_structure_hook(bool, _structure_bool)
    converter.register_structure_hook(datetime, lambda v, _t: parse_datetime(v))
    converter.register_structure_hook_func(lambda t: t == dict[str, Any], _structure_dict)
    converter.register_structure_hook(RequestStatus, _structure_request_status)
    converter.register_structure_hook(Usage, _structure_usage)
    converter.register_structure_hook(
        MembershipOutcome,
        lambda v, _t: MembershipOutcome(
            skipped_ids=_structure_skipped(_dict(v).get("skipped_ids"), list),
            id_type=_structure_id_type(_dict(v).get("id_type"), str),
            operation=_structure_operation(_dict(v).get("operation"), str),
        ),
    )
    for cls in (SyncMetadata, Cohort, CohortRequest, CohortList, UploadWire,
                UploadMetadataWire, MembershipWire, _StatusWire, _UsageWire):
        renames = {
            field.name: override(rename=field.metadata["wire"])
            for field in attrs.fields(cls)
            if "wire" in field.metadata
        }
        hook = make_dict_structure_fn(cls, converter, **renames)  # type: ignore[arg-type]
        converter.register_structure_hook(cls, _nulls_to_defaults(hook, cls))
    return converter


def _dict(value: Any) -> dict[str, Any]:
    return _structure_dict(value, dict)


def _nulls_to_defaults(hook: Any, cls: type[Any]) -> Any:
    """Treat ``"field": null`` like an absent field, so defaults (``[]``, ``None``) apply."""
    required = {f.name for f in attrs.fields(cls) if f.default is attrs.NOTHING}

    def structure(value: Any, _type: Any) -> Any:
        mapping = _dict(value)
        cleaned = {k: v for k, v in mapping.items() if v is not None or k in required}
        return hook(cleaned, _type)

    return structure


_CONVERTER = _build_converter()


def structure(data: Any, cls: type[T], *, what: str) -> T:
    """Structure ``data`` into ``cls``; a mismatch is a ResponseValidationError naming the path."""
    try:
        return _CONVERTER.structure(data, cls)
    except (cattrs.BaseValidationError, ValueError, TypeError, KeyError) as exc:
        if isinstance(exc, cattrs.BaseValidationError):
            details = "; ".join(cattrs.transform_error(exc, path="$"))
        else:
            details = f"$: {exc}"
        raise ResponseValidationError(f"unexpected {what} response body: {details}") from None
