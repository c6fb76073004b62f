"""The on-disk build cache of :mod:`kiln.ops`: one exported module per key, built once across processes.

Key
    SHA-256 over a JSON document that names everything that changes the generated code: the op, its
    parameters (shapes, dtypes, epilogue, tile config, ...), a stamp of the generating source (SHA-256 of
    each Python module that writes the kernel), the kiln / TVM / TVM-FFI versions, the target (device
    arch and every target attribute) and the compile options (nvcc version and flags). Callers build the
    document (:func:`kiln.ops.build.cache_document`); this module only hashes it.

Entry
    ``<root>/entries/<key>/`` holding ``lib.so`` (``export_library`` output: for CUDA the kernels are
    nvcc cubins when nvcc is available) and ``meta.json`` (the key, the document, the SHA-256 of
    ``lib.so`` and whatever the builder reported, e.g. which schedule served the op). An entry is valid
    only when ``meta.json`` parses, names this key and the library's SHA-256 matches; anything else (a
    half-written or corrupted entry) is discarded and rebuilt.

Concurrency
    A build happens inside an exclusive ``fcntl.flock`` on ``<root>/locks/<key>.lock``, into a fresh
    temporary directory under ``<root>/tmp/`` that is renamed to the entry only when complete. A second
    process asking for the same key blocks on the lock, then finds the entry and loads it: N processes
    started at once produce exactly one build. A failed build removes its temporary directory, so it
    leaves no entry. Every build appends one JSON line to ``<root>/builds.log`` (what the tests count).
    Locks are advisory and die with their process, so a crashed builder never blocks the next one.
"""
from __future__ import annotations

import contextlib
import fcntl
import hashlib
import json
import logging
import os
import shutil
import tempfile
import threading
import time
from dataclasses import dataclass, field
from typing import Any, Callable, Iterator

__all__ = ["BuildCache", "CacheEntry", "cache_key", "default_cache", "LIBRARY", "META", "BUILD_LOG", "FORMAT"]

log = logging.getLogger("kiln.ops")

LIBRARY, META, BUILD_LOG = "lib.so", "meta.json", "builds.log"
#: Layout version of an entry; part of every key, so a layout change never reads an old entry.
FORMAT = 1


def cache_key(doc: dict) -> str:
    """Hex SHA-256 of the canonical JSON of ``doc`` (sorted keys, no whitespace)."""
    text = json.dumps({"format": FORMAT, "doc": doc}, sort_keys=True, separators=(",", ":"), default=str)
    return hashlib.sha256(text.encode()).hexdigest()


def _sha256_file(path: str) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


@dataclass
class CacheEntry:
    """A loaded cache entry.

    Attributes
    ----------
    key : str
        Hex SHA-256 of the document.
    path : str
        The entry directory.
    module : tvm.runtime.Module
        The loaded library.
    meta : dict
        ``meta.json`` (``key``, ``doc``, ``sha256``, ``build_s``, ``info`` from the builder).
    source : str
        How this process got it: ``"built"``, ``"disk"`` (loaded, built earlier or by another process).
    """

    key: str
    path: str
    module: Any
    meta: dict
    source: str


@dataclass
class _Stats:
    builds: int = 0
    disk_loads: int = 0
    memory_hits: int = 0
    discarded: int = 0
    keys_built: list = field(default_factory=list)


class BuildCache:
    """An on-disk cache of built modules under ``root`` (see the module docstring).

    Parameters
    ----------
    root : str
        Cache directory (created on first build).
    """

    def __init__(self, root: str):
        self.root = os.path.abspath(os.path.expanduser(root))
        self._memory: dict[str, CacheEntry] = {}
        self._mutex = threading.Lock()          # guards _memory and the stats, not the builds
        self.stats = _Stats()

    # ------------------------------------------------------------------ paths
    def entry_dir(self, key: str) -> str:
        return os.path.join(self.root, "entries", key)

    def _lock_path(self, key: str) -> str:
        return os.path.join(self.root, "locks", key + ".lock")

    # ------------------------------------------------------------------ public
    def get(self, doc: dict, build: Callable[[str], dict]) -> CacheEntry:
        """The entry of ``doc``: from memory, else from disk, else built (once across processes).

        Parameters
        ----------
        doc : dict
            JSON-able description of everything that changes the code (hashed by :func:`cache_key`).
        build : callable
            ``build(lib_path) -> info``: writes the exported library to ``lib_path`` and returns a
            JSON-able dict stored as ``meta["info"]``. Called at most once per key across processes,
            under the key's lock; an exception propagates and leaves no entry.

        Returns
        -------
        CacheEntry
        """
        key = cache_key(doc)
        with self._mutex:
            hit = self._memory.get(key)
            if hit is not None:
                self.stats.memory_hits += 1
                return hit
        entry = self._load(key)                 # fast path: a valid entry needs no lock
        if entry is None:
            with self._locked(key):
                entry = self._load(key)         # another process may have built it while we waited
                if entry is None:
                    self._discard(key)
                    entry = self._build(key, doc, build)
        with self._mutex:
            if entry.source == "disk":
                self.stats.disk_loads += 1
            self._memory[key] = entry
        return entry

    def forget(self) -> None:
        """Drop the in-memory entries (the next :meth:`get` reads the disk again)."""
        with self._mutex:
            self._memory.clear()

    def build_log(self) -> list[dict]:
        """The records of ``builds.log`` (one per build ever made in this cache, any process)."""
        path = os.path.join(self.root, BUILD_LOG)
        if not os.path.exists(path):
            return []
        out = []
        with open(path) as f:
            for line in f:
                line = line.strip()
                if line:
                    with contextlib.suppress(ValueError):
                        out.append(json.loads(line))
        return out

    # ------------------------------------------------------------------ internals
    @contextlib.contextmanager
    def _locked(self, key: str) -> Iterator[None]:
        path = self._lock_path(key)
        os.makedirs(os.path.dirname(path), exist_ok=True)
        with open(path, "a") as f:
            fcntl.flock(f, fcntl.LOCK_EX)       # blocks while another process builds this key
            try:
                yield
            finally:
                fcntl.flock(f, fcntl.LOCK_UN)

    def _load(self, key: str) -> CacheEntry | None:
        """The entry on disk if it is complete and intact, else None (a bad one is logged)."""
        folder = self.entry_dir(key)
        meta_path, lib_path = os.path.join(folder, META), os.path.join(folder, LIBRARY)
        if not os.path.isdir(folder):
            return None
        try:
            with open(meta_path) as f:
                meta = json.load(f)
            if not isinstance(meta, dict) or meta.get("key") != key or meta.get("format") != FORMAT:
                raise ValueError("meta.json does not describe this key")
            digest = _sha256_file(lib_path)
            if digest != meta.get("sha256"):
                raise ValueError(f"{LIBRARY} sha256 {digest[:16]}... != recorded {str(meta.get('sha256'))[:16]}...")
            import tvm
            module = tvm.runtime.load_module(lib_path)
        except Exception as e:  # noqa: BLE001 - any defect of an entry means "rebuild it"
            log.warning("kiln.ops cache: entry %s is unusable (%s: %s); it will be rebuilt",
                        folder, type(e).__name__, str(e).splitlines()[0][:200] if str(e) else "")
            return None
        return CacheEntry(key, folder, module, meta, "disk")

    def _discard(self, key: str) -> None:
        """Move an unusable entry out of the way (rename first, so no reader sees it half-deleted)."""
        folder = self.entry_dir(key)
        if not os.path.lexists(folder):
            return
        os.makedirs(os.path.join(self.root, "tmp"), exist_ok=True)
        trash = tempfile.mkdtemp(prefix=f"discard-{key[:16]}-", dir=os.path.join(self.root, "tmp"))
        os.rename(folder, os.path.join(trash, "entry"))
        shutil.rmtree(trash, ignore_errors=True)
        with self._mutex:
            self.stats.discarded += 1

    def _build(self, key: str, doc: dict, build: Callable[[str], dict]) -> CacheEntry:
        os.makedirs(os.path.join(self.root, "tmp"), exist_ok=True)
        os.makedirs(os.path.join(self.root, "entries"), exist_ok=True)
        tmp = tempfile.mkdtemp(prefix=f"build-{key[:16]}-", dir=os.path.join(self.root, "tmp"))
        t0 = time.perf_counter()
        try:
            lib_path = os.path.join(tmp, LIBRARY)
            info = build(lib_path)
            if not os.path.isfile(lib_path):
                raise RuntimeError(f"the builder of {doc.get('op', '?')} wrote no {LIBRARY}")
            meta = {"format": FORMAT, "key": key, "doc": doc, "sha256": _sha256_file(lib_path),
                    "build_s": round(time.perf_counter() - t0, 3), "pid": os.getpid(),
                    "created": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()), "info": info or {}}
            with open(os.path.join(tmp, META), "w") as f:
                json.dump(meta, f, indent=1, sort_keys=True, default=str)
                f.flush()
                os.fsync(f.fileno())
            import tvm
            module = tvm.runtime.load_module(lib_path)   # fail here, before the entry exists
            folder = self.entry_dir(key)
            os.rename(tmp, folder)
        except BaseException:
            shutil.rmtree(tmp, ignore_errors=True)
            raise
        with open(os.path.join(self.root, BUILD_LOG), "a") as f:
            f.write(json.dumps({"key": key, "op": doc.get("op"), "pid": os.getpid(),
                                "build_s": meta["build_s"], "created": meta["created"]}) + "\n")
        with self._mutex:
            self.stats.builds += 1
            self.stats.keys_built.append(key)
        log.info("kiln.ops cache: built %s in %.2f s -> %s", doc.get("op"), meta["build_s"], folder)
        return CacheEntry(key, folder, module, meta, "built")


_CACHES: dict[str, BuildCache] = {}
_CACHES_LOCK = threading.Lock()


def default_cache() -> BuildCache:
    """The cache in the ``ops_cache_dir`` knob's directory (``KILN_OPS_CACHE_DIR``, default
    ``~/.cache/kiln/ops``); one instance per directory, so changing the knob switches caches."""
    from .. import knobs
    root = os.path.abspath(os.path.expanduser(knobs.get("ops_cache_dir")))
    with _CACHES_LOCK:
        cache = _CACHES.get(root)
        if cache is None:
            cache = _CACHES[root] = BuildCache(root)
        return cache
