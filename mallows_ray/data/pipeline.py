"""The preparation graph: raw preference data -> validated, tokenized, reference-scored parquet + manifest.

Every stage streams: Ray tasks and the scoring actor pool do the row work, and the stream of each stage
passes through the driver only to be written in order (`shards.ShardWriter`) and counted, a block at a time:
the driver holds counts and small aggregates, never a split.

    source units (files; a HF dataset is one unit)
      --map_batches(normalise_units)        Ray task per unit --> staging/normalised (rows + rejects)
      duplicate ids: Ray Data group-by on id;  objective sets, formats: counted on the driver as rows pass
      --map_batches(finalise_and_tokenize)  Ray tasks --> staging/tokenized; every reject -> rejects.jsonl
      bad-row gate (from the counts)
      --map_batches(ReferenceScorer)        actor pool --> <split>/part-NNNNN.parquet (+ .arrow twin)
                                            sum and histogram of -log Hbar(x) -> c, percentiles
      --> manifest.json (written last: its presence marks a complete cache entry)

s(x) = -c log Hbar(x) is not written: c is in the manifest and readers compute s(x) from each row's Hbar(x)
(`scored_split.py`), so calibrating c costs no second pass over the data.

Every reject keeps its file and line (jsonl) or row (parquet, HF datasets); rows in = rows out + rejected,
per split. Ray Data runs with `preserve_order`, so the output is the reading order (files in sorted path
order, then their rows), cut into size-bounded files: the same content and files whatever the number of
actors or the order they finish in. Nothing is dropped without a line in rejects.jsonl, which is always
written (empty when no row is rejected), and `_gate` is the one place rejects are gated. A reused cache
entry is checked against its manifest (sizes, SHA-256) and rebuilt when damaged, and its recorded counts go
through the bad-row gate again: `max_bad_fraction` is not part of the cache key.
"""

from __future__ import annotations

import json
import math
import os
import shutil
import time
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterator

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from mallows_ray import __version__
from mallows_ray.config import Config, to_dict
from mallows_ray.data import manifest as mf
from mallows_ray.data.formats import Reject, check_kinds, list_source_files, source_units
from mallows_ray.data.progress import PrepareProgress
from mallows_ray.data.rejects import RejectsFile, check_bad_fraction
from mallows_ray.data.scoring import SCORE_FIELDS, ReferenceScorer
from mallows_ray.data.scored_split import ScoredSplit
from mallows_ray.data.shards import ShardWriter
from mallows_ray.data.stages import (
    REJECT_FIELDS, ROW_BITS, STAGED_SCHEMA, TOKENIZED_SCHEMA, SplitVerdicts, finalise_and_tokenize, normalise_units,
)
from mallows_ray.data.tokenize import LengthLimits, cached_tokenizer
from mallows_ray.losses import EntropyAggregate
from mallows_ray.models import resolve_model_path

# The scored split: tokenized rows (less the staging columns) + the reference's scores.
SCORED_SCHEMA = pa.schema([f for f in TOKENIZED_SCHEMA if f.name not in {"order", *(r.name for r in REJECT_FIELDS)}]
                          + SCORE_FIELDS)
STAGING_GROUP_ROWS = 4096  # staging files are read in slices, never at random: large row groups
PERCENTILES = (5, 25, 50, 75, 95)


@dataclass(frozen=True)
class PreparedData:
    """Where the scored dataset lives; `manifest` holds c, counts and fingerprints."""

    folder: Path
    manifest: dict[str, Any]

    def split(self, name: str) -> ScoredSplit:
        """A scored split ("train", "validation") for reading rows by index, s(x) included."""
        return ScoredSplit(self.folder / name, self.manifest["dispersion_scale"])


def ensure_ray(address: str | None = None) -> None:
    """Join `address` / $RAY_ADDRESS (as under `ray job submit`), else start a local instance."""
    import ray

    if not ray.is_initialized():
        # "local" explicitly: a stale ray_current_cluster file would make a bare ray.init() join a dead head
        ray.init(address=address or os.environ.get("RAY_ADDRESS") or "local")


def _settings(config: Config) -> dict[str, Any]:
    """Every preparation setting the scores depend on (part of the cache key and of the manifest)."""
    data = to_dict(config.data)
    for key in ("cache_dir", "scoring", "max_bad_fraction"):
        data.pop(key)
    data["model_dtype"] = config.model.dtype
    return data


def _entropy_summary(entropy: EntropyAggregate, c: float) -> dict[str, dict[str, float]]:
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


def _shared_objectives(first_at: dict[tuple[str, ...], str]) -> list[str]:
    """The objective names every row scores, in score order (the order lambda is written in); [] when rows
    carry no scores. `first_at`: each objective tuple the kept rows of all splits score, with where it is
    first seen. Rows that disagree are an error: one lambda cannot weight different objective sets."""
    if len(first_at) > 1:
        listed = "; ".join(f"{list(names)} (first at {where})" for names, where in first_at.items())
        raise ValueError(f"rows score different objectives: {listed}. Set data.objectives to the names every "
                         "row must have, in the order lambda lists them")
    return list(next(iter(first_at), ()))


def _gate(rejects_path: Path, rejected: dict[str, int], rows_in: dict[str, int], sources: dict[str, str],
          max_bad_fraction: float) -> None:
    """The one place rejects are gated (rejects.jsonl is written by then): stop the run when they exceed
    max_bad_fraction of the rows read, or when a split keeps no row. Every reject is one row read, so
    rows_in = rows kept + rejects."""
    check_bad_fraction(sum(rejected.values()), sum(rows_in.values()), max_bad_fraction, rejects_path)
    for split, src in sources.items():
        if rejected[split] >= rows_in[split]:
            raise ValueError(f"{split} data {src!r}: no usable rows ({rejected[split]} of {rows_in[split]} "
                             f"rejected; see {rejects_path})")


@contextmanager
def _ordered_ray_data():
    """Ray Data as prepare needs it: blocks in input order (the output must not depend on which task or actor
    finishes first) and no per-operator bars (`PrepareProgress` is the display); restored afterwards."""
    import ray.data

    context = ray.data.DataContext.get_current()
    saved = context.execution_options.preserve_order, context.enable_progress_bars
    context.execution_options.preserve_order, context.enable_progress_bars = True, False
    try:
        yield
    finally:
        context.execution_options.preserve_order, context.enable_progress_bars = saved


def _blocks(dataset) -> Iterator[pa.Table]:
    """The blocks of a Ray Dataset on the driver, in order, one at a time."""
    return dataset.iter_batches(batch_size=None, batch_format="pyarrow", prefetch_batches=2)


def _read_slices(slices: pa.Table) -> Iterator[pa.Table]:
    """Ray Data UDF: rows (file, group, offset, rows) -> those rows of the staging parquet, one table each."""
    for piece in slices.to_pylist():
        group = pq.ParquetFile(piece["file"]).read_row_group(piece["group"])
        yield group.slice(piece["offset"], piece["rows"])


def _staged(folder: Path, rows_per_block: int):
    """The rows of a staging folder as a Ray Dataset of blocks of at most `rows_per_block` rows, in stored
    order (small blocks: every scoring actor gets work, and progress moves block by block)."""
    import ray.data

    slices = []
    for file in sorted(folder.glob("*.parquet")):
        metadata = pq.read_metadata(file)
        for group in range(metadata.num_row_groups):
            rows = metadata.row_group(group).num_rows
            slices += [{"file": str(file), "group": group, "offset": offset, "rows": min(rows_per_block, rows - offset)}
                       for offset in range(0, rows, rows_per_block)]
    return ray.data.from_items(slices, override_num_blocks=len(slices)).map_batches(
        _read_slices, batch_size=1, batch_format="pyarrow")


def _rows_per_block(rows: int, scoring) -> int:
    # small blocks: progress moves per block and every actor of the pool gets work; but at most ~2000 blocks,
    # so huge datasets do not drown the scheduler
    return max(math.ceil(rows / 2000), min(4 * scoring.batch_size, math.ceil(rows / (4 * scoring.num_actors))), 1)


@dataclass
class _SplitRead:
    """What the driver keeps of a split's read + normalise stage: counts and small aggregates."""

    rows_in: int = 0
    kept: int = 0  # rows that passed normalisation
    formats: dict[str, str] = field(default_factory=dict)          # source -> its format
    unit_sources: dict[int, str] = field(default_factory=dict)     # unit index -> source (for "source:row")
    objectives: dict[str, list] = field(default_factory=dict)      # listwise key -> [count, first "source:row"]


def _read_split(src: str, split_name: str | None, data_cfg, out: Path, progress: PrepareProgress) -> _SplitRead:
    """Stage 1: read + normalise every unit of `src` in Ray tasks, written in reading order to `out`."""
    import ray.data

    units = source_units(src, split=split_name)
    items = [{"unit": i, **u._asdict()} for i, u in enumerate(units)]
    dataset = ray.data.from_items(items, override_num_blocks=len(items)).map_batches(
        normalise_units, batch_size=1, batch_format="pyarrow",
        fn_kwargs={"fmt": data_cfg.format, "objectives": data_cfg.objectives, "score_fill": data_cfg.score_fill})
    read, writer = _SplitRead(), ShardWriter(out, STAGED_SCHEMA, row_group_rows=STAGING_GROUP_ROWS)
    for block in _blocks(dataset):
        writer.write(block)
        units_seen = np.asarray(block.column("order")) >> ROW_BITS
        for unit, source, fmt in zip(units_seen.tolist(), block.column("source").to_pylist(),
                                     block.column("format").to_pylist()):
            if unit not in read.unit_sources:
                read.unit_sources[unit] = source
                if fmt is not None:
                    read.formats[source] = fmt
        good = block.filter(pc.equal(block.column("reject_reason"), ""))
        if data_cfg.objectives is None:  # listwise rows must agree on their objectives: count each set
            listwise = good.filter(pc.equal(good.column("kind"), "listwise"))
            for key, source, row in zip(*(listwise.column(c).to_pylist() for c in ("objectives_key", "source", "row"))):
                read.objectives.setdefault(key, [0, f"{source}:{row}"])[0] += 1
        read.rows_in += block.num_rows
        read.kept += good.num_rows
        progress.add(read=block.num_rows, rejected=block.num_rows - good.num_rows)
    writer.close()
    return read


def _duplicate_ids(folder: Path, read: _SplitRead, common_key: str | None) -> dict[str, tuple[int, str]]:
    """{id: (order, "source:row") of its first use} for every id that more than one kept row uses: a Ray Data
    group-by over the staged rows (never a dict of all ids on the driver). Rows that the objective check
    rejects (listwise rows not scoring `common_key`) use no id."""
    import ray.data
    from ray.data.aggregate import Count, Min
    from ray.data.expressions import col

    if read.kept < 2:
        return {}

    def survivors(table: pa.Table) -> pa.Table:
        keep = pc.equal(table.column("reject_reason"), "")
        if common_key is not None:
            keep = pc.and_(keep, pc.or_(pc.not_equal(table.column("kind"), "listwise"),
                                        pc.equal(table.column("objectives_key"), common_key)))
        return table.filter(keep).select(["id", "order"])

    files = [str(p) for p in sorted(folder.glob("*.parquet"))]
    ids = ray.data.read_parquet(files).select_columns(["id", "order", "reject_reason", "kind", "objectives_key"])
    repeated = ids.map_batches(survivors, batch_format="pyarrow").groupby("id").aggregate(
        Count(alias_name="uses"), Min("order", alias_name="first")).filter(expr=col("uses") > 1)
    mask = (1 << ROW_BITS) - 1
    return {row["id"]: (row["first"], f"{read.unit_sources[row['first'] >> ROW_BITS]}:{row['first'] & mask}")
            for row in repeated.take_all()}


def _verdicts(folder: Path, read: _SplitRead, configured_objectives: list[str] | None) -> SplitVerdicts:
    """The split-wide checks' decisions: the objective set listwise rows must score, repeated ids."""
    counts, common_key = None, None
    if configured_objectives is None and len(read.objectives) > 1:
        counts = [(json.loads(key), n, where) for key, (n, where) in read.objectives.items()]
        common_key = max(read.objectives, key=lambda key: read.objectives[key][0])  # first seen among equals
    return SplitVerdicts(counts, _duplicate_ids(folder, read, common_key))


def _tokenize_split(staged: Path, out: Path, verdicts: SplitVerdicts, rows: int, model_path: Path,
                    limits: LengthLimits, scoring, rejects: RejectsFile, objectives_at: dict,
                    progress: PrepareProgress) -> int:
    """Stage 2: split-wide verdicts + tokenization in Ray tasks; kept rows to `out`, every reject (of every
    stage so far) to `rejects`, in reading order. Returns the number of rejects."""
    dataset = _staged(staged, _rows_per_block(rows, scoring)).map_batches(
        finalise_and_tokenize, batch_format="pyarrow", batch_size=None,
        fn_kwargs={"verdicts": verdicts, "tokenizer_path": str(model_path), "limits": limits})
    writer, rejected = ShardWriter(out, TOKENIZED_SCHEMA, row_group_rows=STAGING_GROUP_ROWS), 0
    for block in _blocks(dataset):
        bad = pc.not_equal(block.column("reject_reason"), "")
        kept = block.filter(pc.invert(bad))
        writer.write(kept)
        for row in block.filter(bad).select(["source", "row", "reject_reason", "reject_detail", "reject_raw"]).to_pylist():
            rejects.add(Reject(row["source"], row["row"], row["reject_reason"], row["reject_detail"], row["reject_raw"]))
            rejected += 1
        for names, source, row in zip(*(kept.column(c).to_pylist() for c in ("objectives", "source", "row"))):
            objectives_at.setdefault(tuple(names), f"{source}:{row}")
        progress.add(tokenized=kept.num_rows)
    writer.close()
    return rejected


def _score_split(staged: Path, out: Path, rows: int, config: Config, model_path: Path, pad_id: int,
                 progress: PrepareProgress) -> dict[str, Any]:
    """Stage 3: reference scoring on the actor pool, written in reading order to `out`, the split's final
    folder. Returns the split's statistics and the aggregate of its Hbar(x) (for c and the percentiles)."""
    from ray.data import ActorPoolStrategy

    scoring = config.data.scoring
    dataset = _staged(staged, _rows_per_block(rows, scoring)).map_batches(
        ReferenceScorer, batch_format="pyarrow", batch_size=scoring.batch_size,
        compute=ActorPoolStrategy(size=scoring.num_actors),
        num_cpus=scoring.num_cpus_per_actor, num_gpus=scoring.num_gpus_per_actor,
        fn_constructor_kwargs={
            "model_path": str(model_path), "pad_id": pad_id, "dtype": config.model.dtype,
            "max_chunk_mb": scoring.max_chunk_mb, "share_prompt": config.model.share_prompt,
            "trust_remote_code": config.model.trust_remote_code,
        },
    )
    writer = ShardWriter(out, SCORED_SCHEMA, random_access=True)
    stats = dict.fromkeys(("truncated_prompts", "truncated_responses", "prompt_tokens", "response_tokens"), 0)
    entropy, kind = EntropyAggregate(), None
    for block in _blocks(dataset):
        writer.write(block)
        kind = kind or block.column("kind")[0].as_py()
        stats["truncated_prompts"] += int(pc.sum(block.column("prompt_truncated")).as_py() or 0)
        stats["truncated_responses"] += int(pc.sum(pc.list_flatten(block.column("response_truncated"))).as_py() or 0)
        stats["prompt_tokens"] += int(pc.sum(block.column("prompt_tokens")).as_py() or 0)
        stats["response_tokens"] += int(pc.sum(pc.list_flatten(block.column("ref_token_counts"))).as_py() or 0)
        entropy.add(np.array(block.column("hbar"), dtype=np.float64))  # a writable copy: torch reads it
        progress.add(scored=block.num_rows)
    writer.close()
    return {"rows_out": writer.rows, **stats, "kind": kind, "entropy": entropy}


def prepare(config: Config, *, address: str | None = None, force: bool = False) -> PreparedData:
    """Validate, tokenize and reference-score `config.data`; reuse the cache when nothing changed."""
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
    staging, rejects_path = folder / "staging", folder / mf.REJECTS_FILE
    progress = PrepareProgress()
    with _ordered_ray_data():
        # 1. read + normalise (a Ray task per file)
        reads: dict[str, _SplitRead] = {}
        for split, src in sources.items():
            progress.stage(f"reading and validating {split}")
            reads[split] = _read_split(src, data_cfg.split if split == "train" else None, data_cfg,
                                       staging / "normalised" / split, progress)
            progress.end_stage()
            check_kinds(reads[split].formats)
        # 2. split-wide checks, tokenize (Ray tasks); every reject to rejects.jsonl, then the gate
        rejected, objectives_at = {}, {}
        with RejectsFile(rejects_path) as rejects:
            for split, read in reads.items():
                progress.stage(f"tokenizing {split}", read.rows_in)
                normalised = staging / "normalised" / split
                rejected[split] = _tokenize_split(
                    normalised, staging / "tokenized" / split,
                    _verdicts(normalised, read, data_cfg.objectives), read.rows_in, model_path, limits,
                    data_cfg.scoring, rejects, objectives_at, progress) if read.rows_in else 0
                progress.end_stage()
        progress.counts["rejected"] = sum(rejected.values())
        rows_in = {split: read.rows_in for split, read in reads.items()}
        _gate(rejects_path, rejected, rows_in, sources, data_cfg.max_bad_fraction)
        objectives = _shared_objectives(objectives_at)

        # 3. reference scoring on the actor pool
        pad_id = cached_tokenizer(str(model_path)).pad_token_id
        scored: dict[str, dict[str, Any]] = {}
        for split in sources:
            kept = rows_in[split] - rejected[split]
            progress.stage(f"scoring {split} with the reference model on {data_cfg.scoring.num_actors} actor(s)", kept)
            scored[split] = _score_split(staging / "tokenized" / split, folder / split, kept, config,
                                         model_path, pad_id, progress)
            progress.end_stage()
            if scored[split]["rows_out"] != kept:
                raise RuntimeError(f"{split}: {kept} rows went to scoring and {scored[split]['rows_out']} came back")

    # 4. c from train's Hbar(x) (ALGORITHMS 2.3): readers compute s(x) = -c log Hbar(x) from it
    auto = data_cfg.dispersion_scale == "auto"
    c = scored["train"]["entropy"].scale() if auto else float(data_cfg.dispersion_scale)
    splits: dict[str, Any] = {}
    train_kind = None
    for split, stats in scored.items():
        entropy = stats.pop("entropy")
        kind = stats.pop("kind")
        splits[split] = {"rows_in": rows_in[split], "rejected": rejected[split], **stats,
                         **_entropy_summary(entropy, c)}
        train_kind = kind if split == "train" else train_kind
    shutil.rmtree(staging)

    seconds = time.time() - started
    manifest = {
        **key_parts,
        "dispersion_scale": c,
        "tokenizer_path": str(model_path),
        "kind": train_kind,
        "objectives": objectives,
        "splits": splits,
        "rejects": {"count": sum(rejected.values()), "by_reason": dict(sorted(rejects.by_reason.items())),
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
