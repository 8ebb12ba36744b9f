"""The operator's live dashboard (`llamakit-tui`), built with Textual, also served to a browser (textual-serve);
install it with `llamakit[tui]`.

Nothing else in llamakit imports this package, so the SDK and the router run without Textual. Here, only
`main` is imported eagerly (it says plainly when Textual is missing); the rest loads on first use.
"""

from __future__ import annotations

from importlib import import_module
from typing import TYPE_CHECKING, Any

from llamakit.tui._cli import main, run_dashboard
from llamakit.tui._config import DashboardConfig, NotConfigured, resolve_config

if TYPE_CHECKING:
    from llamakit.tui._app import DashboardApp
    from llamakit.tui._screens import (
        AccountsScreen,
        ConfirmDrainScreen,
        ConfirmUndrainScreen,
        DashboardScreen,
        HelpScreen,
        KeysScreen,
        NodesScreen,
    )
    from llamakit.tui._serve import DashboardServer, serve_dashboard
    from llamakit.tui._sign_in_limit import SignInLimit
    from llamakit.tui._source import (
        DrainFailed,
        RouterRefused,
        RouterStats,
        RouterUnreachable,
        StatsError,
        StatsSource,
    )
    from llamakit.tui._stats import Stats, StatsHistory
    from llamakit.tui._widgets import (
        AccountsTable,
        AgentsTable,
        FeesPanel,
        HerdTable,
        KeysTable,
        QueuePanel,
        RefusalsPanel,
        RequestsLog,
        StatusBanner,
    )

__all__ = [
    "AccountsScreen",
    "AccountsTable",
    "AgentsTable",
    "ConfirmDrainScreen",
    "ConfirmUndrainScreen",
    "DashboardApp",
    "DashboardConfig",
    "DashboardScreen",
    "DashboardServer",
    "DrainFailed",
    "FeesPanel",
    "HelpScreen",
    "HerdTable",
    "KeysScreen",
    "KeysTable",
    "NodesScreen",
    "NotConfigured",
    "QueuePanel",
    "RefusalsPanel",
    "RequestsLog",
    "RouterRefused",
    "RouterStats",
    "RouterUnreachable",
    "SignInLimit",
    "Stats",
    "StatsError",
    "StatsHistory",
    "StatsSource",
    "StatusBanner",
    "main",
    "resolve_config",
    "run_dashboard",
    "serve_dashboard",
]

_LAZY = {
    "DashboardApp": "_app",
    "AccountsScreen": "_screens",
    "NodesScreen": "_screens",
    "ConfirmDrainScreen": "_screens",
    "ConfirmUndrainScreen": "_screens",
    "DashboardScreen": "_screens",
    "DashboardServer": "_serve",
    "serve_dashboard": "_serve",
    "SignInLimit": "_sign_in_limit",
    "HelpScreen": "_screens",
    "DrainFailed": "_source",
    "RouterRefused": "_source",
    "RouterStats": "_source",
    "RouterUnreachable": "_source",
    "StatsError": "_source",
    "StatsSource": "_source",
    "Stats": "_stats",
    "StatsHistory": "_stats",
    "AccountsTable": "_widgets",
    "AgentsTable": "_widgets",
    "FeesPanel": "_widgets",
    "HerdTable": "_widgets",
    "KeysScreen": "_screens",
    "KeysTable": "_widgets",
    "QueuePanel": "_widgets",
    "RefusalsPanel": "_widgets",
    "RequestsLog": "_widgets",
    "StatusBanner": "_widgets",
}


def __getattr__(name: str) -> Any:
    module = _LAZY.get(name)
    if module is None:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    value = getattr(import_module(f"{__name__}.{module}"), name)
    globals()[name] = value
    return value
