"""Where the books are: `--db` values, the backend they name, and the package's public surface."""

from __future__ import annotations

from pathlib import Path

import pytest
from pydantic import ValidationError

import llamakit.router.ledger as ledger
from llamakit.cli import build_parser
from llamakit.router.ledger import backend_of, ledger_at, redacted, sqlite_path
from llamakit.router.ledger._postgres import PostgresLedger
from llamakit.router.ledger._sqlite import SqliteLedger
from llamakit.router.settings import RouterSettings, settings_from_args


def test_the_public_surface() -> None:
    assert ledger.__all__ == [
        "ARCHIVE_COLUMNS",
        "KEY_LIMIT_FIELDS",
        "KEY_PREFIX",
        "MAX_AMOUNT",
        "MAX_EVENTS_KEPT",
        "MAX_EVENT_BYTES",
        "MAX_KEY_NAME_LEN",
        "MAX_PAGE",
        "UNATTRIBUTED",
        "Account",
        "AccountActivity",
        "AccountExists",
        "AccountState",
        "ApiKey",
        "ArchiveReport",
        "Audit",
        "Books",
        "CacheSavings",
        "Delivered",
        "Discrepancy",
        "Event",
        "EventSummary",
        "Hold",
        "HoldClosed",
        "InsufficientFunds",
        "KeyLimits",
        "KeyUse",
        "Ledger",
        "LedgerError",
        "LedgerUnavailable",
        "PeriodTotals",
        "Remembered",
        "Settlement",
        "SpendCapExceeded",
        "Totals",
        "UnknownAccount",
        "UnknownKey",
        "UsageRecord",
        "backend_of",
        "hash_key",
        "key_name",
        "latest",
        "ledger_at",
        "redacted",
        "sqlite_path",
    ]
    assert all(hasattr(ledger, name) for name in ledger.__all__)


@pytest.mark.parametrize(
    ("db", "backend", "path"),
    [
        ("llamakit.db", "sqlite", "llamakit.db"),
        ("/var/lib/llamakit/ledger.db", "sqlite", "/var/lib/llamakit/ledger.db"),
        ("sqlite:///ledger.db", "sqlite", "ledger.db"),
        ("sqlite:////var/lib/ledger.db", "sqlite", "/var/lib/ledger.db"),
        ("sqlite://", "sqlite", ":memory:"),
        (":memory:", "sqlite", ":memory:"),
        ("postgresql://u:p@db:5432/books", "postgres", None),
        ("postgres://u@db/books", "postgres", None),
    ],
)
def test_a_db_value_names_its_backend(db: str, backend: str, path: str | None) -> None:
    assert backend_of(db) == backend
    opened = ledger_at(db)
    assert isinstance(opened, SqliteLedger if backend == "sqlite" else PostgresLedger)
    if path is not None:
        assert sqlite_path(db) == path


def test_other_urls_are_refused_with_what_to_give() -> None:
    with pytest.raises(ValueError, match="postgresql://user:password@host:port/dbname"):
        backend_of("mysql://db/books")
    with pytest.raises(ValidationError, match="SQLite file"):
        RouterSettings(db="mysql://db/books")


def test_passwords_are_not_shown() -> None:
    url = "postgresql://llamakit:s3cret@db.internal:5433/books?search_path=x"
    assert redacted(url) == "postgresql://llamakit:***@db.internal:5433/books?search_path=x"
    assert "s3cret" not in ledger_at(url).url
    assert redacted("postgresql://llamakit@db/books") == "postgresql://llamakit@db/books"
    assert redacted("ledger.db") == "ledger.db"


def test_db_from_flags_environment_and_paths(tmp_path: Path) -> None:
    assert RouterSettings().db == "llamakit.db"  # the embedded default, unchanged
    assert RouterSettings(db=tmp_path / "ledger.db").db == str(tmp_path / "ledger.db")
    url = "postgresql://llamakit@127.0.0.1:5432/books"
    assert settings_from_args(["--db", url], env={}).db == url
    assert settings_from_args([], env={"LLAMAKIT_DB": url}).db == url


def test_llamakit_up_takes_db() -> None:
    url = "postgresql://llamakit@127.0.0.1:5432/books"
    assert build_parser().parse_args(["up", "--db", url]).db == url
    assert build_parser().parse_args(["up"]).db is None  # ledger.db in the state directory
