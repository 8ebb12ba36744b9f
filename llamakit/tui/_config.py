"""Which router the dashboard watches: flags, then `LLAMAKIT_*` environment variables, then the profile."""

from __future__ import annotations

import os
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path

from llamakit.profile import profile_path, read_profile

__all__ = ["DashboardConfig", "NotConfigured", "resolve_config"]


class NotConfigured(Exception):
    """No router URL or no admin key was found anywhere; the message says where it looked and what to do."""


@dataclass(frozen=True)
class DashboardConfig:
    url: str
    admin_key: str
    interval: float = 1.0


def resolve_config(
    *,
    url: str | None = None,
    admin_key: str | None = None,
    interval: float = 1.0,
    env: Mapping[str, str] | None = None,
    profile: Path | None = None,
) -> DashboardConfig:
    env = os.environ if env is None else env
    url = url or env.get("LLAMAKIT_URL") or None
    admin_key = admin_key or env.get("LLAMAKIT_ADMIN_KEY") or None
    path = profile or profile_path()
    if url is None or admin_key is None:
        try:
            saved = read_profile(path)
        except ValueError as exc:
            raise NotConfigured(str(exc)) from exc
        if saved is not None:
            # A key saved for another router is no use for the one named on the command line.
            same_router = url is None or url.rstrip("/") == saved.url.rstrip("/")
            url = url or saved.url
            if admin_key is None and same_router:
                admin_key = saved.admin_key
    missing = [what for what, value in (("router URL", url), ("admin key", admin_key)) if not value]
    if missing or url is None or admin_key is None:
        raise NotConfigured(
            f"no {' and no '.join(missing)} configured: run 'llamakit up' (it writes the profile {str(path)!r}), "
            "or pass --url and --admin-key, or set LLAMAKIT_URL and LLAMAKIT_ADMIN_KEY"
        )
    if not url.startswith(("http://", "https://")):
        raise NotConfigured(f"the router URL must start with http:// or https://, got {url!r}")
    if not 0.1 <= interval <= 60:
        raise NotConfigured(f"the update interval must be between 0.1 and 60 seconds, got {interval:g}")
    return DashboardConfig(url=url.rstrip("/"), admin_key=admin_key, interval=interval)
