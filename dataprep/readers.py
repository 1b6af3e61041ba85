"""Reading (url, caption) lists: parquet, csv, tsv, jsonl (each optionally .gz) or a folder of them.

`read_url_list` returns an `UrlList`: a pyarrow table with a `url` (string) column, a `caption`
(binary: captions are decoded later so that a caption that is not UTF-8 costs one row, not the
whole file) column and the requested extra columns, concatenated over the files in name order.
Row indices are global over that order; shard `s` holds rows `[s * shard_size, (s+1) * shard_size)`.

Every problem with the list itself (missing file, unknown format, missing column, unreadable
file, no usable row) raises `InputError` with one line naming the file or column.
"""

from __future__ import annotations

import gzip
import io
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.csv as pcsv
import pyarrow.parquet as pq

from tessera.core.errors import InputError

FORMATS = ("parquet", "csv", "tsv", "jsonl", "json")


def _format_of(path: Path) -> tuple[str, bool] | None:
    """('csv', gzipped?) from the file name, or None when it is not a url list."""
    name = path.name.lower()
    gz = name.endswith(".gz")
    if gz:
        name = name[:-3]
    ext = name.rsplit(".", 1)[-1] if "." in name else ""
    if ext in FORMATS:
        return ("jsonl" if ext == "json" else ext), gz
    return None


def list_files(path: str | Path) -> list[Path]:
    """The url-list files at `path`: the file itself, or the supported files of a folder in name order."""
    p = Path(path)
    if not p.exists():
        raise InputError(f"URL list '{p}' does not exist")
    if p.is_dir():
        files = sorted(x for x in p.iterdir() if x.is_file() and not x.name.startswith(".") and _format_of(x))
        if not files:
            raise InputError(f"URL list folder '{p}' holds no parquet/csv/tsv/jsonl(.gz) file")
        return files
    if _format_of(p) is None:
        raise InputError(f"URL list '{p}': unknown format; expected .parquet, .csv, .tsv or .jsonl, optionally .gz")
    return [p]


def _open_bytes(path: Path, gz: bool) -> bytes:
    try:
        data = path.read_bytes()
        return gzip.decompress(data) if gz else data
    except (OSError, EOFError, gzip.BadGzipFile) as e:
        raise InputError(f"URL list '{path}' cannot be read: {e}") from None


def _require(path: Path, names: list[str], wanted: list[str], what: dict[str, str]) -> None:
    for col in wanted:
        if col not in names:
            flag = what.get(col, "--keep-cols")
            raise InputError(f"URL list '{path}' has no column '{col}' (columns: {', '.join(names) or 'none'}); choose one with {flag}")


def _read_parquet(path: Path, gz: bool, cols: list[str], what: dict[str, str]) -> pa.Table:
    try:
        source = io.BytesIO(_open_bytes(path, True)) if gz else str(path)
        pf = pq.ParquetFile(source)
        names = pf.schema_arrow.names
        _require(path, names, cols, what)
        return pf.read(columns=cols)
    except InputError:
        raise
    except Exception as e:  # pyarrow raises several types for corrupt files
        raise InputError(f"URL list '{path}' is not a readable parquet file: {str(e).splitlines()[0]}") from None


def _read_delimited(path: Path, gz: bool, delimiter: str, cols: list[str], what: dict[str, str], text_cols: list[str]) -> pa.Table:
    data = _open_bytes(path, gz)
    if not data.strip():
        raise InputError(f"URL list '{path}' is empty")
    head = data.split(b"\n", 1)[0]
    try:
        # Only the header, to name a missing column before parsing everything.
        names = pcsv.read_csv(io.BytesIO(head + b"\n"), parse_options=pcsv.ParseOptions(delimiter=delimiter)).column_names
    except Exception as e:
        raise InputError(f"URL list '{path}' has no readable header line: {str(e).splitlines()[0]}") from None
    _require(path, names, cols, what)
    try:
        return pcsv.read_csv(
            io.BytesIO(data),
            parse_options=pcsv.ParseOptions(delimiter=delimiter, newlines_in_values=True),
            convert_options=pcsv.ConvertOptions(
                include_columns=cols,
                column_types={c: pa.binary() for c in text_cols},
                strings_can_be_null=True,
                quoted_strings_can_be_null=False,
            ),
        )
    except Exception as e:
        raise InputError(
            f"URL list '{path}' cannot be parsed as {'TSV' if delimiter == chr(9) else 'CSV'}: {str(e).splitlines()[0]}"
        ) from None


def _read_jsonl(path: Path, gz: bool, cols: list[str], what: dict[str, str], text_cols: list[str]) -> pa.Table:
    data = _open_bytes(path, gz)
    columns: dict[str, list[Any]] = {c: [] for c in cols}
    seen: set[str] = set()
    n = 0
    for lineno, raw in enumerate(data.split(b"\n"), 1):
        if not raw.strip():
            continue
        try:
            # surrogateescape keeps bytes that are not UTF-8, so one bad caption does not sink the file.
            obj = json.loads(raw.decode("utf-8", "surrogateescape"))
        except ValueError as e:
            raise InputError(f"URL list '{path}' line {lineno} is not JSON: {e}") from None
        if not isinstance(obj, dict):
            raise InputError(f"URL list '{path}' line {lineno} is not a JSON object")
        seen.update(obj)
        n += 1
        for c in cols:
            v = obj.get(c)
            if c in text_cols:
                if v is not None and not isinstance(v, str):
                    v = json.dumps(v) if not isinstance(v, (int, float)) else str(v)
                v = v.encode("utf-8", "surrogateescape") if v is not None else None
            elif isinstance(v, str):
                v = v.encode("utf-8", "replace").decode("utf-8")  # arrow strings must be valid UTF-8
            columns[c].append(v)
    if n == 0:
        raise InputError(f"URL list '{path}' has no rows")
    _require(path, sorted(seen), cols, what)
    arrays = {}
    for c in cols:
        if c in text_cols:
            arrays[c] = pa.array(columns[c], type=pa.binary())
        else:
            try:
                arrays[c] = pa.array(columns[c])
            except (pa.ArrowInvalid, pa.ArrowTypeError):
                arrays[c] = pa.array([None if v is None else json.dumps(v) for v in columns[c]], type=pa.string())
    return pa.table(arrays)


@dataclass
class UrlList:
    """The concatenated url list: `url` (string), `caption` (binary) and the extra columns."""

    table: pa.Table
    files: list[Path]
    keep_cols: list[str]

    @property
    def num_rows(self) -> int:
        return self.table.num_rows

    def rows(self, start: int, stop: int) -> list[tuple[int, str, bytes | None, dict[str, Any]]]:
        """(global row index, url, caption bytes or None, extra columns) for rows [start, stop)."""
        part = self.table.slice(start, stop - start)
        urls = part.column("url").to_pylist()
        caps = part.column("caption").to_pylist()
        extras = {c: part.column(c).to_pylist() for c in self.keep_cols}
        out = []
        for i in range(len(urls)):
            ex = {c: _json_safe(extras[c][i]) for c in self.keep_cols}
            out.append((start + i, urls[i] or "", caps[i], ex))
        return out

    def fingerprint(self) -> dict[str, Any]:
        """What identifies this list for resuming: file names, sizes and the row count."""
        return {"files": [[f.name, f.stat().st_size] for f in self.files], "rows": self.num_rows}


def _json_safe(v: Any) -> Any:
    if v is None or isinstance(v, (bool, int, float, str)):
        return v
    if isinstance(v, bytes):
        return v.decode("utf-8", "replace")
    if isinstance(v, (list, tuple)):
        return [_json_safe(x) for x in v]
    if isinstance(v, dict):
        return {str(k): _json_safe(x) for k, x in v.items()}
    return str(v)


def _to_url_strings(col: pa.ChunkedArray) -> pa.Array:
    vals = col.to_pylist()
    out = []
    for v in vals:
        if isinstance(v, bytes):
            v = v.decode("utf-8", "replace")
        out.append(v.strip() if isinstance(v, str) else (None if v is None else str(v)))
    return pa.array(out, type=pa.string())


def _to_caption_binary(col: pa.ChunkedArray) -> pa.Array:
    t = col.type
    if pa.types.is_binary(t) or pa.types.is_large_binary(t):
        return col.combine_chunks().cast(pa.binary())
    if pa.types.is_string(t) or pa.types.is_large_string(t):
        return col.combine_chunks().cast(pa.string()).cast(pa.binary())
    return pa.array([None if v is None else str(v).encode() for v in col.to_pylist()], type=pa.binary())


def read_url_list(
    path: str | Path, url_col: str = "url", caption_col: str = "caption", keep_cols: list[str] | tuple[str, ...] = ()
) -> UrlList:
    """Read a url list (file or folder); raise InputError naming what is wrong with it."""
    files = list_files(path)
    keep = [c for c in keep_cols if c not in (url_col, caption_col)]
    for c in keep:
        if c in ("url", "caption", "key", "status", "error_message"):
            raise InputError(f"--keep-cols '{c}' would overwrite a field the crawler writes itself; rename that column")
    cols = [url_col, caption_col] + keep
    cols = list(dict.fromkeys(cols))
    what = {url_col: "--url-col", caption_col: "--caption-col"}
    text_cols = [url_col, caption_col]
    tables = []
    for f in files:
        fmt, gz = _format_of(f)  # type: ignore[misc]
        if fmt == "parquet":
            t = _read_parquet(f, gz, cols, what)
        elif fmt in ("csv", "tsv"):
            t = _read_delimited(f, gz, "\t" if fmt == "tsv" else ",", cols, what, text_cols)
        else:
            t = _read_jsonl(f, gz, cols, what, text_cols)
        arrays = {"url": _to_url_strings(t.column(url_col)), "caption": _to_caption_binary(t.column(caption_col))}
        for c in keep:
            arrays[c] = t.column(c).combine_chunks()
        tables.append(pa.table(arrays))
    try:
        table = pa.concat_tables(tables, promote_options="permissive") if len(tables) > 1 else tables[0]
    except (pa.ArrowInvalid, pa.ArrowTypeError) as e:
        raise InputError(f"URL list '{path}': the files' columns have incompatible types: {str(e).splitlines()[0]}") from None
    urls = table.column("url")
    usable = pc.sum(pc.and_(pc.is_valid(urls), pc.not_equal(urls, ""))).as_py() or 0
    if usable == 0:
        raise InputError(f"URL list '{path}' has no usable rows (no non-empty value in column '{url_col}')")
    return UrlList(table=table, files=files, keep_cols=keep)
