"""llamakit: paid, metered llama.cpp inference as a service."""

__version__ = "0.1.0"
