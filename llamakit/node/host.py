"""The model a node serves now, its free slots, and swapping it for another (the AO worker's Init).

A swap keeps requests in flight on the old model until they finish, makes new requests wait for the new
one, and frees the old contexts when the last of them is done.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from contextlib import suppress
from dataclasses import dataclass
from typing import Literal

from llamakit.catalog import ResolvedModel, resolve_model
from llamakit.node.engine import LoadedModel
from llamakit.node.errors import AlreadyLoading, ModelNotServed, NoModel, SlotsBusy, StillLoading

__all__ = ["ModelHost", "Slot"]

log = logging.getLogger(__name__)

Status = Literal["loading", "ready", "error"]
Loader = Callable[[ResolvedModel], LoadedModel]


@dataclass
class Slot:
    """One context (`index`) of `model`, taken by one request until it is freed (`ModelHost.free_slot`)."""

    model: LoadedModel
    index: int


class ModelHost:
    def __init__(self, loader: Loader, *, slots: int, load_wait: float = 120.0) -> None:
        self._loader = loader
        self.slot_count = slots
        self.load_wait = load_wait
        self.status: Status = "loading"
        self.error: str | None = None
        self.file_error: str | None = None  # what is wrong with the loaded model's file (see model_file.py)
        self.model: LoadedModel | None = None
        self.loading_name: str | None = None
        self._free: dict[int, list[int]] = {}
        self._busy: dict[int, int] = {}
        self._ready = asyncio.Event()
        self._load_task: asyncio.Task[None] | None = None
        # One thread per slot: generation never waits for a thread, and never runs on the event loop.
        self.executor = ThreadPoolExecutor(max_workers=slots, thread_name_prefix="llamakit-slot")

    @property
    def busy(self) -> int:
        return self._busy.get(id(self.model), 0) if self.model is not None else 0

    @property
    def model_name(self) -> str | None:
        return self.model.name if self.model is not None else self.loading_name

    def start_loading(self, name: str) -> None:
        """Begin loading `name` in the background. Raises at once the catalog's ModelNotAvailable when `name` cannot
        be resolved, AlreadyLoading while another model loads."""
        resolved = resolve_model(name)
        if self._load_task is not None and not self._load_task.done():
            raise AlreadyLoading(f"already loading {self.loading_name!r}; wait until /health says ready")
        self.status = "loading"
        self.loading_name = resolved.name
        self._ready.clear()
        self._load_task = asyncio.create_task(self._load(resolved), name=f"load {resolved.name}")

    async def _load(self, resolved: ResolvedModel) -> None:
        try:
            model = await asyncio.to_thread(self._loader, resolved)
        except Exception as exc:
            log.exception("loading %s failed", resolved.path)
            self.status, self.error = "error", f"loading {self.loading_name!r} failed: {exc}"
            self._ready.set()
            return
        old = self.model
        self.model, self.status, self.error = model, "ready", None
        self._free[id(model)] = list(range(model.slots))
        self._busy[id(model)] = 0
        self._ready.set()
        if old is not None:
            self._retire_if_idle(old)

    async def wait_loaded(self) -> None:
        await self._ready.wait()

    async def serving(self, requested: str | None) -> LoadedModel:
        """The loaded model, once loading ends. NoModel when none is loaded, ModelNotServed when `requested`
        names another."""
        await self.wait_loaded()
        model = self.model
        if model is None:
            raise NoModel(self.error or "no model is loaded")
        if requested is not None and requested != model.name:
            raise ModelNotServed(
                f"model {requested!r} is not served here; this node serves {model.name!r}", param="model"
            )
        return model

    async def take_slot(self, prompt_tokens: list[int] | None = None, cache_salt: str = "") -> Slot:
        """A free slot of the current model (the one the model picks for `prompt_tokens` of `cache_salt`: the
        batched engine reuses a slot's cached prefix); give it back with `free_slot`. Waits while a model loads
        (StillLoading past `load_wait` seconds); NoModel when none could be loaded, SlotsBusy when every slot
        is taken."""
        if not self._ready.is_set():
            try:
                await asyncio.wait_for(self._ready.wait(), self.load_wait)
            except TimeoutError:
                raise StillLoading("the node is still loading its model") from None
        if self.status == "error" or self.model is None:
            raise NoModel(self.error or "no model is loaded")
        free = self._free[id(self.model)]
        if not free:
            raise SlotsBusy(f"all {self.model.slots} slots are busy; retry shortly or send the request to another node")
        self._busy[id(self.model)] += 1
        index = self.model.choose_slot(free, prompt_tokens or [], cache_salt)
        free.remove(index)
        return Slot(self.model, index)

    def free_slot(self, slot: Slot) -> None:
        """The request is done with `slot`: the next one may take it (and a swapped-out model is unloaded once
        its last slot is free)."""
        key = id(slot.model)
        self._busy[key] -= 1
        self._free[key].append(slot.index)
        if slot.model is not self.model:
            self._retire_if_idle(slot.model)

    def _retire_if_idle(self, model: LoadedModel) -> None:
        key = id(model)
        if self._busy.get(key, 0) == 0:
            self._busy.pop(key, None)
            self._free.pop(key, None)
            log.info("unloading %s", model.name)
            model.close()

    async def close(self) -> None:
        if self._load_task is not None:
            self._load_task.cancel()
            with suppress(asyncio.CancelledError):
                await self._load_task
        self.executor.shutdown(wait=True, cancel_futures=True)
        if self.model is not None:
            self.model.close()
            self.model = None
