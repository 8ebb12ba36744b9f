"""Configuration: arguments, then `LLAMAKIT_URL` / `LLAMAKIT_API_KEY`, then the `llamakit up` profile."""

from __future__ import annotations

from pathlib import Path

import httpx
import pytest

import llamakit.sdk as sdk
from llamakit.profile import Profile, write_profile


@pytest.fixture
def profile(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    path = tmp_path / "profile.json"
    write_profile(Profile(url="http://profile.test:8080", api_key="lk-profile", model="smollm2"), path)
    monkeypatch.setenv("LLAMAKIT_PROFILE", str(path))
    return path


def key_of(client: sdk.Client) -> str | None:
    return client._config.api_key


def test_the_profile_alone_is_enough(profile: Path) -> None:
    client = sdk.Client()
    assert (client.base_url, key_of(client), client.model) == ("http://profile.test:8080", "lk-profile", "smollm2")


def test_the_environment_beats_the_profile_and_arguments_beat_both(
    profile: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("LLAMAKIT_API_KEY", "lk-env")
    client = sdk.Client()
    assert (client.base_url, key_of(client)) == ("http://profile.test:8080", "lk-env")
    monkeypatch.setenv("LLAMAKIT_URL", "http://env.test:9000/v1/")  # an OpenAI-style base URL works too
    client = sdk.Client()
    assert (client.base_url, key_of(client), client.model) == ("http://env.test:9000", "lk-env", None)
    client = sdk.Client(url="http://arg.test", api_key="lk-arg", model="gemma")
    assert (client.base_url, key_of(client), client.model) == ("http://arg.test", "lk-arg", "gemma")


def test_the_profile_key_is_never_sent_to_another_router(profile: Path) -> None:
    assert key_of(sdk.Client(url="http://elsewhere.test")) is None
    assert key_of(sdk.Client(url="http://profile.test:8080/")) == "lk-profile"


def test_no_configuration_is_an_error_that_says_how_to_give_one() -> None:
    with pytest.raises(sdk.ConfigurationError) as caught:
        sdk.Client()
    message = str(caught.value)
    for hint in ("url=", "LLAMAKIT_URL", "LLAMAKIT_API_KEY", "llamakit up"):
        assert hint in message
    with pytest.raises(sdk.ConfigurationError, match="LLAMAKIT_URL"):
        sdk.generate("hello")  # the module-level functions say the same
    assert len(sdk.usage_frame()) == 0  # and nothing is recorded: no call was made


def test_a_missing_key_fails_the_call_not_the_info() -> None:
    seen: list[httpx.Request] = []

    def handler(request: httpx.Request) -> httpx.Response:
        seen.append(request)
        return httpx.Response(200, json={"queue_length": 3, "last_multiplier": 1.5, "models": {}})

    client = sdk.Client(url="http://k.test", http_client=httpx.Client(transport=httpx.MockTransport(handler)))
    assert client.info().last_multiplier == 1.5 and "Authorization" not in seen[0].headers
    with pytest.raises(sdk.ConfigurationError, match=r"no API key for the router at http://k\.test"):
        client.generate("hello")
    assert len(seen) == 1
    [record] = client.usage_records
    assert (record.error_type, record.attempts) == ("ConfigurationError", 0)


def test_a_broken_profile_or_url_is_a_configuration_error(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    broken = tmp_path / "broken.json"
    broken.write_text("{not json")
    monkeypatch.setenv("LLAMAKIT_PROFILE", str(broken))
    with pytest.raises(sdk.ConfigurationError, match=r"broken\.json"):
        sdk.Client()
    sdk.Client(url="http://fine.test", api_key="k", model="m")  # a caller who gives everything never reads it
    with pytest.raises(sdk.ConfigurationError, match="http://"):
        sdk.Client(url="localhost:8080", api_key="k")


def test_configure_replaces_the_default_client_and_keeps_the_records(profile: Path, tmp_path: Path) -> None:
    first = sdk.default_client()
    assert first.base_url == "http://profile.test:8080" and sdk.default_client() is first
    second = sdk.configure(url="http://other.test", api_key="lk-2", max_retries=0)
    assert sdk.default_client() is second and second.usage is first.usage and second.max_retries == 0
    third = sdk.configure(url="http://other.test", api_key="lk-2", usage_log=tmp_path / "u.jsonl")
    assert third.usage is not first.usage and third.usage.log_path == tmp_path / "u.jsonl"
    with pytest.raises(ValueError, match="not both"):
        sdk.Client(usage=first.usage, usage_log=None)
