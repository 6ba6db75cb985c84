"""The scored cache entry `cache_dir/<key>/`: its key, the handle on a complete entry (`PreparedData`), reuse,
the bad-row gate and the summary its manifest holds.

The key hashes (`manifest.cache_key`) what the scored data depends on: the data's content, the reference
model and tokenizer, the settings that change the scored data (`config.scored_data_settings`), the package
version, the score columns and the layout. A reused entry is checked against its manifest (sizes, SHA-256)
and rebuilt when damaged, and its recorded counts go through the bad-row gate again: `max_bad_fraction` is
not part of the key. A cache folder given to prepare as raw data is refused with what to do instead.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from mallows_ray import __version__
from mallows_ray.config import Config, scored_data_settings
from mallows_ray.data import manifest as mf
from mallows_ray.data.rejects import check_bad_fraction
from mallows_ray.data.scored_split import ScoredSplit
from mallows_ray.data.scoring import SCORE_FIELDS
from mallows_ray.data.sources import list_source_files
from mallows_ray.losses import EntropyAggregate

PERCENTILES = (5, 25, 50, 75, 95)


@dataclass(frozen=True)
class PreparedData:
    """Where the scored dataset lives; `manifest` holds c, counts and fingerprints."""

    folder: Path
    manifest: dict[str, Any]

    def split(self, name: str) -> ScoredSplit:
        """A scored split ("train", "validation") for reading rows by index, s(x) included."""
        return ScoredSplit(self.folder / name, self.manifest["dispersion_scale"])


def key_parts(config: Config, sources: dict[str, str], model_path: Path) -> dict[str, Any]:
    """What the scored data of `sources` ({split: source}) depends on: hashed into the entry's key
    (`manifest.cache_key`) and recorded in its manifest."""
    return {
        "data": {s: mf.data_fingerprint(list_source_files(src), src) for s, src in sources.items()},
        "model": mf.model_fingerprint(model_path),
        "tokenizer": mf.tokenizer_fingerprint(model_path),
        "settings": scored_data_settings(config),
        "version": __version__,
        "scored_columns": [str(f) for f in SCORE_FIELDS],  # a new or changed score column invalidates the cache
        "layout": mf.LAYOUT,
    }


def check_raw_source(split: str, src: str) -> None:
    """A scored cache folder (or one of its splits) is not raw data: say so instead of reading it as rows."""
    signs = mf.scored_folder_signs(src)
    if not signs:
        return
    if (Path(src).expanduser() / mf.MANIFEST).is_file():
        advice = f"train on it as it is (mallows-ray train data.train={src}); prepare reads raw data"
    else:
        advice = (f"it has no {mf.MANIFEST}: an interrupted or damaged prepare, or a split folder of a cache entry "
                  f"(train on the entry folder that holds {mf.MANIFEST}). Point data.{split} at the raw data to "
                  "prepare it again")
    raise mf.CacheError(f"data.{split}={src} is a scored cache folder, not raw data ({'; '.join(signs)}): {advice}")


def open_cache(folder: str | Path, max_bad_fraction: float) -> PreparedData | None:
    """The complete scored cache entry at `folder` (None when it has no manifest: an interrupted run), after
    the bad-row gate on its recorded counts. CacheError naming the path when the entry is damaged
    (`manifest.read_manifest`); DataValidationError when its rejects exceed `max_bad_fraction`."""
    folder = Path(folder).expanduser()
    manifest = mf.read_manifest(folder)
    if manifest is None:
        return None
    rows_in = sum(split["rows_in"] for split in manifest["splits"].values())
    check_bad_fraction(manifest["rejects"]["count"], rows_in, max_bad_fraction, folder / mf.REJECTS_FILE)
    return PreparedData(folder, manifest)


def reuse(folder: Path, max_bad_fraction: float) -> PreparedData | None:
    """The complete entry at `folder` to reuse (`open_cache`), None when there is none to reuse: none was
    written, or it is damaged (said, and rebuilt by the caller)."""
    try:
        cached = open_cache(folder, max_bad_fraction)
    except mf.CacheError as err:
        print(f"[prepare] rebuilding the damaged scored cache: {err}")
        return None
    if cached is not None:
        print(f"[prepare] nothing changed: reusing the scored cache {folder}")
    return cached


def gate(rejects_path: Path, rejected: dict[str, int], rows_in: dict[str, int], sources: dict[str, str],
         max_bad_fraction: float) -> None:
    """The one place the rejects of a new entry are gated (rejects.jsonl is written by then; `open_cache`
    gates a reused one's recorded counts): stop the run when they exceed max_bad_fraction of the rows read,
    or when a split keeps no row. Every reject is one row read, so rows_in = rows kept + rejects."""
    check_bad_fraction(sum(rejected.values()), sum(rows_in.values()), max_bad_fraction, rejects_path)
    for split, src in sources.items():
        if rejected[split] >= rows_in[split]:
            raise ValueError(f"{split} data {src!r}: no usable rows ({rejected[split]} of {rows_in[split]} "
                             f"rejected; see {rejects_path})")


def entropy_summary(entropy: EntropyAggregate, c: float) -> dict[str, dict[str, float]]:
    """Mean and percentiles of Hbar(x) and of s(x) = c (-log Hbar(x)) from the streamed aggregate (percentiles
    to within one histogram bin); {} each when the split has no rows."""
    if entropy.count == 0:
        return {"hbar": {}, "dispersion": {}}
    neg_log = entropy.neg_log_percentiles(PERCENTILES)
    # Hbar falls as -log Hbar rises: its q-th percentile is exp(-(the (100 - q)-th of -log Hbar))
    hbar = {f"p{q}": float(np.exp(-v)) for q, v in zip(PERCENTILES, neg_log[::-1])}
    dispersion = {f"p{q}": float(c * v) for q, v in zip(PERCENTILES, neg_log)}
    return {"hbar": {"mean": entropy.hbar_sum / entropy.count, **hbar},
            "dispersion": {"mean": c * entropy.neg_log_sum / entropy.count, **dispersion}}


def format_summary(manifest: dict[str, Any]) -> str:
    """The final table: rows in/out, rejects by reason, truncation, tokens, Hbar and s(x) distributions."""
    lines = [f"{'split':<11}{'rows in':>9}{'rows out':>10}{'rejected':>10}{'trunc p/r':>12}{'tokens':>11}"
             f"{'Hbar mean':>11}{'s p5':>8}{'s p50':>8}{'s p95':>8}"]
    for split, s in manifest["splits"].items():
        d = s["dispersion"]
        lines.append(
            f"{split:<11}{s['rows_in']:>9}{s['rows_out']:>10}{s['rejected']:>10}"
            f"{str(s['truncated_prompts']) + '/' + str(s['truncated_responses']):>12}"
            f"{s['prompt_tokens'] + s['response_tokens']:>11}{s['hbar'].get('mean', float('nan')):>11.4f}"
            f"{d.get('p5', float('nan')):>8.3f}{d.get('p50', float('nan')):>8.3f}{d.get('p95', float('nan')):>8.3f}"
        )
    by_reason = ", ".join(f"{k}={v}" for k, v in sorted(manifest["rejects"]["by_reason"].items())) or "none"
    lines.append(f"rejects: {manifest['rejects']['count']} ({by_reason}) -> {manifest['rejects']['file']}")
    lines.append(f"dispersion scale c = {manifest['dispersion_scale']:.4f}; "
                 f"{manifest['rows_per_second']} rows/s; {manifest['seconds']} s")
    return "\n".join(lines)
