"""Fake cohorts: members (generated deterministically or written by uploads) and export files."""

from __future__ import annotations

import csv
import gzip
import io
import random
import shutil
import tempfile
from collections.abc import Iterator, Sequence
from typing import IO, Any, cast

import attrs

__all__ = ("FakeCohort", "Member", "render_export")

_CITIES = ("Berlin", "San Francisco", "Paris, TX", 'The "Big" Apple', "Zürich", "São Paulo")
_PLANS = ("free", "pro", "enterprise")


@attrs.define
class Member:
    amplitude_id: str
    user_id: str  # "" when the user has no user id
    properties: dict[str, str] = attrs.field(factory=dict)


@attrs.define
class FakeCohort:
    """One cohort's metadata and members.

    Generated cohorts keep only (size, seed) until something writes to them, so a 2M-member
    cohort costs no memory until it is exported or changed.
    """

    id: str
    name: str
    app_id: int = 123456
    owners: list[str] = attrs.field(factory=lambda: ["demo@amplitude.com"])
    published: bool = True
    description: str = ""
    group_type: str | None = None  # set for group cohorts (cg)
    property_names: tuple[str, ...] = ()
    sync_metadata: list[dict[str, Any]] = attrs.field(factory=list)
    created_at: int = 1679437288
    last_mod: int = 1679437294
    #: Epoch seconds of the last computation: what the list's ``lastComputed`` says, and what a
    #: sync compares with the copy it holds. ``FakeAmplitude.touch`` moves it forward.
    last_computed: int = 1679437294
    archived: bool = False
    extra: dict[str, Any] = attrs.field(factory=dict)
    generated_size: int = 0
    seed: int = 0
    #: Generated members are the indexes [generated_start, generated_start + generated_size):
    #: a recomputation moves the range, so some members leave and as many join, at no memory.
    generated_start: int = 0
    _members: dict[str, Member] | None = None
    _by_user: dict[str, str] | None = None

    # -- members ----------------------------------------------------------------------
    def generated(self, index: int) -> Member:
        rng = random.Random(self.seed * 1_000_003 + index)
        amplitude_id = str(100_000_000_000 + self.seed * 10_000_000 + index)
        if self.group_type is not None:
            return Member(amplitude_id, f"{self.group_type}-{index}")
        user_id = "" if index % 7 == 3 else f"user-{self.seed}-{index}@example.com"
        props = {}
        for name in self.property_names:
            if name == "city":
                props[name] = _CITIES[rng.randrange(len(_CITIES))]
            elif name == "plan":
                props[name] = _PLANS[rng.randrange(len(_PLANS))]
            else:
                props[name] = f"{name}-{rng.randrange(1000)}"
        return Member(amplitude_id, user_id, props)

    @property
    def size(self) -> int:
        return self.generated_size if self._members is None else len(self._members)

    def generated_member(self, *, user_id: str | None = None, amplitude_id: str | None = None
                         ) -> Member | None:
        """The generated member, present or past (a user stays known to the project after a
        recomputation took them out), with this user id or Amplitude id; None if none."""
        try:
            if amplitude_id is not None:
                index = int(amplitude_id) - 100_000_000_000 - self.seed * 10_000_000
            elif user_id is not None and self.group_type is not None:
                index = int(user_id.removeprefix(f"{self.group_type}-"))
            elif user_id is not None:
                index = int(user_id.removeprefix(f"user-{self.seed}-")
                            .removesuffix("@example.com"))
            else:
                return None
        except ValueError:
            return None
        if not 0 <= index < self.generated_start + self.generated_size:
            return None
        member = self.generated(index)
        wanted = (member.amplitude_id == amplitude_id if amplitude_id is not None
                  else member.user_id == user_id)
        return member if wanted else None

    def iter_members(self) -> Iterator[Member]:
        if self._members is None:
            start = self.generated_start
            return (self.generated(i) for i in range(start, start + self.generated_size))
        return iter(list(self._members.values()))

    def _materialize(self) -> dict[str, Member]:
        if self._members is None:
            self._members = {m.amplitude_id: m for m in self.iter_members()}
            self._by_user = {m.user_id: m.amplitude_id for m in self._members.values() if m.user_id}
        assert self._by_user is not None
        return self._members

    def recompute(self, churn: float, last_computed: int) -> tuple[int, int]:
        """A recomputation: ``churn`` of the members leave and as many new ones join (at
        least one each way when there are members); returns (left, joined)."""
        moved = max(1, round(self.size * churn)) if self.size else 0
        if self._members is None:
            self.generated_start += moved
        else:
            members = self._materialize()
            for amplitude_id in list(members)[:moved]:
                self.remove_by_amplitude_id(amplitude_id)
            fresh = self.generated_start + self.generated_size
            for index in range(fresh, fresh + moved):
                self.add(self.generated(index))
            self.generated_start += moved
        self.last_computed = last_computed
        return moved, moved

    def snapshot(self) -> FakeCohort:
        """A frozen copy of the members as they are now, for an export job to render later
        (a recomputation after the request must not change what the job exports)."""
        copy = attrs.evolve(self)
        if self._members is not None:
            copy.replace(list(self._members.values()))
        return copy

    def replace(self, members: Sequence[Member]) -> None:
        self._members = {m.amplitude_id: m for m in members}
        self._by_user = {m.user_id: m.amplitude_id for m in members if m.user_id}

    def add(self, member: Member) -> None:
        members = self._materialize()
        assert self._by_user is not None
        members[member.amplitude_id] = member
        if member.user_id:
            self._by_user[member.user_id] = member.amplitude_id

    def remove_by_amplitude_id(self, amplitude_id: str) -> bool:
        members = self._materialize()
        assert self._by_user is not None
        member = members.pop(amplitude_id, None)
        if member is not None and member.user_id:
            self._by_user.pop(member.user_id, None)
        return member is not None

    def remove_by_user_id(self, user_id: str) -> bool:
        self._materialize()
        assert self._by_user is not None
        amplitude_id = self._by_user.get(user_id)
        return amplitude_id is not None and self.remove_by_amplitude_id(amplitude_id)

    def has_user(self, user_id: str) -> bool:
        self._materialize()
        assert self._by_user is not None
        return user_id in self._by_user

    # -- wire -------------------------------------------------------------------------
    def to_json(self, *, include_sync_info: bool) -> dict[str, Any]:
        data: dict[str, Any] = {
            "appId": self.app_id,
            "archived": self.archived,
            "definition": {
                "version": 3,
                "countGroup": {"name": self.group_type or "User", "is_computed": False},
                "cohortType": "UNIQUES",
                "andClauses": [],
                "referenceFrameTimeParams": {},
            },
            "description": self.description,
            "finished": True,
            "id": self.id,
            "name": self.name,
            "owners": list(self.owners),
            "viewers": [],
            "published": self.published,
            "size": self.size,
            "type": "redshift",
            "lastMod": self.last_mod,
            "createdAt": self.created_at,
            "lastComputed": self.last_computed,
            "hidden": False,
            "metadata": None,
            "view_count": None,
            "popularity": None,
            "last_viewed": None,
            "chart_id": None,
            "edit_id": None,
            "is_predictive": False,
            "is_official_content": False,
            "location_id": None,
            "shortcut_ids": [],
            **self.extra,
        }
        if include_sync_info:
            data["syncMetadata"] = list(self.sync_metadata)
        return data


class _Spool(io.BufferedIOBase):
    """A write-then-read buffer: memory first, an unnamed temp file past 8 MiB."""

    _LIMIT = 8 << 20

    def __init__(self) -> None:
        super().__init__()
        self._buffer: IO[bytes] = io.BytesIO()
        self._on_disk = False

    def writable(self) -> bool:
        return True

    def readable(self) -> bool:
        return True

    def seekable(self) -> bool:
        return True

    def write(self, data: Any) -> int:
        written = self._buffer.write(data)
        if not self._on_disk and self._buffer.tell() > self._LIMIT:
            disk = tempfile.TemporaryFile()  # noqa: SIM115 - closed by close()
            disk.write(self._buffer.getvalue())  # type: ignore[attr-defined]
            self._buffer = disk
            self._on_disk = True
        return written

    def readinto(self, buffer: Any) -> int:
        data = self._buffer.read(len(buffer))
        buffer[: len(data)] = data
        return len(data)

    def read(self, size: int | None = -1) -> bytes:
        return self._buffer.read(-1 if size is None else size)

    def seek(self, offset: int, whence: int = 0) -> int:
        return self._buffer.seek(offset, whence)

    def tell(self) -> int:
        return self._buffer.tell()

    def flush(self) -> None:
        self._buffer.flush()

    def close(self) -> None:
        super().close()  # flushes first, while the buffer is still open
        self._buffer.close()


def render_export(
    cohort: FakeCohort, *, props: bool, prop_keys: Sequence[str], gzip_level: int | None
) -> IO[bytes]:
    """The export file as Amplitude writes it: header, every field quoted. Blocking.

    Small files stay in memory; from 8 MiB on they move to an unnamed temp file, which
    ``FakeAmplitude.close()`` closes.
    """
    spool = cast(IO[bytes], _Spool())
    text = io.TextIOWrapper(spool, encoding="utf-8", newline="", write_through=False)
    writer = csv.writer(text, quoting=csv.QUOTE_ALL, lineterminator="\n")
    if cohort.group_type is not None:
        writer.writerow(["group_id", "group_name"])
        writer.writerows([f"\t{m.amplitude_id}", f"\t{m.user_id}"] for m in cohort.iter_members())
    else:
        columns = list(prop_keys) if prop_keys else list(cohort.property_names)
        columns = columns if props else []
        writer.writerow(["amplitude_id", "user_id", *columns])
        writer.writerows(
            [m.amplitude_id, m.user_id, *(m.properties.get(c, "") for c in columns)]
            for m in cohort.iter_members()
        )
    text.flush()
    text.detach()
    spool.seek(0)
    if gzip_level is None:
        return spool
    packed = cast(IO[bytes], _Spool())
    with gzip.GzipFile(fileobj=packed, mode="wb", compresslevel=gzip_level, mtime=0) as zipped:
        shutil.copyfileobj(spool, zipped, 1 << 20)
    spool.close()
    packed.seek(0)
    return packed
