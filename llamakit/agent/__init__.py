"""The example client: a sentiment-trading agent that pays for every grade it asks the herd for."""

from llamakit.agent.agent import AccountExhausted, Outcome, SentimentAgent, grade_of
from llamakit.agent.market import InsufficientCash, PaperMarket
from llamakit.agent.world import Message, ReplayWorld, SimulatedRoom, World, load_chat_log

__all__ = [
    "AccountExhausted",
    "InsufficientCash",
    "Message",
    "Outcome",
    "PaperMarket",
    "ReplayWorld",
    "SentimentAgent",
    "SimulatedRoom",
    "World",
    "grade_of",
    "load_chat_log",
]
