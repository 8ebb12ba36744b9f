"""`llamakit books` (the books, `--audit` to prove them by a full scan) and `llamakit ledger archive` (old records
out of the ledger, into a file the operator keeps).

`books` asks the router, or, with `--db`, reads the ledger itself (a stopped router's, or a PostgreSQL one).
`ledger archive` works on the ledger's database directly, in short transactions, with the router running or not
(see docs/operating.md#archives).
"""

from __future__ import annotations

import argparse
import asyncio
import datetime as dt
import json
import os
import sys
from dataclasses import asdict
from pathlib import Path
from typing import Any

from llamakit.cli.admin_client import admin_client, show

__all__ = ["add_ledger_commands"]


def add_ledger_commands(sub: Any, state_dir: Path) -> None:
    books = sub.add_parser(
        "books", help="the books (deposits = balances + open holds + charges); --audit proves them by a full scan"
    )
    books.add_argument("--audit", action="store_true", help="count every total again from the history, now")
    books.add_argument("--db", help="read this ledger itself instead of asking the router (its URL or SQLite file)")
    books.set_defaults(func=cmd_books)

    ledger = sub.add_parser("ledger", help="the ledger's own upkeep")
    what = ledger.add_subparsers(dest="ledger_command", required=True)
    archive = what.add_parser(
        "archive",
        help="move usage records (with their holds, charges, remembered answers) older than a date to a file",
        description="Move every usage record created before --before, with the hold it closed, its charge and its "
        "remembered answer, out of the ledger into a gzip-compressed JSON Lines file (pandas.read_json(path, "
        "lines=True) reads it). The books, each account's and each node's totals stay exact, and the audit still "
        "balances. Open holds are never archived.",
    )
    archive.add_argument("--before", required=True, type=_date, help="a UTC date (2026-11-01) or ISO time")
    default_db = os.environ.get("LLAMAKIT_DB") or str(state_dir / "ledger.db")
    archive.add_argument("--db", default=default_db, help=f"the ledger (default: $LLAMAKIT_DB or {default_db})")
    archive.add_argument("--out", type=Path, help="the archive file (default: ledger-before-DATE.jsonl.gz here)")
    archive.set_defaults(func=cmd_archive)


def _date(text: str) -> float:
    """`--before`: a date (midnight UTC) or an ISO time (UTC unless zoned), as epoch seconds."""
    try:
        moment = dt.datetime.fromisoformat(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a date such as 2026-11-01 or an ISO time, got {text!r}") from None
    if moment.tzinfo is None:
        moment = moment.replace(tzinfo=dt.UTC)
    return moment.timestamp()


def cmd_books(args: argparse.Namespace) -> int:
    if args.db:
        return asyncio.run(_books_of(args.db, audit=args.audit))
    with admin_client(args) as admin:
        resp = admin.post("/admin/books/audit", timeout=None) if args.audit else admin.get("/admin/books")
        code = show(resp)
        audit = resp.json().get("audit") if resp.is_success else None
    return 1 if code or (args.audit and isinstance(audit, dict) and audit.get("ok") is False) else 0


async def _books_of(db: str, *, audit: bool) -> int:
    from llamakit.router.ledger import LedgerError, ledger_at

    try:
        async with ledger_at(db) as ledger:
            books = await ledger.books()
            body: dict[str, Any] = {**asdict(books), "balanced": books.balanced}
            if audit:
                found = await ledger.audit()
                body["audit"] = found.to_dict()
    except LedgerError as exc:
        raise SystemExit(f"llamakit books: {exc}") from None
    print(json.dumps(body, indent=2))
    return 0 if books.balanced and body.get("audit", {}).get("ok", True) else 1


def cmd_archive(args: argparse.Namespace) -> int:
    from llamakit.router.ledger import LedgerError, ledger_at, redacted

    day = dt.datetime.fromtimestamp(args.before, dt.UTC).strftime("%Y-%m-%d")
    out: Path = args.out or Path(f"ledger-before-{day}.jsonl.gz")

    async def run() -> dict[str, Any]:
        async with ledger_at(args.db) as ledger:
            report = await ledger.archive(args.before, out)
            audit = await ledger.audit()
        return {**asdict(report), "ledger": redacted(args.db), "audit": audit.to_dict()}

    try:
        body = asyncio.run(run())
    except (LedgerError, ValueError, OSError) as exc:
        print(f"llamakit ledger archive: {exc}", file=sys.stderr)
        return 1
    print(json.dumps(body, indent=2))
    return 0 if body["audit"]["ok"] else 1
