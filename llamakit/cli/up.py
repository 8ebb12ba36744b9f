"""`llamakit up`: a router and one node per installed model on loopback, a funded dev account and a profile.

Each part runs as its own process, as in production, so a crash of one is seen and reported rather than
taking the others down. Secrets are made once and kept in the state directory, so the ledger and the dev
account survive a restart.
"""

from __future__ import annotations

import fcntl
import json
import logging
import os
import re
import secrets
import signal
import socket
import subprocess
import sys
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from types import FrameType

import httpx

from llamakit.catalog import CATALOG, DEFAULT_MODEL, ModelNotAvailable
from llamakit.logs import json_formatter
from llamakit.profile import Profile, profile_path, read_profile, write_profile

__all__ = ["Launcher", "UpOptions", "installed_models"]

DEV_ACCOUNT = "dev"
DEMO_AGENT = "demo-agent"


@dataclass
class UpOptions:
    state_dir: Path
    host: str = "127.0.0.1"
    port: int = 8080
    models: list[str] = field(default_factory=list)
    slots: int = 2
    threads: int | None = None
    dev_credits: int = 1_000_000
    ready_timeout: float = 300.0
    profile: Path | None = None
    agent: bool = False
    agent_credits: int = 5_000_000  # a grade costs ~350 credits: hours of the demo agent at one every 5 s
    agent_interval: float = 5.0
    db: str | None = None  # the router's --db; None: ledger.db in state_dir
    credit_value: str | None = None  # the router's --credit-value; None: its default (or LLAMAKIT_CREDIT_VALUE)
    loop: str | None = None  # the router's --loop; None: its default, uvloop (or LLAMAKIT_LOOP)
    currency: str | None = None  # the router's --currency
    dashboard_port: int | None = None  # serve the dashboard as a web page on this port (llamakit-tui --serve)
    log_format: str = "text"  # every part's --log-format, and up's own lines: text or json
    log_requests: bool = False  # the router's --log-requests
    llama_server_bin: str | None = None  # each node in front of a llama-server it runs (the node's --llama-server-bin)


class HerdRunning(RuntimeError):
    """Another `llamakit up` runs from the same state directory (its ledger, secrets and logs)."""


class CannotStart(RuntimeError):
    """`llamakit up` cannot start here: the port is taken, or the profile cannot be written."""


def check_port_free(host: str, port: int, *, part: str = "router", flag: str = "--port") -> None:
    """CannotStart when something listens on `host`:`port` already (another herd's router, most likely):
    its answers would pass for this herd's, and this herd's router would fail to start, again and again."""
    with socket.socket() as sock:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # as the router binds: TIME_WAIT is no bar
        try:
            sock.bind((host, port))
        except OSError as exc:
            raise CannotStart(
                f"cannot listen on {host}:{port} ({exc.strerror}): another herd's {part}? Pick another {flag}"
            ) from None


def check_profile_writable(path: Path) -> None:
    """CannotStart, before anything starts, when the profile cannot be written at `path`."""
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise CannotStart(f"cannot write the profile at {path} ({exc}); give another with --profile") from None
    if path.is_dir():
        raise CannotStart(f"the profile {path} is a directory; give a file with --profile")
    if not os.access(path.parent, os.W_OK) or (path.exists() and not os.access(path, os.W_OK)):
        raise CannotStart(f"cannot write the profile at {path} (permission denied); give another with --profile")


def claim_state_dir(state_dir: Path, url: str) -> int:
    """Lock `state_dir` for this herd (the lock goes with the process, however it ends); returns the lock's file
    descriptor, to keep open while the herd runs. HerdRunning, naming the running herd, when it is taken."""
    state_dir.mkdir(parents=True, exist_ok=True)
    fd = os.open(state_dir / "up.lock", os.O_RDWR | os.O_CREAT, 0o600)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        holder = os.read(fd, 1024).decode(errors="replace").strip() or "another llamakit up"
        os.close(fd)
        if (pid := re.search(r"pid (\d+)", holder)) is not None and not _alive(int(pid[1])):
            holder += f"; that llamakit up is gone, but its router or nodes still run: stop them ({url_of(holder)})"
        raise HerdRunning(
            f"a herd already runs from {state_dir} ({holder}); stop it first, or give this one a state "
            "directory of its own: --state-dir DIR (and --port, --profile)"
        ) from None
    os.ftruncate(fd, 0)
    os.write(fd, f"router {url}, pid {os.getpid()}\n".encode())
    return fd


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def url_of(holder: str) -> str:
    """The router URL in an `up.lock` line, for the message that names a herd."""
    match = re.search(r"router (\S+),", holder)
    return f"the router at {match[1]}" if match else "see ps"


def profile_target(url: str, chosen: Path | None) -> tuple[Path, str | None]:
    """Where `llamakit up` serving `url` writes its profile, and the URL of another running herd whose profile
    it leaves alone (None when it replaces none).

    `chosen` (--profile) is used as given. Otherwise the default profile (see profile.profile_path), unless
    that names another router that still answers: then `profile-<port>.json` beside it, so that the SDK and
    the dashboard keep finding the herd they were pointed at.
    """
    if chosen is not None:
        return chosen, None
    default = profile_path()
    try:
        saved = read_profile(default)
    except ValueError:  # unreadable: nothing worth keeping
        return default, None
    if saved is None or saved.url == url or not _answers(saved.url):
        return default, None
    port = url.rsplit(":", 1)[-1].strip("/")
    return default.with_name(f"{default.stem}-{port}{default.suffix}"), saved.url


def _answers(url: str) -> bool:
    try:
        return httpx.get(f"{url}/health", timeout=2).status_code < 500
    except httpx.HTTPError:
        return False


def installed_models() -> list[str]:
    """Catalog models whose package is installed, default first (nothing is loaded or assembled here)."""
    import importlib.util

    found = []
    for name, entry in CATALOG.items():
        module = entry.package.replace("-", "_")
        if importlib.util.find_spec(module) is not None:
            found.append(name)
    return sorted(found, key=lambda n: n != DEFAULT_MODEL)


def free_port(host: str) -> int:
    with socket.socket() as sock:
        sock.bind((host, 0))
        port: int = sock.getsockname()[1]
        return port


def _secrets(state_dir: Path) -> dict[str, str]:
    path = state_dir / "secrets.json"
    if path.exists():
        data: dict[str, str] = json.loads(path.read_text())
        return data
    data = {"admin_key": "lka-" + secrets.token_urlsafe(24), "herd_token": secrets.token_urlsafe(24)}
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "w") as handle:
        json.dump(data, handle)
    return data


# A part that dies is started again after RESTART_MIN seconds, doubling up to RESTART_MAX while it keeps dying;
# one that stayed up RESTART_STABLE seconds starts again from RESTART_MIN.
RESTART_MIN = 1.0
RESTART_MAX = 30.0
RESTART_STABLE = 60.0


@dataclass
class _Part:
    """One process of the herd and how to start it again."""

    args: list[str]
    extra_env: dict[str, str] | None
    started: float
    backoff: float = RESTART_MIN
    due: float | None = None  # when a dead part is to be started again
    restarts: int = 0


class Launcher:
    def __init__(self, options: UpOptions) -> None:
        self.options = options
        self.processes: dict[str, subprocess.Popen[bytes]] = {}
        self.parts: dict[str, _Part] = {}
        self.models: list[str] = []  # what `start` serves
        self.quiet = False  # the dashboard owns the terminal: restarts go to logs/up.log only
        self._stopping = threading.Event()
        self._supervisor: threading.Thread | None = None
        self.url = f"http://{options.host}:{options.port}"
        # Held by every process of the herd (see _spawn): a router or node that outlives a killed `up` keeps
        # the state directory from a second herd, whose router would release the live one's holds.
        self._lock: int | None = claim_state_dir(options.state_dir, self.url)
        try:
            check_port_free(options.host, options.port)
            if options.dashboard_port == options.port:
                raise CannotStart(f"the dashboard cannot share the router's port {options.port}: pick another")
            if options.dashboard_port is not None:
                check_port_free(options.host, options.dashboard_port, part="dashboard", flag="--serve-dashboard PORT")
            # Where start() writes the profile, and the running herd whose profile it left alone, if any.
            self.profile_path, self.profile_kept = profile_target(self.url, options.profile)
            check_profile_writable(self.profile_path)
        except BaseException:
            os.close(self._lock)
            raise
        # up's own lines (a restart, a part that died) as the parts write theirs: text, or JSON objects.
        self._json = json_formatter() if options.log_format == "json" else None
        self.logs = options.state_dir / "logs"
        self.logs.mkdir(exist_ok=True)
        keys = _secrets(options.state_dir)
        self.admin_key, self.herd_token = keys["admin_key"], keys["herd_token"]

    def _spawn(self, name: str, args: list[str], extra_env: dict[str, str] | None = None) -> None:
        log = (self.logs / f"{name}.log").open("ab")
        env = {**os.environ, "LLAMAKIT_ADMIN_KEY": self.admin_key, "LLAMAKIT_HERD_TOKEN": self.herd_token}
        if extra_env is not None:
            # Only the agent gets an API key, and no operator secrets.
            env = {k: v for k, v in env.items() if k not in ("LLAMAKIT_ADMIN_KEY", "LLAMAKIT_HERD_TOKEN")}
            env.update(extra_env)
        # Secrets travel in the environment, not on the command line where `ps` would show them.
        self.processes[name] = subprocess.Popen(
            [sys.executable, *args],
            stdout=log,
            stderr=subprocess.STDOUT,
            env=env,
            start_new_session=True,
            pass_fds=() if self._lock is None else (self._lock,),
        )
        log.close()  # the child has its own copy
        part = self.parts.get(name)
        if part is None:
            self.parts[name] = _Part(args, extra_env, time.monotonic())
        else:
            part.started, part.due = time.monotonic(), None

    def start(self) -> Profile:
        """Start everything, wait until every node is ready, and write the profile; returns it."""
        opts = self.options
        models = self.models = opts.models or installed_models()
        if not models:
            raise ModelNotAvailable("no model is installed: pip install 'llamakit[node]'")
        router = [
            "-m", "llamakit.router",
            "--host", opts.host,
            "--port", str(opts.port),
            "--db", opts.db or str(opts.state_dir / "ledger.db"),
            "--usage-log", str(opts.state_dir / "usage.jsonl"),
        ]  # fmt: skip
        if opts.credit_value is not None:
            router += ["--credit-value", opts.credit_value]
        if opts.currency is not None:
            router += ["--currency", opts.currency]
        if opts.loop is not None:
            router += ["--loop", opts.loop]
        router += ["--log-format", opts.log_format]
        if opts.log_requests:
            router += ["--log-requests", "yes"]
        self._spawn("router", router)
        for model in models:
            port = free_port(opts.host)
            args = [
                "-m", "llamakit.node",
                "--model", model,
                "--host", opts.host,
                "--port", str(port),
                "--slots", str(opts.slots),
                "--name", f"{model}-1",
                "--router", self.url,
                "--log-format", opts.log_format,
            ]  # fmt: skip
            # Nodes on one machine share its cores: llama.cpp threads spin while they wait, so two nodes with
            # a thread per core each slow each other down many times over.
            threads = opts.threads or max(1, (os.cpu_count() or 1) // len(models))
            args += ["--threads", str(threads)]
            if opts.llama_server_bin is not None:  # the node starts, watches and stops that llama-server
                args += ["--llama-server-bin", opts.llama_server_bin]
            self._spawn(f"node-{model}", args)
        self._wait_ready(models)
        profile = Profile(url=self.url, api_key=self._dev_key(), admin_key=self.admin_key, model=models[0])
        try:
            write_profile(profile, self.profile_path)
        except OSError as exc:
            raise CannotStart(
                f"cannot write the profile at {self.profile_path} ({exc}); give another with --profile"
            ) from None
        if opts.agent:
            self._start_agent()
        if opts.dashboard_port is not None:
            self._start_web_dashboard(opts.dashboard_port)
        self._supervisor = threading.Thread(target=self._supervise, name="llamakit-up-supervisor", daemon=True)
        self._supervisor.start()
        return profile

    def _supervise(self) -> None:
        while not self._stopping.wait(0.25):
            self.restart_dead()

    def restart_dead(self) -> None:
        """Start again, with backoff, every part that died; the others keep running (one pass).

        A node that dies takes only its own requests down: the router fails them over or refunds them, and
        takes the node back when it joins again. The demo agent is not restarted (its account may be dry).
        """
        now = time.monotonic()
        for name, proc in list(self.processes.items()):
            part = self.parts[name]
            if proc.poll() is None:
                if part.due is None and now - part.started >= RESTART_STABLE:
                    part.backoff = RESTART_MIN
                continue
            if self._stopping.is_set():
                return
            if part.due is None:
                tail = (self.logs / f"{name}.log").read_text(errors="replace").splitlines()[-3:]
                if name == "agent":
                    self._say(f"the demo agent stopped (code {proc.returncode}): {tail[-1] if tail else ''}")
                    del self.processes[name]
                    continue
                part.due = now + part.backoff
                self._say(
                    f"{name} exited with code {proc.returncode}; starting it again in {part.backoff:g} s "
                    f"(see {self.logs / (name + '.log')})"
                )
                part.backoff = min(part.backoff * 2, RESTART_MAX)
            elif now >= part.due:
                part.restarts += 1
                self._spawn(name, part.args, part.extra_env)
                self._say(f"{name} started again (restart {part.restarts})")

    def _say(self, message: str) -> None:
        if self._json is not None:
            record = logging.LogRecord("llamakit.up", logging.INFO, __file__, 0, message, None, None)
            line = self._json.format(record)
        else:
            line = f"{time.strftime('%H:%M:%S')} {message}"
        with (self.logs / "up.log").open("a") as handle:
            handle.write(line + "\n")
        if not self.quiet:
            print(line, flush=True)

    def _start_agent(self) -> None:
        """A demo agent with its own funded account, so the dashboard shows trade outcomes from the start."""
        headers = {"Authorization": f"Bearer {self.admin_key}"}
        with httpx.Client(base_url=self.url, headers=headers, timeout=10) as admin:
            resp = admin.post(
                "/admin/accounts", json={"name": DEMO_AGENT, "kind": "agent", "deposit": self.options.agent_credits}
            )
            if resp.status_code == 409:
                resp = admin.post(f"/admin/accounts/{DEMO_AGENT}/keys")
            resp.raise_for_status()
            key = resp.json()["api_key"]
        self._spawn(
            "agent",
            ["-m", "llamakit.agent", "--router", self.url, "--interval", str(self.options.agent_interval)],
            {"LLAMAKIT_API_KEY": key, "LLAMAKIT_USAGE_LOG": ""},
        )

    @property
    def dashboard_url(self) -> str | None:
        """Where the dashboard is served as a web page (`dashboard_port`), or None."""
        port = self.options.dashboard_port
        return None if port is None else f"http://{self.options.host}:{port}/"

    def _start_web_dashboard(self, port: int) -> None:
        """`llamakit-tui --serve` beside the herd: the admin key goes in its environment (see _spawn)."""
        args = ["-m", "llamakit.tui", "--serve", "--host", self.options.host, "--port", str(port), "--url", self.url]
        self._spawn("dashboard", args)

    def _check_alive(self) -> None:
        """While starting: a part that exits stops `llamakit up` with its last lines (a model that cannot load
        would only crash again)."""
        for name, proc in list(self.processes.items()):
            if proc.poll() is None:
                continue
            tail = (self.logs / f"{name}.log").read_text(errors="replace").splitlines()[-15:]
            if name == "agent":  # the demo agent may stop (its account ran dry); the herd goes on
                print(f"the demo agent stopped (code {proc.returncode}): {tail[-2] if len(tail) > 1 else ''}")
                del self.processes[name]
                continue
            raise RuntimeError(f"{name} exited with code {proc.returncode}:\n" + "\n".join(tail))

    def _wait_ready(self, models: list[str]) -> None:
        deadline = time.monotonic() + self.options.ready_timeout
        with httpx.Client(timeout=2) as client:
            while time.monotonic() < deadline:
                self._check_alive()
                try:
                    health = client.get(f"{self.url}/health").json()
                    if set(models) <= set(health.get("models", [])) and health.get("ready", 0) >= len(models):
                        return
                except (httpx.HTTPError, ValueError):
                    pass
                time.sleep(0.25)
        raise TimeoutError(f"the herd was not ready after {self.options.ready_timeout:g}s; see {self.logs}")

    def _dev_key(self) -> str:
        """The dev account's key: the saved one if it still works, else a new one (keys are shown only once)."""
        headers = {"Authorization": f"Bearer {self.admin_key}"}
        with httpx.Client(base_url=self.url, headers=headers, timeout=10) as admin:
            try:
                saved = read_profile(self.profile_path)
            except ValueError:  # unreadable: it is written afresh below
                saved = None
            if saved is not None and saved.api_key and saved.url == self.url:
                check = admin.get("/v1/account", headers={"Authorization": f"Bearer {saved.api_key}"})
                if check.status_code == 200:
                    return saved.api_key
            resp = admin.post(
                "/admin/accounts", json={"name": DEV_ACCOUNT, "kind": "dev", "deposit": self.options.dev_credits}
            )
            if resp.status_code == 409:  # the account exists from an earlier run: give it a new key
                resp = admin.post(f"/admin/accounts/{DEV_ACCOUNT}/keys")
            resp.raise_for_status()
            key: str = resp.json()["api_key"]
            return key

    def wait(self) -> None:
        """Stay in the foreground until Ctrl-C or SIGTERM; parts that die meanwhile are started again."""

        def on_signal(signum: int, frame: FrameType | None) -> None:
            self._stopping.set()

        signal.signal(signal.SIGTERM, on_signal)
        signal.signal(signal.SIGINT, on_signal)
        while not self._stopping.wait(0.5):
            pass

    def stop(self) -> None:
        """The agent, then the nodes (they finish or drop their work), then the router; SIGKILL after 10 s."""
        self._stopping.set()
        if self._supervisor is not None:
            self._supervisor.join()
        order = sorted(self.processes, key=lambda name: (name != "agent", name == "router"))
        for name in order:
            proc = self.processes[name]
            if proc.poll() is None:
                proc.send_signal(signal.SIGINT)
        deadline = time.monotonic() + 10
        for name in order:
            proc = self.processes[name]
            try:
                proc.wait(max(0.1, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()
        if self._lock is not None:  # the state directory is free for the next herd
            os.close(self._lock)
            self._lock = None
