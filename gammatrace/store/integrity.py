"""Checksums that tell a damaged run file from a good one, so that a number is never
computed from a file that changed after gammatrace wrote it (issue 10).

- ``run.json``: every field pass 1 and the analysis *record* (status, progress, the
  measured displacement and parameter count, the hashes of θ_T and θ*) and the config's
  ``analysis`` section (its defaults enter every summary) are sealed, one SHA-256 prefix
  per field, under ``checksums``. A field that no longer matches is named when the file
  is read. The rest of the config stays editable (a moved study points
  ``model.init_from`` at its new folder): the replay verifies the trajectory against the
  recording anyway, and pass 1 refuses to resume under another config.
- Parquet tables: one SHA-256 per column (name, Arrow type, row count, values) in the
  file's key-value metadata, on top of Parquet's own page CRCs. A file without them (an
  older run, or one rewritten by another tool) is read unverified.

Example:
    >>> meta = {"status": "trained", "displacement": 0.5, "created": "today",
    ...         "config": {"seed": 1, "analysis": {"tail": 0}}}
    >>> sums = seal(meta)
    >>> sorted(sums)
    ['config.analysis', 'displacement', 'status']
    >>> changed_fields({**meta, "displacement": 0.6, "created": "tomorrow"}, sums)
    ['displacement']
    >>> import pandas as pd, tempfile
    >>> path = tempfile.mkdtemp() + "/t.parquet"
    >>> write_parquet(pd.DataFrame({"step": [0, 1], "loss": [2.5, 1.5]}), path)
    >>> read_parquet(path)["loss"].tolist()
    [2.5, 1.5]
"""

from __future__ import annotations

import hashlib
import json
from typing import Any

import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq

from gammatrace.errors import UserError

CHECKSUMS = "checksums"  # run.json's key holding the seal
# Fields a user may edit or that describe the run without entering a number.
UNSEALED = frozenset({"config", "provenance", "created", CHECKSUMS})
SEALED_CONFIG = ("analysis",)  # config sections sealed nonetheless: their defaults enter every summary

COLUMNS_KEY = b"gammatrace.columns_sha256"  # Parquet key-value metadata: column -> SHA-256 prefix


class DamagedTable(UserError, ValueError):
    """A Parquet table is unreadable or differs from what was written (the reason, one line);
    :meth:`RunStore.read_parquet` names the file and the fix."""


def _digest(value: Any) -> str:
    text = json.dumps(value, sort_keys=True, separators=(",", ":"))
    return hashlib.sha256(text.encode()).hexdigest()[:16]


def seal(data: dict[str, Any]) -> dict[str, str]:
    """The checksums of the sealed fields of a run.json dict (as written: JSON values)."""
    sums = {k: _digest(v) for k, v in data.items() if k not in UNSEALED}
    config = data.get("config")
    if isinstance(config, dict):
        sums.update({f"config.{k}": _digest(config[k]) for k in SEALED_CONFIG if k in config})
    return sums


def changed_fields(data: dict[str, Any], sums: dict[str, Any]) -> list[str]:
    """The sealed fields of ``data`` (a run.json dict without its ``checksums``) that differ
    from ``sums``: changed, added or removed since the file was written."""
    expected = seal(data)
    return sorted(k for k in set(expected) | set(sums) if expected.get(k) != sums.get(k))


PANDAS_METADATA = "(pandas metadata)"  # how pandas rebuilds the frame (index, dtypes): checked too


def column_digests(table: pa.Table) -> dict[str, str]:
    """One SHA-256 prefix per column of an Arrow table (its name, type, length and values),
    and one for the pandas metadata that turns the table back into a frame."""
    out = {}
    pandas_metadata = (table.schema.metadata or {}).get(b"pandas")
    if pandas_metadata is not None:
        out[PANDAS_METADATA] = hashlib.sha256(pandas_metadata).hexdigest()[:16]
    for name, column in zip(table.column_names, table.columns, strict=True):
        values = column.to_numpy(zero_copy_only=False)
        h = hashlib.sha256(f"{name}\0{column.type}\0{len(values)}\0".encode())
        try:
            h.update(pd.util.hash_array(values).tobytes())
        except TypeError:  # nested values (lists): hash their text
            h.update(repr(values.tolist()).encode())
        out[name] = h.hexdigest()[:16]
    return out


def write_parquet(frame: pd.DataFrame, path: str) -> None:
    """``frame`` (without its index) as Parquet with page CRCs and per-column checksums."""
    table = pa.Table.from_pandas(frame, preserve_index=False)
    metadata = dict(table.schema.metadata or {})
    metadata[COLUMNS_KEY] = json.dumps(column_digests(table)).encode()
    pq.write_table(table.replace_schema_metadata(metadata), path, write_page_checksum=True)


def read_parquet(path: str) -> pd.DataFrame:
    """A Parquet file as a frame, verified against its page CRCs and column checksums when
    it has them; :class:`DamagedTable` (a one-line reason) when it is unreadable or differs."""
    try:
        table = pq.read_table(path, page_checksum_verification=True)
    except Exception as exc:  # pyarrow reports damage as OSError, ArrowInvalid, MemoryError, ...
        raise DamagedTable(f"{exc.__class__.__name__}: {' '.join(str(exc).split())[:200]}") from None
    recorded = (table.schema.metadata or {}).get(COLUMNS_KEY)
    if recorded is not None:
        try:
            sums = json.loads(recorded)
            if not isinstance(sums, dict):
                raise ValueError
        except ValueError:
            raise DamagedTable("its column checksums are unreadable") from None
        try:
            found = column_digests(table)
        except UnicodeDecodeError:  # a bit flipped inside a column's name in the schema
            raise DamagedTable("its column names are unreadable (not UTF-8)") from None
        bad = sorted(c for c in set(found) | set(sums) if found.get(c) != sums.get(c))
        if bad:
            raise DamagedTable(f"column(s) {', '.join(bad)} differ from what was written (checksum)")
    try:
        return table.to_pandas()
    except Exception as exc:  # damaged pandas metadata, or types pandas cannot hold
        raise DamagedTable(f"{exc.__class__.__name__}: {' '.join(str(exc).split())[:200]}") from None
