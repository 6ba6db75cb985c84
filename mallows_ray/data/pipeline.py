"""The preparation graph: raw preference data -> validated, tokenized, reference-scored parquet + manifest.

    files / HF dataset --normalise + validate (driver; bad rows -> rejects)--> Arrow blocks
      --map_batches(_tokenize_block)   Ray tasks    --> token ids, truncation flags, prompt_too_long rejects
      --map_batches(ReferenceScorer)   actor pool   --> ref log-probs, token counts, Hbar per response
      --write_parquet(staging) --> c = calibrate(Hbar(x) over train) --> add s(x) --> final parquet
      --> manifest.json (written last: its presence marks a complete cache entry)

Normalisation runs on the driver so that every reject carries its file and line; tokenization and scoring,
the expensive parts, run on the cluster. Nothing is dropped without a line in rejects.jsonl, which is always
written (empty when no row is rejected), and `_account` is the one place rejects are counted and gated.
A reused cache entry is checked against its manifest (sizes, SHA-256) and rebuilt when damaged, and its
recorded counts go through the bad-row gate again: `max_bad_fraction` is not part of the cache key.
"""

from __future__ import annotations

import math
import os
import shutil
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from mallows_ray import __version__
from mallows_ray.config import Config, to_dict
from mallows_ray.data import manifest as mf
from mallows_ray.data.formats import NORMALISED_SCHEMA, Reject, list_source_files, read_normalised
from mallows_ray.data.rejects import check_bad_fraction, summarise_rejects, write_rejects
from mallows_ray.data.scoring import SCORE_FIELDS, ReferenceScorer
from mallows_ray.data.tokenize import LengthLimits, cached_tokenizer, tokenize_batch
from mallows_ray.losses import calibrate_scale, dispersion_from_entropy
from mallows_ray.models import resolve_model_path

TOKENIZED_SCHEMA = pa.schema(
    list(NORMALISED_SCHEMA)
    + [
        pa.field("prompt_ids", pa.list_(pa.int32())),
        pa.field("response_ids", pa.list_(pa.list_(pa.int32()))),
        pa.field("prompt_tokens", pa.int32()),  # len(prompt_ids): with ref_token_counts, a row's padded length
        pa.field("prompt_truncated", pa.bool_()),
        pa.field("response_truncated", pa.list_(pa.bool_())),
        pa.field("reject_reason", pa.string()),
        pa.field("reject_detail", pa.string()),
    ]
)


@dataclass(frozen=True)
class PreparedData:
    """Where the scored dataset lives; `manifest` holds c, counts and fingerprints."""

    folder: Path
    manifest: dict[str, Any]

    def split_path(self, split: str) -> Path:
        return self.folder / split


def ensure_ray(address: str | None = None) -> None:
    """Join `address` / $RAY_ADDRESS (as under `ray job submit`), else start a local instance."""
    import ray

    if not ray.is_initialized():
        # "local" explicitly: a stale ray_current_cluster file would make a bare ray.init() join a dead head
        ray.init(address=address or os.environ.get("RAY_ADDRESS") or "local")


def _tokenize_block(table: pa.Table, tokenizer_path: str, limits: LengthLimits) -> pa.Table:
    rows = tokenize_batch(table.to_pylist(), tokenizer_path=tokenizer_path, limits=limits)
    for row in rows:
        row["prompt_tokens"] = len(row["prompt_ids"])
    return pa.Table.from_pylist(rows, schema=TOKENIZED_SCHEMA)


def _blocks(records: list[dict[str, Any]], rows_per_block: int) -> list[pa.Table]:
    """Explicit schema: type inference would disagree across blocks (e.g. empty score lists)."""
    table = pa.Table.from_pylist(records, schema=NORMALISED_SCHEMA)
    return [table.slice(i, rows_per_block) for i in range(0, len(records), rows_per_block)]


def _settings(config: Config) -> dict[str, Any]:
    """Every preparation setting the scores depend on (part of the cache key and of the manifest)."""
    data = to_dict(config.data)
    for key in ("cache_dir", "scoring", "max_bad_fraction"):
        data.pop(key)
    data["model_dtype"] = config.model.dtype
    return data


def _percentiles(values: np.ndarray) -> dict[str, float]:
    if len(values) == 0:
        return {}
    qs = np.percentile(values, [5, 25, 50, 75, 95])
    return {"mean": float(np.mean(values)), **{f"p{q}": float(v) for q, v in zip((5, 25, 50, 75, 95), qs)}}


def _list_sum(column: pa.ChunkedArray) -> int:
    return int(pc.sum(pc.list_flatten(column)).as_py() or 0)


def _shared_objectives(records: dict[str, list[dict[str, Any]]]) -> list[str]:
    """The objective names every row scores, in score order (the order lambda is written in); [] when rows
    carry no scores. Rows that disagree are an error: one lambda cannot weight different objective sets."""
    seen: dict[tuple[str, ...], str] = {}
    for split, rows in records.items():
        for row in rows:
            seen.setdefault(tuple(row["objectives"]), f"{split} row {row['id']} ({row['source']}:{row['row']})")
    if len(seen) > 1:
        listed = "; ".join(f"{list(names)} (first at {where})" for names, where in seen.items())
        raise ValueError(f"rows score different objectives: {listed}. Set data.objectives to the names every "
                         "row must have, in the order lambda lists them")
    return list(next(iter(seen), ()))


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


def _check_raw_source(split: str, src: str) -> None:
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


def _account(rejects_path: Path, rejects: dict[str, list[Reject]], rows_in: dict[str, int],
             sources: dict[str, str], max_bad_fraction: float) -> list[Reject]:
    """The one place rejects are counted: write them all to rejects.jsonl (empty when none), then stop the run
    when they exceed max_bad_fraction of the rows read, or when a split keeps no row. Every reject is one row
    read, so rows_in = rows kept + rejects."""
    all_rejects = [r for split_rejects in rejects.values() for r in split_rejects]
    write_rejects(rejects_path, all_rejects)
    check_bad_fraction(len(all_rejects), sum(rows_in.values()), max_bad_fraction, rejects_path)
    for split, src in sources.items():
        if len(rejects[split]) >= rows_in[split]:
            raise ValueError(f"{split} data {src!r}: no usable rows ({len(rejects[split])} of {rows_in[split]} "
                             f"rejected; see {rejects_path})")
    return all_rejects


def prepare(config: Config, *, address: str | None = None, force: bool = False) -> PreparedData:
    """Validate, tokenize and reference-score `config.data`; reuse the cache when nothing changed."""
    import ray
    from ray.data import ActorPoolStrategy
    from ray.data.expressions import col

    data_cfg = config.data
    if not data_cfg.train:
        raise ValueError("data.train is empty: give a file, folder, save_to_disk folder or HF dataset name")
    model_path = resolve_model_path(config.model.name_or_path)
    sources = {split: src for split, src in (("train", data_cfg.train), ("validation", data_cfg.validation)) if src}
    for split, src in sources.items():
        _check_raw_source(split, src)
    key_parts = {
        "data": {s: mf.data_fingerprint(list_source_files(src), src) for s, src in sources.items()},
        "model": mf.model_fingerprint(model_path),
        "tokenizer": mf.tokenizer_fingerprint(model_path),
        "settings": _settings(config),
        "version": __version__,
        "scored_columns": [str(f) for f in SCORE_FIELDS],  # a new or changed score column invalidates the cache
        "layout": mf.LAYOUT,
    }
    folder = Path(data_cfg.cache_dir).expanduser() / mf.cache_key(key_parts)
    if not force:
        try:
            cached = open_cache(folder, data_cfg.max_bad_fraction)
        except mf.CacheError as err:
            print(f"[prepare] rebuilding the damaged scored cache: {err}")
            cached = None
        if cached is not None:
            print(f"[prepare] nothing changed: reusing the scored cache {folder}")
            return cached
    shutil.rmtree(folder, ignore_errors=True)
    folder.mkdir(parents=True)
    started = time.time()
    ensure_ray(address)
    limits = LengthLimits(data_cfg.max_prompt_length, data_cfg.max_response_length, data_cfg.max_length)
    scoring = data_cfg.scoring

    # 1. normalise + validate (driver); the gate runs now and after tokenization
    rejects: dict[str, list[Reject]] = {}
    rows_in: dict[str, int] = {}
    records_by_split: dict[str, list[dict[str, Any]]] = {}
    for split, src in sources.items():
        print(f"[prepare] reading and validating {split}: {src}")
        records_by_split[split], rejects[split] = read_normalised(
            src, fmt=data_cfg.format, split=data_cfg.split if split == "train" else None,
            objectives=data_cfg.objectives, score_fill=data_cfg.score_fill,
        )
        rows_in[split] = len(records_by_split[split]) + len(rejects[split])
    rejects_path = folder / mf.REJECTS_FILE
    _account(rejects_path, rejects, rows_in, sources, data_cfg.max_bad_fraction)

    # 2. tokenize (Ray tasks), materialized once so that splitting good from rejected rows does not tokenize twice
    good: dict[str, ray.data.Dataset] = {}
    for split, records in records_by_split.items():
        # small blocks: progress is reported per block and every actor of the pool gets work; but at most
        # ~2000 blocks, so huge datasets do not drown the scheduler
        n = len(records)
        rows_per_block = max(math.ceil(n / 2000), min(4 * scoring.batch_size, math.ceil(n / (4 * scoring.num_actors))))
        tokenized = ray.data.from_arrow(_blocks(records, rows_per_block)).map_batches(
            _tokenize_block, batch_format="pyarrow", batch_size=None,
            fn_kwargs={"tokenizer_path": str(model_path), "limits": limits},
        ).materialize()
        for row in tokenized.filter(expr=col("reject_reason") != "").take_all():
            rejects[split].append(Reject(row["source"], row["row"], row["reject_reason"], row["reject_detail"]))
        good[split] = tokenized.filter(expr=col("reject_reason") == "")

    objectives = _shared_objectives(records_by_split)
    all_rejects = _account(rejects_path, rejects, rows_in, sources, data_cfg.max_bad_fraction)

    # 3. reference scoring on the actor pool
    tokenizer = cached_tokenizer(str(model_path))
    staging = folder / "staging"
    for split, dataset in good.items():
        print(f"[prepare] scoring {split} with the reference model on {scoring.num_actors} actor(s)")
        dataset.map_batches(
            ReferenceScorer, batch_format="pyarrow", batch_size=scoring.batch_size,
            compute=ActorPoolStrategy(size=scoring.num_actors),
            num_cpus=scoring.num_cpus_per_actor, num_gpus=scoring.num_gpus_per_actor,
            fn_constructor_kwargs={
                "model_path": str(model_path), "pad_id": tokenizer.pad_token_id, "dtype": config.model.dtype,
                "max_chunk_mb": scoring.max_chunk_mb, "share_prompt": config.model.share_prompt,
                "trust_remote_code": config.model.trust_remote_code,
            },
        ).write_parquet(str(staging / split))

    # 4. calibrate c on train (ALGORITHMS 2.3), 5. add s(x) and write the final parquet
    # .copy(): Arrow buffers are read-only, which torch warns about when wrapping them
    train_hbar = pq.read_table(staging / "train", columns=["hbar"]).column("hbar").to_numpy().copy()
    c = calibrate_scale(train_hbar) if data_cfg.dispersion_scale == "auto" else float(data_cfg.dispersion_scale)
    splits: dict[str, Any] = {}
    for split in good:
        table = pq.read_table(staging / split).drop_columns(["reject_reason", "reject_detail"])
        table = table.sort_by("id")  # deterministic row order, whatever order the actors finished in
        s = dispersion_from_entropy(table.column("hbar").to_numpy().copy(), c).numpy()
        table = table.append_column("dispersion", pa.array(s, pa.float32()))
        (folder / split).mkdir()
        pq.write_table(table, folder / split / "part-00000.parquet")
        splits[split] = {
            "rows_in": rows_in[split],
            "rows_out": table.num_rows,
            "rejected": len(rejects[split]),
            "truncated_prompts": int(pc.sum(table.column("prompt_truncated")).as_py() or 0),
            "truncated_responses": _list_sum(table.column("response_truncated")),
            "prompt_tokens": int(pc.sum(pc.list_value_length(table.column("prompt_ids"))).as_py() or 0),
            "response_tokens": _list_sum(table.column("ref_token_counts")),
            "hbar": _percentiles(table.column("hbar").to_numpy()),
            "dispersion": _percentiles(s),
        }
    shutil.rmtree(staging)

    seconds = time.time() - started
    manifest = {
        **key_parts,
        "dispersion_scale": c,
        "tokenizer_path": str(model_path),
        "kind": pq.read_table(folder / "train", columns=["kind"]).column("kind")[0].as_py(),
        "objectives": objectives,
        "splits": splits,
        "rejects": {"count": len(all_rejects), "by_reason": summarise_rejects(all_rejects),
                    "file": str(rejects_path)},
        "seconds": round(seconds, 2),
        "rows_per_second": round(sum(rows_in.values()) / seconds, 2),
    }
    manifest = mf.write_manifest(folder, manifest)
    print(format_summary(manifest))
    return PreparedData(folder, manifest)


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
