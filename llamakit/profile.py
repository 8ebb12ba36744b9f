"""The client profile that `llamakit up` writes and the SDK and the dashboard read: where the router is, and keys.

It lives at `$LLAMAKIT_PROFILE`, else `~/.config/llamakit/profile.json`, readable by its owner only.
"""

from __future__ import annotations

import json
import os
from dataclasses import asdict, dataclass
from pathlib import Path

__all__ = ["Profile", "profile_path", "read_profile", "write_profile"]


@dataclass(frozen=True)
class Profile:
    url: str
    api_key: str | None = None
    admin_key: str | None = None
    model: str | None = None


def profile_path() -> Path:
    override = os.environ.get("LLAMAKIT_PROFILE")
    if override:
        return Path(override).expanduser()
    config = Path(os.environ.get("XDG_CONFIG_HOME") or Path.home() / ".config")
    return config / "llamakit" / "profile.json"


def read_profile(path: Path | None = None) -> Profile | None:
    """The saved profile, or None when there is none (a broken file is an error that names the file)."""
    path = path or profile_path()
    try:
        data = json.loads(path.read_text())
    except FileNotFoundError:
        return None
    except (OSError, json.JSONDecodeError) as exc:
        raise ValueError(f"the llamakit profile {str(path)!r} cannot be read ({exc}); run 'llamakit up' again") from exc
    if not isinstance(data, dict) or not isinstance(data.get("url"), str):
        raise ValueError(f"the llamakit profile {str(path)!r} has no 'url'; run 'llamakit up' again")

    def text(key: str) -> str | None:
        value = data.get(key)
        return value if isinstance(value, str) else None

    return Profile(url=data["url"], api_key=text("api_key"), admin_key=text("admin_key"), model=text("model"))


def write_profile(profile: Profile, path: Path | None = None) -> Path:
    path = path or profile_path()
    path.parent.mkdir(parents=True, exist_ok=True)
    # Create it private: it holds keys.
    fd = os.open(path.with_suffix(".tmp"), os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "w") as handle:
        json.dump(asdict(profile), handle, indent=2)
    os.replace(path.with_suffix(".tmp"), path)
    return path
