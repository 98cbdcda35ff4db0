"""The checkpoints a replica holds (a cache of loaded samplers): loaded on first use, least recently used evicted."""

from __future__ import annotations

import dataclasses
import threading
from collections import OrderedDict

from cfgd.io.storage import StorageOptions
from cfgd.sampling.checkpoint_sampler import CheckpointSampler
from cfgd.serving.row_padding import RowPadded


def load_sampler(uri: str, opts: StorageOptions | None, pad_rows: int) -> CheckpointSampler:
    """``CheckpointSampler.load`` (EMA weights), with :class:`RowPadded` around the network."""
    gen = CheckpointSampler.load(uri, use_ema=True, storage=opts)
    if pad_rows > 1:
        gen = dataclasses.replace(gen, model=RowPadded(gen.model, pad_rows).eval())
    return gen


class ModelCache:
    """Checkpoints loaded on first use, at most ``capacity`` kept (least recently used
    evicted). Thread-safe; a URI is loaded once even when requested concurrently."""

    def __init__(self, capacity: int, opts: StorageOptions | None, pad_rows: int):
        self.capacity = capacity
        self.opts = opts
        self.pad_rows = pad_rows
        self._models: OrderedDict[str, CheckpointSampler] = OrderedDict()
        self._lock = threading.Lock()
        self._loading: dict[str, threading.Lock] = {}
        self.loads = 0

    def get(self, uri: str) -> CheckpointSampler:
        with self._lock:
            if uri in self._models:
                self._models.move_to_end(uri)
                return self._models[uri]
            load_lock = self._loading.setdefault(uri, threading.Lock())
        with load_lock:
            with self._lock:
                if uri in self._models:
                    return self._models[uri]
            gen = load_sampler(uri, self.opts, self.pad_rows)
            with self._lock:
                self._models[uri] = gen
                self.loads += 1
                self._evict()
        return gen

    def resize(self, capacity: int) -> None:
        with self._lock:
            self.capacity = capacity
            self._evict()

    def _evict(self) -> None:
        # Requests already holding an evicted CheckpointSampler keep it until they finish.
        while len(self._models) > self.capacity:
            self._models.popitem(last=False)

    def uris(self) -> list[str]:
        with self._lock:
            return list(self._models)
