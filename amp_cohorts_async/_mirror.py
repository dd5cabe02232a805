"""mirror_cohort: a cohort of one project kept mirrored into a cohort of another, by user id.

A layer above the client, like the command line: it drives two ``CohortsClient`` objects
through their public methods only (sync, diff, upload, apply) and keeps its state in
``state_dir``:

    state_dir/source/        the sync directory of the source cohort (``sync_cohorts``)
    state_dir/applied.csv    the source version the target cohort now holds (a hard link)
    state_dir/pending.csv    the version being applied, while an apply is under way
    state_dir/diff/          entering.csv / exiting.csv from applied.csv to pending.csv
    state_dir/mirror.json    target cohort id, what is applied, what is pending

Crash safety: every step is recorded before the next begins. A version is first linked as
``pending.csv`` and its diff written, then recorded as pending; ``apply_diff`` keeps its own
progress beside the diff; only when it is done does ``pending.csv`` become ``applied.csv``.
A run that finds a pending version finishes that apply first (``apply_diff`` sends only what
it had not applied, nothing if it was all applied before the crash), then goes on. Creation is
recorded as intended before the upload; a run that finds the intent and a target cohort of
that name adopts it and replaces its members with the full set (an upload to an existing
cohort replaces its contents), so a crash never leaves two targets nor a half-uploaded one.

An empty source cohort (or one whose members all lack a user id) creates no target: Amplitude
refuses an upload with no ids, and seeding one user to remove it afterwards can leave that user
behind. The run reports ``unchanged`` with no target cohort, and the first run that finds
members creates it. A source that becomes empty after its target exists is mirrored as such:
every member is removed (REMOVE needs no upload).
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import os
import pathlib
import secrets
from typing import TYPE_CHECKING, Any, Literal

import anyio
import attrs

from ._diff import MembershipDiff, diff_members
from ._exceptions import AmplitudeError, InvalidRequestError
from ._files import fsync_directory, make_directory
from ._members import iter_member_batches
from ._models import IdType, MembershipIdType
from ._validate import require_bool, require_id, require_text

if TYPE_CHECKING:  # the clients are driven through their public methods only
    from ._client import CohortsClient

__all__ = ("MirrorResult", "mirror_cohort")

logger = logging.getLogger("amp_cohorts_async")

STATE_NAME = "mirror.json"
MirrorAction = Literal["created", "updated", "unchanged"]


@attrs.frozen(kw_only=True)
class MirrorResult:
    """One mirror run: what it did to the target cohort.

    ``target_cohort_id`` is ``None`` only while the source has no member with a user id (no
    target is created for an empty source). ``entering`` / ``exiting``: members added to and
    removed from the target by this run (for ``created``: every member uploaded).
    ``skipped_no_user_id``: members of the source's current version without a user id, which
    cannot be mirrored by user id (counted, never dropped silently).
    """

    source_cohort_id: str
    target_cohort_id: str | None
    action: MirrorAction
    entering: int
    exiting: int
    skipped_no_user_id: int


# -- the state in state_dir ------------------------------------------------------------------

@attrs.define
class _State:
    source_cohort_id: str
    target_cohort_id: str | None = None
    applied_sha256: str | None = None
    applied_no_user_id: int = 0
    creating_name: str | None = None  # an upload was about to create a target of this name
    pending: dict[str, Any] | None = None  # sha256, no_user_id and the diff's counts


def _load_state(path: pathlib.Path, cohort_id: str) -> _State:
    try:
        data = json.loads(path.read_text("utf-8"))
    except FileNotFoundError:
        return _State(cohort_id)
    except (OSError, ValueError) as exc:
        raise InvalidRequestError(f"the mirror state {path} cannot be read ({exc}); move it "
                                  f"away to start the mirror afresh") from None
    if not isinstance(data, dict) or data.get("source_cohort_id") != cohort_id:
        raise InvalidRequestError(f"{path} mirrors another cohort than {cohort_id}; give "
                                  f"each mirror its own state_dir")
    try:
        return _State(**data)
    except TypeError:
        raise InvalidRequestError(f"the mirror state {path} is not one this version "
                                  f"writes; move it away to start afresh") from None


def _save_state(path: pathlib.Path, state: _State) -> None:
    temp = path.with_name(f".{path.name}.{secrets.token_hex(4)}.part")
    try:
        with open(temp, "x", encoding="utf-8") as file:
            json.dump(attrs.asdict(state), file, indent=1)
            file.flush()
            os.fsync(file.fileno())
        os.replace(temp, path)
        fsync_directory(path.parent)
    finally:
        temp.unlink(missing_ok=True)


def _link(source: pathlib.Path, target: pathlib.Path) -> None:
    """``target`` becomes ``source``'s content, atomically (a hard link, else a copy)."""
    temp = target.with_name(f".{target.name}.{secrets.token_hex(4)}.part")
    try:
        try:
            os.link(source, temp)
        except OSError:  # another file system, or no hard links: a copy
            with open(source, "rb") as reader, open(temp, "xb") as writer:
                while block := reader.read(1 << 20):
                    writer.write(block)
                writer.flush()
                os.fsync(writer.fileno())
        os.replace(temp, target)
    finally:
        temp.unlink(missing_ok=True)


def _sha256(path: pathlib.Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as file:
        while block := file.read(1 << 20):
            digest.update(block)
    return digest.hexdigest()


async def _user_ids(path: pathlib.Path) -> tuple[list[str], int]:
    """The non-empty user ids of an export, and how many members had none."""
    ids: list[str] = []
    missing = 0
    batches = iter_member_batches(path)
    try:
        async for batch in batches:
            if "user_id" not in batch.columns:
                raise InvalidRequestError(f"{path} has no user_id column: only a cohort of "
                                          f"users can be mirrored by user id")
            index = len(batch.columns) - 1 - batch.columns[::-1].index("user_id")
            for row in batch.rows:
                value = row[index] if len(row) > index else ""
                if value:
                    ids.append(value)
                else:
                    missing += 1
    finally:
        await batches.aclose()  # type: ignore[attr-defined]
    return ids, missing


# -- the run ---------------------------------------------------------------------------------

@attrs.define
class _Mirror:
    source: CohortsClient
    target: CohortsClient
    cohort_id: str
    state_dir: pathlib.Path
    app_id: int
    owner: str
    name: str
    published: bool
    state: _State = attrs.field(init=False)

    @property
    def state_path(self) -> pathlib.Path:
        return self.state_dir / STATE_NAME

    async def save(self) -> None:
        await anyio.to_thread.run_sync(_save_state, self.state_path, self.state)

    async def run(self) -> MirrorResult:
        self.state = await anyio.to_thread.run_sync(_load_state, self.state_path,
                                                    self.cohort_id)
        finished = await self._finish_pending()
        current = await self._sync()
        sha = await anyio.to_thread.run_sync(_sha256, current)
        if self.state.target_cohort_id is None:
            return await self._create(current, sha)
        if sha == self.state.applied_sha256:
            if finished is not None:
                return finished
            return self._result("unchanged", 0, 0, self.state.applied_no_user_id)
        return await self._update(current, sha)

    def _result(self, action: MirrorAction, entering: int, exiting: int,
                no_user_id: int) -> MirrorResult:
        return MirrorResult(source_cohort_id=self.cohort_id,
                            target_cohort_id=self.state.target_cohort_id, action=action,
                            entering=entering, exiting=exiting, skipped_no_user_id=no_user_id)

    async def _sync(self) -> pathlib.Path:
        report = await self.source.sync_cohorts([self.cohort_id], self.state_dir / "source")
        (entry,) = report.entries
        if entry.path is None:
            if entry.error is not None:
                raise entry.error
            raise AmplitudeError(f"cohort {self.cohort_id} could not be synced "
                                 f"({entry.action}); nothing was mirrored")
        if entry.error is not None:  # a copy is in place, but not the current version
            raise entry.error
        return entry.path

    async def _create(self, current: pathlib.Path, sha: str) -> MirrorResult:
        ids, no_user_id = await _user_ids(current)
        if not ids:
            logger.warning(
                "cohort %s has no member with a user id: no target cohort is created until "
                "it has one (Amplitude refuses an upload with no ids)", self.cohort_id)
            return self._result("unchanged", 0, 0, no_user_id)
        existing = await self._adopt()
        self.state.creating_name = self.name
        await self.save()
        uploaded = await self.target.upload_cohort(
            name=self.name, app_id=self.app_id, id_type=IdType.BY_USER_ID, ids=ids,
            owner=self.owner, published=self.published, existing_cohort_id=existing)
        await anyio.to_thread.run_sync(_link, current, self.state_dir / "applied.csv")
        self.state.target_cohort_id = uploaded.cohort_id
        self.state.applied_sha256 = sha
        self.state.applied_no_user_id = no_user_id
        self.state.creating_name = None
        await self.save()
        return self._result("created", len(set(ids)), 0, no_user_id)

    async def _adopt(self) -> str | None:
        """After a crash between an upload and its record: the target it created, if the
        target project shows exactly one cohort of that name."""
        if self.state.creating_name is None:
            return None
        named = [c.id for c in await self.target.list_cohorts()
                 if c.name == self.state.creating_name]
        return named[0] if len(named) == 1 else None

    async def _update(self, current: pathlib.Path, sha: str) -> MirrorResult:
        pending = self.state_dir / "pending.csv"
        await anyio.to_thread.run_sync(_link, current, pending)
        _ids, no_user_id = await _user_ids(pending)
        diff = await diff_members(self.state_dir / "applied.csv", pending,
                                  self.state_dir / "diff", key="user_id")
        self.state.pending = {"sha256": sha, "no_user_id": no_user_id,
                              "entering": diff.entering, "exiting": diff.exiting,
                              "unchanged": diff.unchanged, "no_key": diff.no_key}
        await self.save()
        return await self._apply_pending()

    async def _finish_pending(self) -> MirrorResult | None:
        """An apply a crash or a failure left under way: finish it before anything else."""
        if self.state.pending is None:
            return None
        return await self._apply_pending()

    async def _apply_pending(self) -> MirrorResult:
        pending = self.state.pending
        assert pending is not None
        assert self.state.target_cohort_id is not None
        diff_dir = self.state_dir / "diff"
        diff = MembershipDiff(
            entering_path=diff_dir / "entering.csv", exiting_path=diff_dir / "exiting.csv",
            entering=pending["entering"], exiting=pending["exiting"],
            unchanged=pending["unchanged"], no_key=pending["no_key"], key="user_id")
        await self.target.apply_diff(self.state.target_cohort_id, diff,
                                     id_type=MembershipIdType.BY_NAME)
        await anyio.to_thread.run_sync(os.replace, self.state_dir / "pending.csv",
                                       self.state_dir / "applied.csv")
        self.state.applied_sha256 = pending["sha256"]
        self.state.applied_no_user_id = pending["no_user_id"]
        self.state.pending = None
        await self.save()
        return self._result("updated", diff.entering, diff.exiting, pending["no_user_id"])


async def mirror_cohort(
    source: CohortsClient,
    target: CohortsClient,
    cohort_id: str,
    state_dir: str | os.PathLike[str],
    *,
    app_id: int,
    owner: str,
    name: str | None = None,
    published: bool = False,
) -> MirrorResult:
    """Keep a copy of the source project's cohort ``cohort_id`` in the target project.

    The first run syncs the cohort into ``state_dir`` and uploads its members, by user id, to
    a new cohort of ``target`` (``app_id``, ``owner``, ``name``: default ``"Mirror of
    <cohort_id>"``); later runs sync (no quota when the cohort is unchanged), diff by user id
    against the version last applied and ``apply_diff`` the change. The state (the target
    cohort id, what is applied, what is under way) lives in ``state_dir`` and survives a
    crash at any point without applying a change twice or skipping one.
    """
    cohort_id = require_id(cohort_id, "cohort_id")
    if isinstance(app_id, bool) or not isinstance(app_id, int) or app_id <= 0:
        raise InvalidRequestError(f"app_id must be a positive int, got {app_id!r}")
    owner = require_text(owner, "owner")
    name = f"Mirror of {cohort_id}" if name is None else require_text(name, "name")
    require_bool(published, "published")
    for client, what in ((source, "source"), (target, "target")):
        if not callable(getattr(client, "sync_cohorts", None)):
            raise InvalidRequestError(f"{what} must be a CohortsClient")
    directory = await make_directory(state_dir, "state_dir")
    with contextlib.suppress(FileExistsError):
        await anyio.Path(directory / "source").mkdir()
    mirror = _Mirror(source, target, cohort_id, directory, app_id, owner, name, published)
    return await mirror.run()
