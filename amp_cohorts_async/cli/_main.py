"""amp-cohorts: Amplitude behavioral cohorts from the command line.

Credentials come from the environment: AMPLITUDE_API_KEY and AMPLITUDE_SECRET_KEY
(AMPLITUDE_BASE_URL and AMPLITUDE_LIMITS_URL are read too). Also: python -m amp_cohorts_async.

Every failure prints one line and exits non-zero: 2 bad input (arguments, files that cannot
be read or written, a full disk), 3 authentication, 4 not found, 5 quota or limits, 6 an
upload in which no id matched, 1 any other failure, 130 interrupted, 141 the reader of the
output went away (as with `| head`); add --debug for a traceback. With --json, a failure is a
JSON object on stderr: {"error": {"type", "status", "error_type", "message"}}. Ctrl-C stops
cleanly: no partial file is left, and download --resume continues the batch without spending
quota again on what was done.
"""

from __future__ import annotations

import argparse
import asyncio
import io
import json
import logging
import os
import pathlib
import sys
import urllib.parse
from collections.abc import Sequence
from typing import IO

import amp_cohorts_async

from .._client import CohortsClient
from .._config import REGIONS, DownloadPolicy, Limits, PollPolicy, is_loopback
from .._exceptions import (
    AmplitudeError,
    AuthenticationError,
    DiskError,
    InvalidRequestError,
    NotFoundError,
    QuotaExceededError,
    RateLimitError,
)
from .._logs import ENV_VAR, log_to_stream
from .._models import IdType, MembershipIdType
from ._commands import COMMANDS, limits_backend, run_diff
from ._demo import run_demo
from ._help import explain
from ._output import error_object

__all__ = ("build_parser", "main")

EXIT_CODES: tuple[tuple[type[AmplitudeError], int], ...] = (
    (InvalidRequestError, 2),
    (DiskError, 2),  # a file that cannot be written: a full disk, a read-only directory
    (AuthenticationError, 3),
    (NotFoundError, 4),
    (QuotaExceededError, 5),
    (RateLimitError, 5),
)


OUTPUT_CLOSED = 141  # 128 + SIGPIPE, as a shell reports a command whose reader went away


def build_parser() -> argparse.ArgumentParser:
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument("--region", choices=sorted(REGIONS), default="us")
    common.add_argument("--base-url", metavar="URL",
                        help="Amplitude origin override (proxies, the emulator)")
    common.add_argument("--limits-url", metavar="URL",
                        help="share the account's limits with other processes and hosts "
                             "through this Redis (redis://host:6379/0); default: "
                             "AMPLITUDE_LIMITS_URL, else a file in the user's cache shared "
                             "by the runs on this host")
    common.add_argument("--time-scale", type=float, metavar="FACTOR",
                        help="run Amplitude's rate windows FACTOR times as long (0.05: 4 cohort "
                             "requests per 3 s instead of per minute), to follow an emulator "
                             "started with the same --time-scale; loopback --base-url only")
    common.add_argument("--json", action="store_true", help="machine-readable output")
    common.add_argument("--debug", action="store_true", help="show tracebacks")
    common.add_argument("--log-format", choices=["human", "json"], default="human",
                        help="json: the library's log lines on stderr, one JSON object each "
                             "with its fields (cohort_id, request_id, bytes, seconds, ...), "
                             "at INFO (DEBUG with AMP_COHORTS_LOG=debug); human (default): "
                             "the usual output only, log lines with AMP_COHORTS_LOG=info|debug")

    parser = argparse.ArgumentParser(prog="amp-cohorts", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--version", action="version",
                        version=f"amp-cohorts {amp_cohorts_async.__version__}",
                        help="print the package version and exit")
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("list", parents=[common], help="list cohorts")
    p.add_argument("--sync-info", action="store_true")
    sub.add_parser("usage", parents=[common], help="this month's cohort-request usage")

    p = sub.add_parser("download", parents=[common], help="request, poll and download cohorts")
    p.add_argument("cohort_ids", nargs="*", metavar="COHORT_ID")
    p.add_argument("--all", action="store_true", help="every cohort `amp-cohorts list` shows")
    p.add_argument("-o", "--output", default=".", metavar="DIR",
                   help="directory for the files, created if missing (default: current)")
    p.add_argument("--props", action="store_true", help="include user properties")
    p.add_argument("--prop-key", action="append", default=[], metavar="KEY",
                   help="a user property to include (repeatable; implies --props)")
    p.add_argument("--resume", action="store_true",
                   help="continue the previous batch in this directory: keep its verified "
                        "files, reuse its export requests (younger than 6 days), request only "
                        "what failed or never started")
    p.add_argument("--poll-interval", type=float, default=2.0, metavar="SECONDS",
                   help="first wait before polling an export's status (grows to 30 s)")

    p = sub.add_parser("sync", parents=[common],
                       help="keep copies of cohorts fresh: export only what changed")
    p.add_argument("directory", metavar="DIR", help="where the copies live (created if missing)")
    p.add_argument("cohort_ids", nargs="*", metavar="COHORT_ID")
    p.add_argument("--all", action="store_true",
                   help="every cohort the list shows that is not archived")
    p.add_argument("--props", action="store_true", help="include user properties")
    p.add_argument("--prop-key", action="append", default=[], metavar="KEY",
                   help="a user property to include (repeatable; implies --props)")
    p.add_argument("--max-requests", type=int, metavar="N",
                   help="spend at most N cohort requests (default: the month's quota left)")
    p.add_argument("--keep-versions", type=int, default=2, metavar="N",
                   help="versions kept per cohort, the current one included")
    p.add_argument("--dry-run", action="store_true",
                   help="request nothing; show what a run would do and spend")
    p.add_argument("--every", choices=["1d", "1h"],
                   help="with --dry-run: project the month's cost of syncing this often")
    p.add_argument("--diff", action="store_true",
                   help="write who entered and who left beside each downloaded copy "
                        "(DIR/ID.diff/entering.csv, exiting.csv) and count them in the table")
    p.add_argument("--poll-interval", type=float, default=2.0, metavar="SECONDS",
                   help="first wait before polling an export's status (grows to 30 s)")

    def ids_source(p: argparse.ArgumentParser) -> None:
        p.add_argument("file", metavar="FILE", help="ids one per line, a CSV, or - for stdin")
        p.add_argument("--column", help="take ids from this CSV column")

    p = sub.add_parser("upload", parents=[common], help="create or replace a cohort from ids")
    ids_source(p)
    p.add_argument("--name", required=True)
    p.add_argument("--owner", required=True, help="login email of the owner")
    p.add_argument("--app-id", type=int, required=True)
    p.add_argument("--id-type", choices=[t.value for t in IdType], default="BY_USER_ID")
    p.add_argument("--existing", metavar="COHORT_ID", help="replace this cohort's members")
    p.add_argument("--group", metavar="CG", help="group type (count group) of the ids")
    p.add_argument("--published", action="store_true")
    p.add_argument("--dry-run", action="store_true", help="validate only (skip_save)")
    p.add_argument("--allow-empty", action="store_true",
                   help="succeed even when no id matched a known user")

    p = sub.add_parser("membership", parents=[common], help="add or remove ids in a cohort")
    p.add_argument("operation", choices=["add", "remove"])
    p.add_argument("cohort_id", metavar="COHORT_ID")
    ids_source(p)
    p.add_argument("--id-type", choices=[t.value for t in MembershipIdType], default="BY_NAME")
    p.add_argument("--count-group")

    p = sub.add_parser("request", parents=[common], help="start one export (costs quota)")
    p.add_argument("cohort_id", metavar="COHORT_ID")
    p.add_argument("--props", action="store_true")
    p.add_argument("--prop-key", action="append", default=[], metavar="KEY")
    p = sub.add_parser("status", parents=[common], help="status of an export request")
    p.add_argument("request_id", metavar="REQUEST_ID")
    p = sub.add_parser("fetch", parents=[common], help="download the file of a request")
    p.add_argument("request_id", metavar="REQUEST_ID")
    p.add_argument("-o", "--output", required=True, metavar="FILE",
                   help="where to write the export")

    p = sub.add_parser("mirror", parents=[common],
                       help="keep this project's cohort mirrored into another project's, by "
                            "user id (target keys: AMPLITUDE_TARGET_API_KEY / "
                            "AMPLITUDE_TARGET_SECRET_KEY)")
    p.add_argument("cohort_id", metavar="COHORT_ID")
    p.add_argument("state_dir", metavar="STATE_DIR", help="where the mirror keeps its state")
    p.add_argument("--app-id", type=int, required=True, help="the target project's app id")
    p.add_argument("--owner", required=True, help="the target cohort's owner (login email)")
    p.add_argument("--name", help="the target cohort's name (default: Mirror of COHORT_ID)")
    p.add_argument("--published", action="store_true")
    p.add_argument("--poll-interval", type=float, default=2.0, metavar="SECONDS",
                   help="first wait before polling the source's export")
    p.add_argument("--target-region", choices=sorted(REGIONS), default="us")
    p.add_argument("--target-base-url",
                   help="the target's origin (default: AMPLITUDE_TARGET_BASE_URL)")

    p = sub.add_parser("diff", help="who entered and who left between two exports (files "
                                    "only: no credentials, no request)")
    p.add_argument("old", metavar="OLD", help="the earlier export (CSV, gzip or not)")
    p.add_argument("new", metavar="NEW", help="the later export")
    p.add_argument("out_dir", metavar="OUT_DIR", help="where entering.csv and exiting.csv go")
    p.add_argument("--key", default="amplitude_id",
                   help="the column that identifies a member: amplitude_id, user_id, or "
                        "group_id / group_name for a group cohort")
    p.add_argument("--json", action="store_true", help="machine-readable output")
    p.add_argument("--debug", action="store_true", help="show tracebacks")

    p = sub.add_parser("demo", help="run the downloader against the built-in emulator")
    p.add_argument("-o", "--output", default="amp-cohorts-demo", metavar="DIR")
    p.add_argument("--debug", action="store_true")
    explain(parser)
    return parser


def _exit_code(error: AmplitudeError) -> int:
    for cls, code in EXIT_CODES:
        if isinstance(error, cls):
            return code
    return 1


def time_scaled_limits(factor: float | None, base_url: str | None) -> Limits | None:
    """Amplitude's limits on a faster clock, for an emulator (never for Amplitude itself,
    which would answer the faster pace with 429s)."""
    if factor is None:
        return None
    origin = base_url or os.environ.get("AMPLITUDE_BASE_URL") or ""
    if not is_loopback(urllib.parse.urlsplit(origin).hostname or ""):
        raise InvalidRequestError("--time-scale is for an emulator on this machine: give a "
                                  "loopback --base-url (http://127.0.0.1:PORT)")
    return Limits().time_scaled(factor)


def check_credentials() -> None:
    missing = [name for name in ("AMPLITUDE_API_KEY", "AMPLITUDE_SECRET_KEY")
               if not os.environ.get(name, "").strip()]
    if missing:
        raise InvalidRequestError(f"set {' and '.join(missing)} in the environment (the "
                                  "project's API key and secret key)")


async def run(args: argparse.Namespace, out: IO[str]) -> int:
    if args.command == "demo":
        return await run_demo(pathlib.Path(args.output), out)
    if args.command == "diff":
        return await run_diff(args, out)
    check_credentials()
    if args.log_format == "json":
        debug = os.environ.get(ENV_VAR, "").strip().lower() == "debug"
        log_to_stream(logging.DEBUG if debug else logging.INFO, sys.stderr, as_json=True)
    poll = PollPolicy(initial_interval=getattr(args, "poll_interval", 2.0))
    backend = limits_backend(args.limits_url)
    try:
        # The summary shows member counts, counted as the files are written.
        async with CohortsClient(region=args.region, base_url=args.base_url, poll=poll,
                                 limits=time_scaled_limits(args.time_scale, args.base_url),
                                 limits_backend=backend,
                                 download=DownloadPolicy(count_members=True)) as client:
            return await COMMANDS[args.command](client, args, out)
    finally:
        await backend.aclose()


def main(argv: Sequence[str] | None = None) -> None:
    args = build_parser().parse_args(argv)
    out = sys.stdout
    if isinstance(out, io.TextIOWrapper):
        # A cohort name the terminal's encoding lacks, or a path holding a byte that was not
        # UTF-8, is shown escaped rather than failing a command that has done its work.
        out.reconfigure(errors="backslashreplace")
    try:
        code = asyncio.run(run(args, out))
    except KeyboardInterrupt:
        print("interrupted: no partial file was left; run the same download with --resume "
              "to continue without spending quota again", file=sys.stderr)
        code = 130
    except BrokenPipeError:
        code = _output_closed()
    except AmplitudeError as error:
        if args.debug:
            raise
        if getattr(args, "json", False):
            print(json.dumps({"error": error_object(error)}), file=sys.stderr)
        else:
            print(f"error: {error}", file=sys.stderr)
        code = _exit_code(error)
    except ModuleNotFoundError as error:
        if error.name != "rich" or args.debug:
            raise
        print("error: the command line needs rich: pip install 'amp-cohorts-async[cli]'",
              file=sys.stderr)
        code = 2
    except OSError as error:  # a local file or directory: the output, an ids file
        if args.debug:
            raise
        where = f": {error.filename}" if error.filename else ""
        print(f"error: {error.strerror or error}{where}", file=sys.stderr)
        code = 2
    except Exception as error:  # a bug of ours: still one line, and how to see more
        if args.debug:
            raise
        print(f"error: unexpected {type(error).__name__}: {error} "
              "(run again with --debug for a traceback)", file=sys.stderr)
        code = 1
    try:
        sys.stdout.flush()
    except BrokenPipeError:
        code = _output_closed()
    raise SystemExit(code)


def _output_closed() -> int:
    """The reader of stdout left (``amp-cohorts list | head -1``): not an error of ours.

    stdout is pointed at /dev/null so the interpreter's last flush is quiet too; the exit
    code is the shell's for a command ended by SIGPIPE.
    """
    devnull = os.open(os.devnull, os.O_WRONLY)
    os.dup2(devnull, sys.stdout.fileno())
    os.close(devnull)
    return OUTPUT_CLOSED
