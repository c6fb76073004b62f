"""Tuned per-shape tile tables (CSV, one file per arch and kernel), filled by ``kiln tune gemm``.

A row is keyed by ``(arch, M, N, K, dtype, layout, epilogue)`` and stores the chosen config with the
time, TFLOP/s and max relative error it was measured at, plus the cuBLAS time of the same problem for
scale. Lookups fall back to the same problem with another epilogue (the epilogue hardly moves the best
tile), then to the caller's heuristic; every miss is recorded in :func:`untuned` so reports can list
the problems that ran on a heuristic config. Writes hold a lock file and replace the CSV atomically
(temp file + rename), so concurrent tuners never leave a torn table.
"""
from __future__ import annotations

import contextlib
import csv
import fcntl
import os
import tempfile
from dataclasses import dataclass

__all__ = ["TableRow", "GemmTable", "table_path", "load_table", "untuned", "record_miss", "FIELDS"]

FIELDS = ("arch", "M", "N", "K", "dtype", "layout", "epilogue", "config", "time_us", "tflops", "max_rel_err",
          "cublas_us", "candidates", "tvm_version", "date")
_HERE = os.path.dirname(os.path.abspath(__file__))
_UNTUNED: list[tuple] = []


@dataclass(frozen=True)
class TableRow:
    """One tuned problem (all fields as in the CSV; numbers parsed)."""

    arch: str
    M: int
    N: int
    K: int
    dtype: str
    layout: str
    epilogue: str
    config: str
    time_us: float
    tflops: float
    max_rel_err: float
    cublas_us: float
    candidates: int
    tvm_version: str
    date: str

    @property
    def key(self) -> tuple:
        return (self.arch, self.M, self.N, self.K, self.dtype, self.layout, self.epilogue)

    @classmethod
    def from_csv(cls, rec: dict) -> "TableRow":
        ints, floats = ("M", "N", "K", "candidates"), ("time_us", "tflops", "max_rel_err", "cublas_us")
        vals = {f: (int(rec[f]) if f in ints else float(rec[f] or "nan") if f in floats else rec[f]) for f in FIELDS}
        return cls(**vals)

    def to_csv(self) -> dict:
        return {f: getattr(self, f) for f in FIELDS}


def table_path(arch: str, kernel: str = "gemm") -> str:
    """The table of ``arch`` (``sm90a``, ``gfx942``) for ``kernel``: in the ``tables_dir`` knob's
    directory when set (``KILN_TABLES_DIR``), else the one shipped with kiln."""
    from ...knobs import knobs
    return os.path.join(knobs.tables_dir or _HERE, f"{arch}_{kernel}.csv")


class GemmTable:
    """The rows of one CSV, indexed by key."""

    def __init__(self, path: str):
        self.path = path
        self.rows: dict[tuple, TableRow] = {}
        if os.path.exists(path):
            with open(path, newline="") as f:
                for rec in csv.DictReader(f):
                    row = TableRow.from_csv(rec)
                    self.rows[row.key] = row

    def lookup(self, arch: str, M: int, N: int, K: int, dtype: str, layout: str = "TN",
               epilogue: str = "none") -> TableRow | None:
        """The row of exactly this problem, else of the same problem with another epilogue, else ``None``."""
        row = self.rows.get((arch, M, N, K, dtype, layout, epilogue))
        if row is not None:
            return row
        same = [r for k, r in self.rows.items() if k[:6] == (arch, M, N, K, dtype, layout)]
        return min(same, key=lambda r: r.time_us) if same else None

    def merge(self, new_rows: list[TableRow]) -> None:
        """Add/replace ``new_rows`` and rewrite the CSV atomically under a lock (re-reading it first,
        so rows another tuner wrote meanwhile are kept)."""
        os.makedirs(os.path.dirname(os.path.abspath(self.path)), exist_ok=True)
        with _locked(self.path + ".lock"):
            fresh = GemmTable(self.path).rows
            fresh.update({r.key: r for r in new_rows})
            fd, tmp = tempfile.mkstemp(dir=os.path.dirname(os.path.abspath(self.path)), suffix=".csv.tmp")
            try:
                with os.fdopen(fd, "w", newline="") as f:
                    w = csv.DictWriter(f, fieldnames=FIELDS)
                    w.writeheader()
                    for key in sorted(fresh):
                        w.writerow(fresh[key].to_csv())
                os.replace(tmp, self.path)
            except BaseException:
                with contextlib.suppress(OSError):
                    os.unlink(tmp)
                raise
            self.rows = fresh


@contextlib.contextmanager
def _locked(path: str):
    with open(path, "a") as f:
        fcntl.flock(f, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(f, fcntl.LOCK_UN)


_CACHE: dict[str, tuple[float, GemmTable]] = {}


def load_table(arch: str, kernel: str = "gemm", path: str | None = None) -> GemmTable:
    """The table (cached per file and modification time, so a tuner's update is seen at once)."""
    path = path or table_path(arch, kernel)
    mtime = os.path.getmtime(path) if os.path.exists(path) else -1.0
    hit = _CACHE.get(path)
    if hit is None or hit[0] != mtime:
        hit = (mtime, GemmTable(path))
        _CACHE[path] = hit
    return hit[1]


def record_miss(key: tuple) -> None:
    """Note a problem served by a heuristic config (kept once, in order)."""
    if key not in _UNTUNED:
        _UNTUNED.append(key)


def untuned() -> list[tuple]:
    """Problems looked up in this process that had no tuned row: ``(arch, M, N, K, dtype, layout, epilogue)``."""
    return list(_UNTUNED)
