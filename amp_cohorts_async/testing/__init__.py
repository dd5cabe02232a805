"""Test helpers: FakeAmplitude, an emulator of the Cohorts API and its S3 hand-off.

In-process::

    fake = FakeAmplitude()
    fake.add_cohort("abc", size=1000)
    async with CohortsClient(fake.api_key, fake.secret_key, transport=fake.transport()) as c:
        ...

Over loopback sockets::

    async with fake.serve() as base_url:
        async with CohortsClient(fake.api_key, fake.secret_key, base_url=base_url) as c:
            ...
"""

from ._data import FakeCohort, Member
from ._fake import FakeAmplitude, FakeRequest, FakeResponse, Fault, LoggedRequest, Violation
from ._virtual import run_in_virtual_time, threads_visible_to_looptime

__all__ = (
    "FakeAmplitude",
    "FakeCohort",
    "FakeRequest",
    "FakeResponse",
    "Fault",
    "LoggedRequest",
    "Member",
    "Violation",
    "run_in_virtual_time",
    "threads_visible_to_looptime",
)
