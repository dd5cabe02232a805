"""Creating a cohort by upload without creating it twice.

Amplitude's ``/upload`` has no idempotency key. When the answer to an upload that creates a
cohort is lost after Amplitude may have acted on it (a 5xx, a connection that broke after the
request left, a read timeout, a 2xx whose body could not be read), sending it again could make
a second cohort. So before each retry, and once more when the retries are spent, the cohort
list (no quota) is searched for a cohort of the same name, owner and app created since the
first such attempt began:

- exactly one: Amplitude did create it; it is adopted and nothing is sent again;
- none: nothing was created; the upload is sent again (or its last error raised);
- several, or the list cannot be had: this cannot be decided, and ``UncertainUploadError``
  names the cohort that may exist.

Replacing an existing cohort's members and ``skip_save`` validation change nothing when sent
twice, and neither do the membership ADDs that carry an upload's later chunks; those are
retried like any request.
"""

from __future__ import annotations

from collections.abc import Mapping
from datetime import datetime, timedelta
from typing import Any

import attrs

from ._api import Api
from ._convert import UploadWire
from ._exceptions import (
    AmplitudeError,
    ResponseValidationError,
    ServerError,
    TransportError,
    UncertainUploadError,
)
from ._models import Cohort

__all__ = ("Created", "create_by_upload")

# Amplitude stamps ``createdAt`` in whole seconds by its own clock: a cohort created by our
# attempt may carry a time a little before the attempt by ours. A minute covers clocks that
# drift between NTP syncs; a cohort of the same name and owner made by someone else in that
# minute is the cost (several candidates are never guessed between).
CLOCK_ALLOWANCE = timedelta(seconds=60)


@attrs.frozen
class Created:
    """The cohort an upload created: its id, and its answer (None when it was adopted)."""

    cohort_id: str
    answer: UploadWire | None


def acted_perhaps(error: AmplitudeError) -> bool:
    """Whether Amplitude may have acted on a request that failed with ``error``."""
    if isinstance(error, TransportError):
        return not error.never_sent
    return isinstance(error, ServerError | ResponseValidationError)


async def create_by_upload(api: Api, body: Mapping[str, Any]) -> Created:
    """Send ``body`` (an upload without ``existing_cohort_id``) so that at most one cohort
    comes of it, under the send path's one retry loop."""
    name, owner, app_id = body["name"], body["owner"], body["app_id"]
    clock = api.scheduler.wall_clock
    since: datetime | None = None  # when the first attempt Amplitude may have acted on began

    async def look_up() -> Created | None:
        assert since is not None
        try:
            cohorts = await api.list_cohorts(False)
        except AmplitudeError as error:
            raise UncertainUploadError(
                f"the cohort list could not be read to check ({error})",
                name=name, owner=owner, app_id=app_id, since=since, candidates=[],
            ) from error
        found = [c.id for c in cohorts if _made_by(c, name, owner, app_id, since)]
        if len(found) > 1:
            raise UncertainUploadError(
                f"the list shows {len(found)} such cohorts created since then: "
                f"{', '.join(found)}",
                name=name, owner=owner, app_id=app_id, since=since, candidates=found,
            )
        return Created(found[0], None) if found else None

    async def attempt() -> Created:
        nonlocal since
        if since is not None:
            adopted = await look_up()
            if adopted is not None:
                return adopted
        started = clock()
        try:
            answer = await api.upload(body, retried=False)
        except AmplitudeError as error:
            if since is None and acted_perhaps(error):
                since = started
            raise
        return Created(answer.cohort_id, answer)

    try:
        return await api.sender.retrying(attempt, what="upload_cohort")
    except UncertainUploadError:
        raise
    except AmplitudeError:
        if since is None:
            raise  # Amplitude did not act on any attempt: the error is the whole story
        adopted = await look_up()
        if adopted is None:
            raise  # no cohort came of it: the upload failed cleanly
        return adopted


def _made_by(cohort: Cohort, name: str, owner: str, app_id: int, since: datetime) -> bool:
    return (cohort.name == name and owner in (cohort.owners or ())
            and cohort.app_id in (None, app_id)
            and cohort.created_at is not None
            and cohort.created_at >= since - CLOCK_ALLOWANCE)
