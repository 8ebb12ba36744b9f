"""The example client: a sentiment-trading agent that pays for every grade it asks the herd for."""

from llamakit.agent.agent import AccountExhausted, Outcome, SentimentAgent, choose_model, decide
from llamakit.agent.grader import METHODS, Grade, Method, SentimentGrader, default_method
from llamakit.agent.labelled import LabelledWindow, load_labelled
from llamakit.agent.market import InsufficientCash, PaperMarket
from llamakit.agent.world import (
    EXAMPLE_CHAT_CSV,
    EXAMPLE_CHAT_JSONL,
    ChatLogError,
    Message,
    ReplayWorld,
    SimulatedRoom,
    World,
    load_chat_log,
)

__all__ = [
    "EXAMPLE_CHAT_CSV",
    "EXAMPLE_CHAT_JSONL",
    "METHODS",
    "AccountExhausted",
    "ChatLogError",
    "Grade",
    "InsufficientCash",
    "LabelledWindow",
    "Message",
    "Method",
    "Outcome",
    "PaperMarket",
    "ReplayWorld",
    "SentimentAgent",
    "SentimentGrader",
    "SimulatedRoom",
    "World",
    "choose_model",
    "decide",
    "default_method",
    "load_chat_log",
    "load_labelled",
]
