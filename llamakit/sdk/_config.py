"""Where the client finds its router and key: arguments, then the environment, then the `llamakit up` profile.

So a notebook needs no setup after `llamakit up`, a deployment sets `LLAMAKIT_URL` / `LLAMAKIT_API_KEY`,
and a test passes arguments; a missing piece is an error that lists all three ways to give it.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path

from llamakit.profile import Profile, profile_path, read_profile
from llamakit.sdk._exceptions import ConfigurationError
from llamakit.sdk._types import NotGiven

__all__ = ["ENV_API_KEY", "ENV_URL", "ENV_USAGE_LOG", "Config", "resolve_config", "resolve_usage_log"]

ENV_URL = "LLAMAKIT_URL"
ENV_API_KEY = "LLAMAKIT_API_KEY"
ENV_USAGE_LOG = "LLAMAKIT_USAGE_LOG"


@dataclass(frozen=True)
class Config:
    """A resolved configuration; `source` says where the URL came from, for error messages and repr."""

    url: str
    api_key: str | None
    model: str | None
    source: str

    def require_key(self) -> str:
        if not self.api_key:
            raise ConfigurationError(
                f"no API key for the router at {self.url} (from {self.source}): pass api_key=… to the client, "
                f"set {ENV_API_KEY}, or run 'llamakit up', which writes a profile with a key "
                f"({profile_path()})"
            )
        return self.api_key


def normalize_url(url: str) -> str:
    """The router's root URL: without a trailing slash or `/v1`, so an OpenAI-style base URL works too."""
    url = url.strip().rstrip("/")
    if url.endswith("/v1"):
        url = url[: -len("/v1")]
    if not url.startswith(("http://", "https://")):
        raise ConfigurationError(f"the router URL must start with http:// or https://, got {url!r}")
    return url


def resolve_config(
    *,
    url: str | None = None,
    api_key: str | None = None,
    model: str | None = None,
    env: Mapping[str, str] | None = None,
    profile: Profile | None = None,
) -> Config:
    """Each setting from the first of: the argument, the environment, the profile.

    The profile's key and model are only used when the URL is the profile's own: a key written for one
    router is never sent to another.
    """
    env = os.environ if env is None else env
    loaded: list[Profile | None] = [] if profile is None else [profile]

    def saved() -> Profile | None:
        # Read lazily: a broken profile must not matter to a caller who passed everything.
        if not loaded:
            loaded.append(_read_profile())
        return loaded[0]

    if url:
        resolved, source = normalize_url(url), "the url argument"
    elif env.get(ENV_URL):
        resolved, source = normalize_url(env[ENV_URL]), f"${ENV_URL}"
    elif (found := saved()) is not None:
        resolved, source = normalize_url(found.url), f"the profile {profile_path()}"
    else:
        raise ConfigurationError(
            "llamakit does not know where the router is: pass url=… (and api_key=…) to the client, "
            f"set {ENV_URL} and {ENV_API_KEY}, or run 'llamakit up', which starts a local herd and writes "
            f"a profile the SDK reads ({profile_path()})"
        )
    key = api_key or env.get(ENV_API_KEY) or None
    if key is None or model is None:
        found = saved()
        if found is not None and normalize_url(found.url) == resolved:
            key = key or found.api_key or None
            model = model or found.model
    return Config(url=resolved, api_key=key, model=model or None, source=source)


def resolve_usage_log(
    path: str | os.PathLike[str] | NotGiven | None, env: Mapping[str, str] | None = None
) -> Path | None:
    """The JSONL usage log: the argument (`None` for none), else `$LLAMAKIT_USAGE_LOG`, else none."""
    env = os.environ if env is None else env
    if path is None:
        return None
    if not isinstance(path, NotGiven):
        return Path(path).expanduser()
    if env.get(ENV_USAGE_LOG):
        return Path(env[ENV_USAGE_LOG]).expanduser()
    return None


def _read_profile() -> Profile | None:
    try:
        return read_profile()
    except ValueError as exc:
        raise ConfigurationError(str(exc)) from exc
