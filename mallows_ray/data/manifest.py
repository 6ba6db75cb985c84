"""The scored-data cache: fingerprints of everything the scores depend on, and the manifest that seals it.

A cache folder is `cache_dir/<key>/` where key hashes the data's content, the reference model's weights and
config, the tokenizer files and every preparation setting. The manifest is written last, so a folder without
one is an interrupted run and is rebuilt. It records the size and SHA-256 of every file of the entry
(`files`), and `read_manifest` checks them: a truncated or changed parquet, or a damaged manifest, is a
`CacheError` naming the path, never a half-read table.
"""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path
from typing import Any

import pyarrow as pa
import pyarrow.parquet as pq

MANIFEST = "manifest.json"
# The scored split's layout, part of the cache key: 2 added the prompt_tokens column that training's length
# grouping reads instead of every row's token ids; 3 the Arrow IPC twins in _arrow/ and Hbar(x) in place of a
# stored s(x) column.
LAYOUT = 3
REJECTS_FILE = "rejects.jsonl"
_REQUIRED = ("files", "splits", "rejects", "kind", "dispersion_scale", "tokenizer")
_SCORED_COLUMNS = {"prompt_ids", "ref_logps"}  # columns only a prepared (tokenized, scored) split has
_HASH_BLOCK = 8 * 2**20


class CacheError(ValueError):
    """A scored cache folder whose manifest or files are damaged, or a scored folder given as raw data."""


def file_digest(path: str | Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as fh:
        while block := fh.read(_HASH_BLOCK):
            digest.update(block)
    return digest.hexdigest()


def folder_digest(folder: str | Path, patterns: tuple[str, ...]) -> str:
    """Hash of the named files' relative paths and contents (sorted, so the order of listing does not matter)."""
    folder = Path(folder)
    digest = hashlib.sha256()
    for path in sorted(p for pattern in patterns for p in folder.glob(pattern) if p.is_file()):
        digest.update(str(path.relative_to(folder)).encode())
        digest.update(file_digest(path).encode())
    return digest.hexdigest()


def data_fingerprint(files: list[str], source: str) -> str:
    """Content hash of local files and their paths under `source` (their names, for a single file: moving a
    file between sub-folders changes its default ids); a hub dataset (no local files) is identified by its name."""
    digest = hashlib.sha256(source.encode())
    root = Path(source).expanduser()
    for path in files:
        digest.update((os.path.relpath(path, root) if root.is_dir() else os.path.basename(path)).encode())
        digest.update(file_digest(path).encode())
    return digest.hexdigest()


def model_fingerprint(model_path: str | Path) -> str:
    return folder_digest(model_path, ("config.json", "*.safetensors"))


def tokenizer_fingerprint(model_path: str | Path) -> str:
    return folder_digest(model_path, ("tokenizer*", "special_tokens_map.json", "chat_template.*", "*.model"))


def cache_key(parts: dict[str, Any]) -> str:
    return hashlib.sha256(json.dumps(parts, sort_keys=True, default=str).encode()).hexdigest()[:16]


def _file_entry(path: Path) -> dict[str, Any]:
    return {"bytes": path.stat().st_size, "sha256": file_digest(path)}


def _entry_files(folder: Path) -> list[Path]:
    """The files a complete entry consists of: the rejects file and every file of the split folders."""
    files = [p for p in sorted(folder.glob("*/**/*")) if p.is_file()]
    return files + ([folder / REJECTS_FILE] if (folder / REJECTS_FILE).is_file() else [])


def read_manifest(folder: str | Path) -> dict[str, Any] | None:
    """The manifest of a complete cache entry, None when the folder has none (an interrupted run).

    CacheError, naming the path, when the manifest is not valid JSON or lacks a field, or when a file it
    lists is missing or differs in size or SHA-256, or a split folder holds a file it does not list.
    """
    folder = Path(folder)
    path = folder / MANIFEST
    if not path.is_file():
        return None
    try:
        manifest = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as err:  # ValueError: JSONDecodeError, UnicodeDecodeError
        raise CacheError(f"{path}: damaged manifest ({type(err).__name__}: {err})") from None
    missing = [key for key in _REQUIRED if not isinstance(manifest, dict) or key not in manifest]
    if missing:
        raise CacheError(f"{path}: damaged or outdated manifest, no {', '.join(missing)} field")
    listed = manifest["files"]
    if not (isinstance(listed, dict) and all(isinstance(e, dict) and {"bytes", "sha256"} <= set(e)
                                             for e in listed.values())):
        raise CacheError(f"{path}: damaged manifest, its files field is not {{path: {{bytes, sha256}}}}")
    for rel, entry in listed.items():
        file = folder / rel
        if not file.is_file():
            raise CacheError(f"{file}: listed in {path} but missing")
        if (size := file.stat().st_size) != entry["bytes"]:
            raise CacheError(f"{file}: {size} bytes, but {path} records {entry['bytes']} (truncated or changed)")
        if file_digest(file) != entry["sha256"]:
            raise CacheError(f"{file}: its SHA-256 differs from the one {path} records (the file was changed)")
    for file in _entry_files(folder):
        if str(file.relative_to(folder)) not in listed:
            raise CacheError(f"{file}: not listed in {path} (added after the cache was written)")
    return manifest


def write_manifest(folder: str | Path, manifest: dict[str, Any]) -> dict[str, Any]:
    """Write the manifest, with the size and SHA-256 of every file of the entry (`files`), atomically and
    last; returns what was written."""
    folder = Path(folder)
    path = folder / MANIFEST
    manifest = {**manifest, "files": {str(p.relative_to(folder)): _file_entry(p) for p in _entry_files(folder)}}
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps(manifest, indent=2, sort_keys=True, default=str))
    tmp.replace(path)  # atomic: the manifest's presence means the folder is complete
    return manifest


def scored_folder_signs(path: str | Path) -> list[str]:
    """Why `path` looks like a prepared cache entry or one of its splits ([] when it does not): the signs are
    a manifest, a rejects file beside split folders, and parquet files with the tokenized/scored columns."""
    folder = Path(path).expanduser()
    if not folder.is_dir():
        return []
    signs = [f"it has {MANIFEST}"] if (folder / MANIFEST).is_file() else []
    splits = [p.name for p in folder.iterdir() if p.is_dir() and any(p.glob("*.parquet"))]
    if (folder / REJECTS_FILE).is_file() and splits:
        signs.append(f"it has {REJECTS_FILE} beside split folders ({', '.join(sorted(splits))})")
    first = next(iter(sorted(folder.rglob("*.parquet"))), None)
    try:
        columns = set(pq.read_schema(first).names) if first is not None else set()
    except (pa.ArrowException, OSError):
        columns = set()
    if _SCORED_COLUMNS <= columns:  # both: raw data may well carry a prompt_ids column of its own
        signs.append(f"{first} has the scored columns {', '.join(sorted(_SCORED_COLUMNS))}")
    return signs
