"""The `llamakit` command: `up` runs a whole local herd; the others are the operator's admin calls."""

from __future__ import annotations

import argparse
import csv
import os
import shlex
import shutil
import sys
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

import httpx

from llamakit.cli.admin_client import admin_client, segment, show, table, when
from llamakit.cli.keys import add_key_commands, add_limit_flags, limits_from_args
from llamakit.cli.ledger import add_ledger_commands
from llamakit.logs import LOG_FORMATS
from llamakit.profile import profile_path

if TYPE_CHECKING:
    from llamakit.cli.up import Launcher

__all__ = ["main"]


def _state_dir() -> Path:
    data = Path(os.environ.get("XDG_DATA_HOME") or Path.home() / ".local" / "share")
    return Path(os.environ.get("LLAMAKIT_STATE_DIR") or data / "llamakit")


def cmd_up(args: argparse.Namespace) -> int:
    import importlib.util

    from llamakit.catalog import ModelNotAvailable
    from llamakit.cli.up import Launcher, UpOptions

    options = UpOptions(
        state_dir=Path(args.state_dir),
        host=args.host,
        port=args.port,
        models=args.model or [],
        slots=args.slots,
        threads=args.threads,
        dev_credits=args.credits,
        agent=args.agent,
        db=args.db,
        credit_value=args.credit_value,
        loop=args.loop,
        currency=args.currency,
        dashboard_port=args.serve_dashboard,
        profile=Path(args.profile).expanduser().absolute() if args.profile else None,
        log_format=args.log_format,
        log_requests=args.log_requests,
        llama_server_bin=_llama_server_bin(args.llama_server_bin),
    )
    if args.serve_dashboard is not None and importlib.util.find_spec("textual_serve") is None:
        print("llamakit up: --serve-dashboard needs textual-serve: pip install 'llamakit[tui]'", file=sys.stderr)
        return 1
    try:
        launcher = Launcher(options)
    except RuntimeError as exc:  # the state directory or the port is taken, or the profile cannot be written
        print(f"llamakit up: {exc}", file=sys.stderr)
        return 1
    print(f"starting the router on {launcher.url} and its nodes (logs in {launcher.logs}) …", flush=True)
    try:
        profile = launcher.start()
        where = launcher.profile_path
        if launcher.profile_kept is not None:  # the default profile stays with the herd that still runs
            note = (
                f"profile written to {where}: the default one ({profile_path()}) stays with the herd at "
                f"{launcher.profile_kept}, which still runs; to use this herd from the SDK and llamakit-tui:\n\n"
                f"  export LLAMAKIT_PROFILE={shlex.quote(str(where))}\n"
            )
        elif where != profile_path():
            quoted = shlex.quote(str(where))
            note = f"profile written to {where}; for the SDK and llamakit-tui:\n\n  export LLAMAKIT_PROFILE={quoted}\n"
        else:
            note = f"profile written to {where} (the SDK and llamakit-tui read it)\n\n"
        print(
            f"\nllamakit is up: {profile.url}  models {', '.join(launcher.models) or profile.model}\n"
            f"{note}"
            f"  export LLAMAKIT_URL={profile.url}\n"
            f"  export LLAMAKIT_API_KEY={profile.api_key}\n\n"
            f"{web_dashboard_note(launcher)}"
            "Ctrl-C stops the herd.",
            flush=True,
        )
        dashboard = sys.stdout.isatty() and not args.headless
        if dashboard and importlib.util.find_spec("textual") is None:
            print("(no dashboard here: Textual is not installed; pip install 'llamakit[tui]')", flush=True)
            dashboard = False
        if dashboard:
            from llamakit.tui import run_dashboard

            launcher.quiet = True
            # The dashboard in the foreground: quitting it (q, Ctrl-C or SIGTERM) stops the herd below.
            run_dashboard(url=profile.url, admin_key=launcher.admin_key)
        else:
            launcher.wait()
    except (RuntimeError, TimeoutError, ModelNotAvailable) as exc:
        print(f"llamakit up: {exc}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        pass
    finally:
        print("stopping …", flush=True)
        launcher.stop()
    return 0


def web_dashboard_note(launcher: Launcher) -> str:
    """Where `--serve-dashboard` serves the dashboard, and the key that opens it ('' without the flag)."""
    if launcher.dashboard_url is None:
        return ""
    return (
        f"The dashboard in a browser: {launcher.dashboard_url} (sign in with the admin key, admin_key in "
        f"{launcher.profile_path})\n\n"
    )


def _port(text: str) -> int:
    if not text.isdigit() or not 1 <= int(text) <= 65535:
        raise argparse.ArgumentTypeError(f"a port is a number from 1 to 65535, not {text!r}")
    return int(text)


def _credit_value(text: str) -> str:
    """`--credit-value`, checked before anything starts (the router checks it again)."""
    from llamakit.money.currency import parse_credit_value

    try:
        parse_credit_value(text)
    except ValueError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None
    return text


def _currency(text: str) -> str:
    from llamakit.money.currency import parse_currency

    try:
        return parse_currency(text)
    except ValueError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None


def cmd_account(args: argparse.Namespace) -> int:
    with admin_client(args) as admin:
        body = {"name": args.name, "kind": args.kind, "deposit": args.deposit, "limits": limits_from_args(args)}
        return show(admin.post("/admin/accounts", json=body))


def cmd_deposit(args: argparse.Namespace) -> int:
    with admin_client(args) as admin:
        return show(admin.post(f"/admin/accounts/{segment(args.account)}/deposits", json={"amount": args.amount}))


def cmd_accounts(args: argparse.Namespace) -> int:
    with admin_client(args) as admin:
        return show(admin.get("/admin/accounts"))


def cmd_fees(args: argparse.Namespace) -> int:
    """Every model's fees; or set MODEL's (`--base` …, `--unserved` for a model no node serves yet); or `--delete`
    MODEL's own, so that it costs the default again (or is no model here, when no node serves it)."""
    if args.cached_prompt is not None and args.base is None:
        raise SystemExit("llamakit fees: --cached-prompt sets a fee with the others: give --base, --prompt, …")
    if args.delete and (args.base is not None or args.unserved):
        raise SystemExit("llamakit fees: --delete removes a model's fees; give it alone with the MODEL")
    if args.delete and args.model == "*":
        raise SystemExit("llamakit fees: --delete needs the MODEL whose fees to delete ('*', the default, stays)")
    with admin_client(args) as admin:
        path = f"/admin/fees/{segment(args.model)}"
        if args.delete:
            return show(admin.delete(path))
        if args.base is None:
            return show(admin.get("/admin/fees"))
        body = {"base_fee": args.base, "prompt_token_fee": args.prompt, "completion_token_fee": args.completion}
        if args.cached_prompt is not None:
            body["cached_prompt_token_fee"] = args.cached_prompt
        return show(admin.put(path, params={"unserved": "true"} if args.unserved else None, json=body))


def cmd_drain(args: argparse.Namespace) -> int:
    with admin_client(args) as admin:
        return show(admin.post(f"/admin/nodes/{segment(args.node)}/drain"))


def cmd_undrain(args: argparse.Namespace) -> int:
    with admin_client(args) as admin:
        return show(admin.post(f"/admin/nodes/{segment(args.node)}/undrain"))


USAGE_COLUMNS = [
    "time", "request_id", "account", "key_prefix", "user", "model", "node", "status", "http_status", "prompt_tokens",
    "completion_tokens", "cost_credits", "cost", "currency", "credit_value", "priced_at_current_value", "bid",
    "latency_ms", "queue_ms", "error", "cached_tokens", "cache_discount_credits", "cache_discount", "passed_over",
]  # fmt: skip


def cmd_usage(args: argparse.Namespace) -> int:
    """Usage records, newest first, every page of them up to `--limit`, as a table or CSV."""
    params: dict[str, str] = {}
    for name in ("account", "since", "user"):
        if getattr(args, name):
            params[name] = getattr(args, name)
    records: list[dict[str, Any]] = []
    with admin_client(args) as admin:
        while len(records) < args.limit:
            page_size = min(1000, args.limit - len(records))
            resp = admin.get("/admin/usage", params={**params, "limit": str(page_size)})
            if not resp.is_success:
                return show(resp)
            page = resp.json()
            for record in page["data"]:
                record["time"] = when(record.pop("created"))
                record["cost"] = _decimal_text(record.get("cost"))
                record["cache_discount"] = _decimal_text(record.get("cache_discount"))
                passed = record.get("passed_over") or []
                record["passed_over"] = ", ".join(f"{p.get('model')}={p.get('reason')}" for p in passed) or None
                # The credit value the record was priced at, as exact text (None from a router that keeps none).
                record["credit_value"] = record.get("credit_value_exact", _decimal_text(record.get("credit_value")))
            records += page["data"]
            if not page["has_more"]:
                break
            params["before"] = str(page["next_before"])
    if args.csv:
        writer = csv.DictWriter(sys.stdout, fieldnames=USAGE_COLUMNS, extrasaction="ignore", lineterminator="\n")
        writer.writeheader()
        writer.writerows(records)
        return 0
    shown = [
        "time", "request_id", "account", "key_prefix", "user", "model", "status", "prompt_tokens",
        "completion_tokens", "cost_credits", "cost", "currency",
    ]  # fmt: skip
    repriced = [r for r in records if r.get("priced_at_current_value")]
    for record in repriced:  # the price of a record older than the ledger's prices (schema 9) is today's
        record["cost"] = f"{record['cost']}*"
    table(shown, [[r.get(c) if r.get(c) is not None else "" for c in shown] for r in records])
    if repriced:
        print("* priced at the credit value the router runs with now: made before the ledger kept each price")
    return 0


def _decimal_text(number: object) -> object:
    """A price as the router meant it, in positional notation: 6.2e-05 → '0.000062' (the JSON number is the
    shortest form of the exact decimal, so its repr is that decimal)."""
    from decimal import Decimal

    from llamakit.money.currency import format_price

    if isinstance(number, float | int) and not isinstance(number, bool):
        return format_price(Decimal(repr(number)))
    return number


def cmd_stats(args: argparse.Namespace) -> int:
    with admin_client(args) as admin:
        return show(admin.get("/admin/stats"))


def _llama_server_bin(path: str | None) -> str | None:
    """`--llama-server-bin` as an absolute path (the nodes run from up's directory), checked before anything starts."""
    if path is None:
        return None
    found = shutil.which(path) if os.sep not in path else path
    if found is None or not os.access(found, os.X_OK) or os.path.isdir(found):
        raise SystemExit(f"llamakit up: --llama-server-bin: {path} is not an executable llama-server")
    return os.path.abspath(found)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="llamakit", description="Paid, metered llama.cpp inference.")
    parser.add_argument("--url", help="router URL for admin commands (default: the profile)")
    sub = parser.add_subparsers(dest="command", required=True)

    up = sub.add_parser("up", help="run a router and one node per installed model, in the foreground")
    up.add_argument("--host", default="127.0.0.1")
    up.add_argument("--port", type=int, default=8080)
    up.add_argument("--model", action="append", help="model to serve (repeatable; default: every installed one)")
    up.add_argument("--slots", type=int, default=2, help="slots per node")
    up.add_argument("--threads", type=int, default=None, help="threads per node context")
    up.add_argument(
        "--llama-server-bin",
        metavar="PATH",
        help="serve each model with llama.cpp's own llama-server at PATH, which its node starts, restarts and "
        "stops (docs/node.md#fronting-llama-server); default: llama-cpp-python in the node",
    )
    up.add_argument("--credits", type=int, default=1_000_000, help="opening deposit of the dev account")
    up.add_argument("--state-dir", default=str(_state_dir()), help="ledger, secrets and logs")
    up.add_argument(
        "--db",
        help="the router's ledger: a SQLite file (default: ledger.db in --state-dir) or "
        "postgresql://user@host:port/dbname, with the password in PGPASSWORD or ~/.pgpass",
    )
    up.add_argument(
        "--credit-value",
        type=_credit_value,
        help="what one credit is worth in --currency (default 0.000001: a fee of 1 credit per token reads as "
        "1 per million tokens)",
    )
    up.add_argument("--currency", type=_currency, help="ISO 4217 code of the operator's currency (default USD)")
    up.add_argument("--loop", choices=("uvloop", "asyncio"), help="the router's event loop (default uvloop)")
    up.add_argument(
        "--profile",
        help="where to write the client profile (default: $LLAMAKIT_PROFILE, else ~/.config/llamakit/profile.json; "
        "profile-PORT.json beside it when that one names another herd that still runs)",
    )
    up.add_argument(
        "--log-format",
        choices=LOG_FORMATS,
        default=os.environ.get("LLAMAKIT_LOG_FORMAT", "text").strip().lower() or "text",
        help="how the router, the nodes and up itself write their logs: text, or json (one object per line); "
        "env LLAMAKIT_LOG_FORMAT",
    )
    up.add_argument("--log-requests", action="store_true", help="the router logs one line per finished paid request")
    up.add_argument("--headless", action="store_true", help="do not show the dashboard")
    up.add_argument(
        "--serve-dashboard",
        type=_port,
        metavar="PORT",
        help="also serve the dashboard as a web page on --host:PORT, opened with the admin key (llamakit-tui --serve)",
    )
    up.add_argument("--agent", action="store_true", help="also run a demo sentiment-trading agent, funded")
    up.set_defaults(func=cmd_up)

    account = sub.add_parser("account", help="create an account and print its API key (shown once)")
    account.add_argument("name")
    account.add_argument("--kind", default="user", choices=["user", "agent", "dev"])
    account.add_argument("--deposit", type=int, default=0)
    add_limit_flags(account)  # the limits of the account's first key
    account.set_defaults(func=cmd_account)

    deposit = sub.add_parser("deposit", help="add credits to an account")
    deposit.add_argument("account")
    deposit.add_argument("amount", type=int)
    deposit.set_defaults(func=cmd_deposit)

    sub.add_parser("accounts", help="list accounts and balances").set_defaults(func=cmd_accounts)

    fees = sub.add_parser("fees", help="show fees, or set or delete a model's fees")
    fees.add_argument("model", nargs="?", default="*", help="the model ('*', the default: the fees of the others)")
    fees.add_argument("--base", type=int)
    fees.add_argument("--prompt", type=int, default=0)
    fees.add_argument("--completion", type=int, default=0)
    fees.add_argument(
        "--cached-prompt",
        type=int,
        help="fee per prompt token a node read from its cache, at most --prompt (default: the same as --prompt)",
    )
    fees.add_argument(
        "--unserved", action="store_true", help="set the fees of a model no node serves yet (before its nodes join)"
    )
    fees.add_argument("--delete", action="store_true", help="delete the model's own fees: it costs the default again")
    fees.set_defaults(func=cmd_fees)

    drain = sub.add_parser("drain", help="let a node finish its work and take no more")
    drain.add_argument("node")
    drain.set_defaults(func=cmd_drain)

    undrain = sub.add_parser("undrain", help="let a drained node take work again")
    undrain.add_argument("node")
    undrain.set_defaults(func=cmd_undrain)

    add_key_commands(sub)

    usage = sub.add_parser("usage", help="usage records, newest first (refusals included)")
    usage.add_argument("--account", help="one account's records")
    usage.add_argument("--user", help="records whose request named this OpenAI 'user'")
    usage.add_argument("--since", help="epoch seconds or an ISO 8601 date or time (UTC unless zoned)")
    usage.add_argument("--limit", type=int, default=100, help="records at most (default 100)")
    usage.add_argument("--csv", action="store_true", help="CSV with every column, for a spreadsheet")
    usage.set_defaults(func=cmd_usage)

    sub.add_parser("stats", help="one snapshot of the router's stats").set_defaults(func=cmd_stats)
    add_ledger_commands(sub, _state_dir())
    return parser


def main(argv: Sequence[str] | None = None) -> None:
    """Run one command; its exit code is 0, or 1 when the router refused it or could not be reached (one line on
    stderr then, not a traceback); 2 for a command line argparse refuses. A reader that stops early (`llamakit
    books | head`) ends any command quietly with 1, as Python's note on SIGPIPE does it."""
    try:
        try:
            code = _run(argv)
        finally:
            sys.stdout.flush()  # a closed pipe says so here, not as an "Exception ignored" at exit
    except BrokenPipeError:
        # Python's recipe (docs.python.org/3/library/signal.html#note-on-sigpipe): stdout to devnull, so that
        # the interpreter's own flush at exit finds no closed pipe either.
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        raise SystemExit(1) from None
    raise SystemExit(code)


def _run(argv: Sequence[str] | None) -> int:
    """The command's exit code; SystemExit for argparse's refusals and for a router that cannot be reached."""
    args = build_parser().parse_args(argv)
    command: Callable[[argparse.Namespace], int] = args.func
    if command is cmd_up:  # runs the router itself, and says what went wrong in its own words
        return command(args)
    try:
        code = command(args)
    except httpx.TransportError as exc:  # refused, timed out, cut off, a URL that is not http(s)
        raise SystemExit(f"llamakit: error: cannot reach the router at {_router_url(args)}: {_reason(exc)}") from None
    return code


def _router_url(args: argparse.Namespace) -> str:
    """The router the admin commands call (--url, else LLAMAKIT_URL, else the profile's), as `admin_client`
    finds it."""
    with admin_client(args) as admin:
        return str(admin.base_url).removesuffix("/")


def _reason(exc: httpx.TransportError) -> str:
    """Why a request got no answer, e.g. `[Errno 111] Connection refused`; some errors (timeouts) carry no text."""
    if isinstance(exc, httpx.TimeoutException):
        return f"no answer in time ({type(exc).__name__}{': ' + str(exc) if str(exc) else ''})"
    return str(exc) or type(exc).__name__
