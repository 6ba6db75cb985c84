"""The scored-data cache: fingerprints of everything the scores depend on, and the manifest that seals it.

A cache folder is `cache_dir/<key>/` where key hashes the data's content, the reference model's weights and
config, the tokenizer files and every preparation setting. The manifest is written last, so a folder without
one is an interrupted run and is rebuilt.
"""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path
from typing import Any

MANIFEST = "manifest.json"
_HASH_BLOCK = 8 * 2**20


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
    """Content hash of local files; a hub dataset (no local files) is identified by its name."""
    digest = hashlib.sha256(source.encode())
    for path in files:
        digest.update(os.path.basename(path).encode())
        digest.update(file_digest(path).encode())
    return digest.hexdigest()


def model_fingerprint(model_path: str | Path) -> str:
    return folder_digest(model_path, ("config.json", "*.safetensors"))


def tokenizer_fingerprint(model_path: str | Path) -> str:
    return folder_digest(model_path, ("tokenizer*", "special_tokens_map.json", "chat_template.*", "*.model"))


def cache_key(parts: dict[str, Any]) -> str:
    return hashlib.sha256(json.dumps(parts, sort_keys=True, default=str).encode()).hexdigest()[:16]


def read_manifest(folder: str | Path) -> dict[str, Any] | None:
    path = Path(folder) / MANIFEST
    return json.loads(path.read_text()) if path.is_file() else None


def write_manifest(folder: str | Path, manifest: dict[str, Any]) -> Path:
    path = Path(folder) / MANIFEST
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps(manifest, indent=2, sort_keys=True, default=str))
    tmp.replace(path)  # atomic: the manifest's presence means the folder is complete
    return path
