"""Every notebook runs top to bottom, unedited, against a local herd, as after `llamakit up`."""

from __future__ import annotations

import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import nbformat
import pytest
from nbclient import NotebookClient

from llamakit.profile import Profile, write_profile
from llamakit.router import RouterSettings, create_app
from tests.sdk.conftest import ADMIN_KEY, LoopThread, loop_thread
from tests.support.fake_node import HERD_TOKEN
from tests.support.servers import RunningServer

pytestmark = pytest.mark.model

NOTEBOOKS = Path(__file__).resolve().parents[2] / "notebooks"
__all__ = ["loop_thread"]


@pytest.fixture(scope="module")
def herd_url(loop_thread: LoopThread, tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    from llamakit.node import NodeSettings
    from llamakit.node import create_app as create_node

    tmp = tmp_path_factory.mktemp("notebook-herd")
    node = loop_thread.run(
        RunningServer(create_node(NodeSettings(slots=2, n_ctx=2048, herd_token=HERD_TOKEN, name="nb-node"))).start(),
        timeout=120,
    )
    settings = RouterSettings(db=tmp / "ledger.db", admin_key=ADMIN_KEY, herd_token=HERD_TOKEN, nodes=[node.url])
    router = loop_thread.run(RunningServer(create_app(settings)).start())
    for _ in range(600):
        if httpx.get(f"{router.url}/health").json()["ready"] == 1:
            break
        time.sleep(0.1)
    yield router.url
    loop_thread.run(router.stop())
    loop_thread.run(node.stop())


@pytest.mark.parametrize("name", ["quickstart", "metering", "agent"])
def test_notebook_runs_top_to_bottom(name: str, herd_url: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    headers = {"Authorization": f"Bearer {ADMIN_KEY}"}
    created = httpx.post(
        f"{herd_url}/admin/accounts", json={"name": f"nb-{name}", "deposit": 1_000_000}, headers=headers
    )
    profile = tmp_path / "profile.json"
    write_profile(Profile(url=herd_url, api_key=created.json()["api_key"], admin_key=None), profile)
    monkeypatch.setenv("LLAMAKIT_PROFILE", str(profile))
    for var in ("LLAMAKIT_URL", "LLAMAKIT_API_KEY", "LLAMAKIT_USAGE_LOG"):
        monkeypatch.delenv(var, raising=False)
    monkeypatch.setenv("MPLBACKEND", "Agg")
    # Twice, with other use of the account in between: a notebook runs any number of times against a long-lived
    # herd, whatever the account did before.
    for run in range(2):
        book = nbformat.read(NOTEBOOKS / f"{name}.ipynb", as_version=4)
        assert all(not cell.get("outputs") for cell in book.cells if cell.cell_type == "code"), "saved with outputs"
        client = NotebookClient(
            book, timeout=600, kernel_name="python3", resources={"metadata": {"path": str(tmp_path)}}
        )
        client.execute()
        errors = [o for c in book.cells if c.cell_type == "code" for o in c.outputs if o.output_type == "error"]
        assert not errors, f"run {run + 1}: {errors}"
        other = httpx.post(
            f"{herd_url}/v1/completions",
            json={"prompt": "Hello", "max_tokens": 2},
            headers={"Authorization": f"Bearer {created.json()['api_key']}"},
            timeout=60,
        )
        assert other.status_code == 200, other.text
    books = httpx.get(f"{herd_url}/admin/books", headers=headers).json()
    assert books["balanced"] and books["holds"] == 0
