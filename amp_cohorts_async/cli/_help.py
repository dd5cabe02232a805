"""Help for every subcommand and option of amp-cohorts: a line each, and an example per command.

Kept apart from the parser so that adding a command means adding its words here too; a test
holds every subcommand to an example and every option to a help line.
"""

from __future__ import annotations

import argparse

__all__ = ("EXAMPLES", "explain")

EXAMPLES: dict[str, str] = {
    "list": "amp-cohorts list\n  amp-cohorts list --json | jq -r '.[].id'",
    "usage": "amp-cohorts usage",
    "download": "amp-cohorts download abc123 def456 -o exports/\n"
                "  amp-cohorts download --all -o exports/ --resume\n"
                "  amp-cohorts download abc123 --prop-key plan --json 2> progress.jsonl",
    "upload": "amp-cohorts upload users.csv --column user_id --name 'Trialists' "
              "--owner me@corp.example --app-id 123456",
    "membership": "amp-cohorts membership add abc123 new-users.txt",
    "request": "amp-cohorts request abc123 --props",
    "status": "amp-cohorts status 0123456789abcdef01234567",
    "fetch": "amp-cohorts fetch 0123456789abcdef01234567 -o abc123.csv",
    "demo": "amp-cohorts demo -o /tmp/amp-demo",
    "sync": "amp-cohorts sync exports/ --all --max-requests 20\n"
            "  amp-cohorts sync exports/ abc123 def456 --dry-run --every 1d\n"
            "  amp-cohorts sync exports/ abc123 --diff   # exports/abc123.diff/entering.csv, "
            "exiting.csv",
    "mirror": "amp-cohorts mirror abc123 mirror-state/ --app-id 654321 --owner me@corp.example"
              "\n  (with AMPLITUDE_TARGET_API_KEY and AMPLITUDE_TARGET_SECRET_KEY set)",
    "diff": "amp-cohorts diff exports/abc123.1.csv exports/abc123.csv changes/ --key user_id",
}

# Help for options that the parser leaves without, by (command, dest) or by dest alone.
OPTION_HELP: dict[tuple[str, str] | str, str] = {
    "region": "the project's data region: us (amplitude.com) or eu "
              "(analytics.eu.amplitude.com); default: us",
    "sync_info": "include each cohort's sync targets (includeSyncInfo)",
    "cohort_ids": "ids of the cohorts to download (see `amp-cohorts list`)",
    ("sync", "cohort_ids"): "ids of the cohorts to keep fresh copies of (see "
                            "`amp-cohorts list`)",
    ("upload", "name"): "name of the new cohort",
    ("upload", "app_id"): "the Amplitude project (app) id the cohort belongs to",
    ("upload", "id_type"): "what the ids are: BY_USER_ID (user ids) or BY_AMP_ID "
                           "(Amplitude ids); default: BY_USER_ID",
    ("upload", "published"): "make the cohort visible to the whole organisation",
    ("mirror", "published"): "make the target cohort visible to the whole organisation",
    ("mirror", "target_region"): "the target project's data region: us or eu (default: us)",
    ("membership", "operation"): "add the ids to the cohort, or remove them",
    "cohort_id": "the cohort's id (see `amp-cohorts list`)",
    ("membership", "id_type"): "what the ids are: BY_NAME (user ids) or BY_ID (Amplitude ids); "
                               "default: BY_NAME",
    "count_group": "the group type the ids belong to (group cohorts)",
    ("request", "props"): "export user properties too",
    ("request", "prop_key"): "a user property to export (repeatable; implies --props)",
    "request_id": "the request id `amp-cohorts request` printed",
    ("demo", "output"): "directory for the downloaded files (default: amp-cohorts-demo)",
    ("demo", "debug"): "show tracebacks",
}


def explain(parser: argparse.ArgumentParser) -> None:
    """Give every subcommand its example (as an epilog) and every option its help line."""
    for action in parser._actions:
        if not isinstance(action, argparse._SubParsersAction):
            continue
        for choice in action._choices_actions:  # the one-line help of each command
            command = action.choices[choice.dest]
            if command.description is None:
                command.description = choice.help
        for name, command in action.choices.items():
            if name in EXAMPLES:
                command.epilog = "example:\n  " + EXAMPLES[name]
                command.formatter_class = argparse.RawDescriptionHelpFormatter
            for option in command._actions:
                if option.help is None:
                    option.help = OPTION_HELP.get((name, option.dest), OPTION_HELP.get(
                        option.dest))
