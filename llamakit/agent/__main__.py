"""`python -m llamakit.agent`: run the sentiment-trading agent against a router."""

from __future__ import annotations

import argparse
import logging
import os
import sys
from collections.abc import Sequence
from pathlib import Path

from llamakit.agent.agent import AccountExhausted, SentimentAgent
from llamakit.agent.grader import METHODS
from llamakit.agent.market import PaperMarket
from llamakit.agent.world import ReplayWorld, SimulatedRoom, World
from llamakit.sdk import Client, ConfigurationError, LlamakitError


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="python -m llamakit.agent",
        description="Grade the sentiment of a chat through llamakit (paying per grade) and buy when it is good.",
        epilog=(
            "A world file has one message per JSON line or CSV row: author, text, time (ISO 8601 or Unix seconds) "
            "and an optional price; see llamakit/agent/data/example-chat.jsonl and example-chat.csv."
        ),
    )
    env = os.environ.get
    parser.add_argument("--router", default=env("LLAMAKIT_URL"), help="router URL (env LLAMAKIT_URL; default: profile)")
    parser.add_argument("--api-key", default=env("LLAMAKIT_API_KEY"), help="API key (env LLAMAKIT_API_KEY)")
    parser.add_argument(
        "--model",
        default=env("LLAMAKIT_AGENT_MODEL"),
        help="model to grade with (default: gemma-3-270m when the herd serves it, else smollm2-135m-instruct)",
    )
    parser.add_argument(
        "--method", choices=sorted(METHODS), default=None, help="grading method (default: the best for the model)"
    )
    parser.add_argument(
        "--buy-above", type=float, default=0.5, help="buy when the grade is positive with a score ≥ this (-1…1)"
    )
    parser.add_argument("--bid", default=env("LLAMAKIT_AGENT_BID", "1.0"), help="bid multiplier, or 'auto'")
    parser.add_argument(
        "--interval", type=float, default=float(env("LLAMAKIT_AGENT_INTERVAL", "5")), help="seconds per round"
    )
    parser.add_argument(
        "--rounds", type=int, default=0, help="rounds to run (0: until Ctrl-C or the end of a world file)"
    )
    parser.add_argument(
        "--world", default="simulated", help="'simulated', or a chat log to replay (.jsonl or .csv, see below)"
    )
    parser.add_argument("--seed", type=int, default=0, help="seed of the simulated room and price")
    parser.add_argument("--history", type=int, default=3, help="messages of chat history per grade")
    parser.add_argument("--trade-size", type=float, default=100.0, help="quote currency spent per buy")
    parser.add_argument("--cash", type=float, default=10_000.0, help="starting cash on the paper market")
    parser.add_argument("--trade-log", type=Path, default=None, help="JSONL file of fills")
    args = parser.parse_args(argv)
    if args.bid != "auto":
        try:
            args.bid = float(args.bid)
        except ValueError:
            parser.error(f"--bid must be a number ≥ 1 or 'auto', got {args.bid!r}")
    return args


def build_world(spec: str, seed: int) -> World:
    if spec == "simulated":
        return SimulatedRoom(seed=seed)
    return ReplayWorld.from_file(Path(spec), seed=seed)


def main(argv: Sequence[str] | None = None) -> int:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s")
    logging.getLogger("httpx").setLevel(logging.WARNING)
    args = parse_args(argv)
    try:
        world = build_world(args.world, args.seed)
    except (OSError, ValueError) as exc:
        print(f"python -m llamakit.agent: error: {exc}", file=sys.stderr)
        return 2
    market = PaperMarket(world.price, cash=args.cash, trade_log=args.trade_log)
    try:
        client = Client(url=args.router, api_key=args.api_key)
    except ConfigurationError as exc:
        print(f"python -m llamakit.agent: error: {exc}", file=sys.stderr)
        return 2
    agent = SentimentAgent(
        client, world, market, model=args.model, method=METHODS[args.method] if args.method else None,
        bid=args.bid, history=args.history, trade_size=args.trade_size, buy_above=args.buy_above,
    )  # fmt: skip
    code = 0
    try:
        agent.run(args.rounds or None, interval=args.interval)
        if world.exhausted:
            print(f"python -m llamakit.agent: the chat log {args.world} has ended", file=sys.stderr)
    except AccountExhausted as exc:
        print(f"python -m llamakit.agent: stopping: {exc}", file=sys.stderr)
        code = 3
    except KeyboardInterrupt:
        print("\nstopped", file=sys.stderr)
    except LlamakitError as exc:
        print(f"python -m llamakit.agent: error: {exc}", file=sys.stderr)
        code = 1
    finally:
        client.close()
    counts = agent.counts
    print(
        f"{counts['requests']} requests: {counts['buy']} buy, {counts['skip']} skip, {counts['error']} error; "
        f"position {market.position:.4f}, PnL {market.pnl():+.2f}, spent {agent.spent} credits",
        file=sys.stderr,
    )
    return code


if __name__ == "__main__":
    raise SystemExit(main())
