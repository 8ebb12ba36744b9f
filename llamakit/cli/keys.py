"""`llamakit keys …`: the operator's commands for API keys, their names and their limits.

    llamakit keys create ACCOUNT [--name "ci runner"] [--spend-cap N] [--rpm N] [--expires +30d] [--models a,b] …
    llamakit keys list ACCOUNT [--json]
    llamakit keys show KEY
    llamakit keys rename KEY NAME            ('' removes the name)
    llamakit keys limit KEY [--tpm 20000] [--clear rpm_limit] [--name N | --clear name] …
    llamakit keys revoke KEY

KEY is a key's 8-character prefix (as `keys list` shows it) or the whole key; a key's name is only a label to
tell it by. Money is in credits.
"""

from __future__ import annotations

import argparse
import datetime as dt
import math
import re
from typing import Any

from llamakit.cli.admin_client import admin_client, segment, show, table, when

__all__ = ["add_key_commands", "add_limit_flags", "limits_from_args"]

# flag, the limit it sets (a field of the router's KeyLimits), help
_INT_LIMITS = [
    ("--spend-cap", "spend_cap", "credits the key may spend in all"),
    ("--spend-cap-day", "spend_cap_day", "credits the key may spend per UTC day"),
    ("--spend-cap-month", "spend_cap_month", "credits the key may spend per UTC calendar month"),
    ("--rpm", "rpm_limit", "requests per minute"),
    ("--tpm", "tpm_limit", "tokens (prompt + completion) per minute"),
    ("--max-parallel", "max_parallel_requests", "requests in flight at once"),
]
# What --clear takes: each limit by its flag's name (rpm, spend-cap-day, expires) or the router's (rpm_limit …).
_CLEARABLE = {
    **{name: name for _, name, _ in _INT_LIMITS},
    **{flag.removeprefix("--"): name for flag, name, _ in _INT_LIMITS},
    "expires": "expires_at",
    "expires_at": "expires_at",
    "models": "models",
}
_NAME_HELP = "a label to tell the key by, such as 'ci runner' (up to 100 characters, one line)"
_DURATION = re.compile(r"^\+(\d+)([smhd])$")
_UNITS = {"s": 1, "m": 60, "h": 3600, "d": 86400}


def add_limit_flags(parser: argparse.ArgumentParser) -> None:
    """The flags of every limit a key can have."""
    for flag, _, help_text in _INT_LIMITS:
        parser.add_argument(flag, type=int, metavar="N", help=help_text)
    parser.add_argument("--expires", metavar="WHEN", help="expiry: an ISO 8601 date or time (UTC unless zoned), "
                        "epoch seconds, or from now: +90m, +12h, +30d")  # fmt: skip
    parser.add_argument("--models", metavar="A,B", help="the only models the key may use, comma-separated")


def limits_from_args(args: argparse.Namespace) -> dict[str, Any]:
    """The limits the flags set (only those given), as the router's `limits` object."""
    limits: dict[str, Any] = {}
    for _, name, _ in _INT_LIMITS:
        if getattr(args, name_of(name)) is not None:
            limits[name] = getattr(args, name_of(name))
    if args.expires is not None:
        limits["expires_at"] = expiry(args.expires)
    if args.models is not None:
        limits["models"] = [m.strip() for m in args.models.split(",") if m.strip()]
    return limits


def name_of(limit: str) -> str:
    """The argparse destination of a limit's flag."""
    flag = next(f for f, name, _ in _INT_LIMITS if name == limit)
    return flag.removeprefix("--").replace("-", "_")


def expiry(text: str, now: dt.datetime | None = None) -> float:
    """Epoch seconds from '+30d' (from now), epoch seconds, or ISO 8601 (UTC unless zoned); SystemExit if none."""
    now = now or dt.datetime.now(dt.UTC)
    duration = _DURATION.match(text.strip())
    if duration:
        return (now + dt.timedelta(seconds=int(duration[1]) * _UNITS[duration[2]])).timestamp()
    try:
        epoch = float(text)
    except ValueError:
        pass
    else:
        if not math.isfinite(epoch):
            raise SystemExit(f"--expires: {text!r} is not a time")
        return epoch
    try:
        moment = dt.datetime.fromisoformat(text)
    except ValueError:
        raise SystemExit(f"--expires: {text!r} is not +N[smhd], epoch seconds or an ISO 8601 date or time") from None
    return (moment if moment.tzinfo else moment.replace(tzinfo=dt.UTC)).timestamp()


def cmd_keys_create(args: argparse.Namespace) -> int:
    body: dict[str, Any] = {"limits": limits_from_args(args)}
    if args.name is not None:
        body["name"] = args.name
    with admin_client(args) as admin:
        return show(admin.post(f"/admin/accounts/{segment(args.account)}/keys", json=body))


def cmd_keys_list(args: argparse.Namespace) -> int:
    with admin_client(args) as admin:
        resp = admin.get(f"/admin/accounts/{segment(args.account)}/keys")
        if not resp.is_success or args.json:
            return show(resp)
        rows = [
            [k["prefix"] + "…", k.get("name") or "", when(k["created"]), _state(k), _limits_text(k["limits"]),
             f"{k['spend']['total']} / {k['spend']['today']} / {k['spend']['this_month']}", k["spend"]["held"]]
            for k in resp.json()["data"]
        ]  # fmt: skip
        table(["key", "name", "created", "state", "limits", "spent all/today/month", "held"], rows)
        return 0


def cmd_keys_show(args: argparse.Namespace) -> int:
    with admin_client(args) as admin:
        return show(admin.get(f"/admin/keys/{segment(args.key)}"))


def cmd_keys_rename(args: argparse.Namespace) -> int:
    with admin_client(args) as admin:
        return show(admin.patch(f"/admin/keys/{segment(args.key)}", json={"name": args.name}))


def cmd_keys_limit(args: argparse.Namespace) -> int:
    changes: dict[str, Any] = limits_from_args(args)
    body: dict[str, Any] = {}
    for name in args.clear or ():
        if name == "name":
            body["name"] = None
        else:
            changes[_CLEARABLE[name]] = None
    if args.name is not None:
        if "name" in body:
            raise SystemExit("llamakit keys limit: give --name or --clear name, not both")
        body["name"] = args.name
    if changes:
        body["limits"] = changes
    if not body:
        raise SystemExit("llamakit keys limit: give a limit to set (--rpm 60 …), one to --clear, or a --name")
    with admin_client(args) as admin:
        return show(admin.patch(f"/admin/keys/{segment(args.key)}", json=body))


def cmd_keys_revoke(args: argparse.Namespace) -> int:
    with admin_client(args) as admin:
        return show(admin.delete(f"/admin/keys/{segment(args.key)}"))


def _state(key: dict[str, Any]) -> str:
    if not key["active"]:
        return f"revoked {when(key['revoked'])}"
    return "expired" if key["expired"] else "active"


def _limits_text(limits: dict[str, Any]) -> str:
    shown = []
    for name, value in limits.items():
        if value is None:
            continue
        if name == "expires_at":
            value = when(value)
        elif name == "models":
            value = ",".join(value)
        shown.append(f"{name}={value}")
    return " ".join(shown) or "none"


def add_key_commands(sub: Any) -> None:
    """`keys create|list|show|rename|limit|revoke` under the `llamakit` parser's subcommands."""
    keys = sub.add_parser("keys", help="API keys, their names and limits").add_subparsers(dest="keys_command",
                                                                                         required=True)  # fmt: skip
    create = keys.add_parser("create", help="make a key for an account, with a name and limits; prints it (shown "
                             "once)")  # fmt: skip
    create.add_argument("account")
    create.add_argument("--name", metavar="NAME", help=_NAME_HELP)
    add_limit_flags(create)
    create.set_defaults(func=cmd_keys_create)
    listing = keys.add_parser("list", help="an account's keys by prefix: name, state, limits, spend")
    listing.add_argument("account")
    listing.add_argument("--json", action="store_true", help="print the router's JSON")
    listing.set_defaults(func=cmd_keys_list)
    shown = keys.add_parser("show", help="one key: name, limits, spend so far, what is left under each cap")
    shown.add_argument("key", help="the key's prefix or the whole key")
    shown.set_defaults(func=cmd_keys_show)
    rename = keys.add_parser("rename", help="give a key a new name ('' removes it)")
    rename.add_argument("key", help="the key's prefix or the whole key")
    rename.add_argument("name", help=_NAME_HELP)
    rename.set_defaults(func=cmd_keys_rename)
    limit = keys.add_parser("limit", help="change a key's limits or name (the others stay)")
    limit.add_argument("key", help="the key's prefix or the whole key")
    limit.add_argument("--name", metavar="NAME", help=_NAME_HELP)
    add_limit_flags(limit)
    limit.add_argument("--clear", action="append", metavar="LIMIT", choices=sorted([*_CLEARABLE, "name"]),
                       help="remove this limit (repeatable), by its flag's name or the router's: rpm or rpm_limit, "
                            "spend-cap, expires, models …; or the key's name")  # fmt: skip
    limit.set_defaults(func=cmd_keys_limit)
    revoke = keys.add_parser("revoke", help="revoke the key with this prefix (or the whole key); at once")
    revoke.add_argument("key", help="the key's prefix or the whole key")
    revoke.set_defaults(func=cmd_keys_revoke)
