"""The llamakit router ("herder"): prices, queues by bid, dispatches to nodes and settles every request."""

from llamakit.router.app import create_app
from llamakit.router.settings import RouterSettings, settings_from_args

__all__ = ["RouterSettings", "create_app", "settings_from_args"]
