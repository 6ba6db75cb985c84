"""The preparation graph: raw preference data -> validated, tokenized, reference-scored parquet + manifest.

Every stage streams: Ray tasks and the scoring actor pool do the row work, and the stream of each stage
passes through the driver only to be written in order (`shards.ShardWriter`) and counted, a block at a time:
the driver holds counts and small aggregates, never a split.

    source units (files; a HF dataset is one unit)
      --map_batches(normalise_units)        Ray task per unit --> staging/normalised (rows + rejects)
      objective sets, formats: counted on the driver as rows pass
      duplicate ids: a hash group-by on id in Ray tasks (`stages.repeated_ids`)
      slices of the staged rows -> ScoringPool  actors started with prepare (they load the model while
                                            stage 1 runs): verdicts, tokenize, reference scores
                                            --> <split>/part-NNNNN.parquet (+ _arrow/ twins);
                                            every reject -> rejects.jsonl;
                                            sum and histogram of -log Hbar(x) -> c, percentiles
      bad-row gate (from the counts)
      --> manifest.json (written last: its presence marks a complete cache entry)

s(x) = -c log Hbar(x) is not written: c is in the manifest and readers compute s(x) from each row's Hbar(x)
(`scored_split.py`), so calibrating c costs no second pass over the data.

Every reject keeps its file and line (jsonl) or row (parquet, HF datasets); rows in = rows out + rejected,
per split. Ray Data runs with `preserve_order` and the pool returns slices in order, so the output is the
reading order (files in sorted path order, then their rows), cut into size-bounded files: the same content
and files whatever the number of actors or the order they finish in. Nothing is dropped without a line in
rejects.jsonl, which is always written (empty when no row is rejected), and `cache.gate` is the one place
the rejects of a new entry are gated. The cache entry itself (its key, reusing one, the gate, the summary in
its manifest) is `cache.py`.
"""

from __future__ import annotations

import json
import math
import shutil
import time
from contextlib import ExitStack, contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterator

import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from mallows_ray.config import Config
from mallows_ray.data import manifest as mf
from mallows_ray.data.cache import (
    PreparedData,
    check_raw_source,
    entropy_summary,
    format_summary,
    gate,
    key_parts,
    reuse,
)
from mallows_ray.data.detect import check_kinds
from mallows_ray.data.progress import PrepareProgress
from mallows_ray.data.rejects import Reject, RejectsFile
from mallows_ray.data.scoring import SCORE_FIELDS
from mallows_ray.data.scoring_pool import ScoringPool
from mallows_ray.data.shards import ShardWriter
from mallows_ray.data.sources import source_units
from mallows_ray.data.stages import REJECT_FIELDS, TOKENIZED_SCHEMA, normalise_units, repeated_ids, split_verdicts
from mallows_ray.data.tokenize import LengthLimits
from mallows_ray.losses import EntropyAggregate
from mallows_ray.models import resolve_model_path
from mallows_ray.runtime import check_local_resources, ensure_ray

# The scored split: tokenized rows (less the staging columns) + the reference's scores.
SCORED_SCHEMA = pa.schema([f for f in TOKENIZED_SCHEMA if f.name not in {"order", *(r.name for r in REJECT_FIELDS)}]
                          + SCORE_FIELDS)
REJECT_COLUMNS = ("source", "row", "reject_reason", "reject_detail", "reject_raw")  # a Reject's fields, in order
GROUP_BY_ROWS = 250_000  # ids per partition of the duplicate-id group-by
# rows per slice of the scoring stage, at most: the driver's memory grows with the slices in flight (4096-row
# blocks took its peak from 0.56 GB at 10k rows to 0.79 GB at 100k; 1024-row blocks, 0.62 GB)
MAX_BLOCK_ROWS = 1024


def _shared_objectives(first_at: dict[tuple[str, ...], str]) -> list[str]:
    """The objective names every row scores, in score order (the order lambda is written in); [] when rows
    carry no scores. `first_at`: each objective tuple the kept rows of all splits score, with where it is
    first seen. Rows that disagree are an error: one lambda cannot weight different objective sets."""
    if len(first_at) > 1:
        listed = "; ".join(f"{list(names)} (first at {where})" for names, where in first_at.items())
        raise ValueError(f"rows score different objectives: {listed}. Set data.objectives to the names every "
                         "row must have, in the order lambda lists them")
    return list(next(iter(first_at), ()))


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


def _slices(folder: Path, rows_per_block: int) -> list[dict[str, Any]]:
    """The rows of a staging folder as slices {file, start, rows} of at most `rows_per_block` rows, in stored
    order: the scoring pool's units of work."""
    return [{"file": str(file), "start": start, "rows": min(rows_per_block, rows - start)}
            for file in sorted(folder.glob("*.parquet"))
            for rows in [pq.read_metadata(file).num_rows] for start in range(0, rows, rows_per_block)]


def _rows_per_block(rows: int, scoring) -> int:
    """Rows per slice of the scoring stage: about 8 slices an actor, so that the pool stays balanced to the end
    with few calls, at least one scoring batch and at most `MAX_BLOCK_ROWS`, so a slice's memory stays small."""
    return max(scoring.batch_size, min(math.ceil(rows / (8 * scoring.num_actors)), MAX_BLOCK_ROWS))


@dataclass
class _SplitRead:
    """What the driver keeps of a split's read + normalise stage: counts and small aggregates."""

    rows_in: int = 0
    kept: int = 0  # rows that passed normalisation
    formats: dict[str, str] = field(default_factory=dict)          # source -> its format
    unit_sources: dict[int, str] = field(default_factory=dict)     # unit index -> source (for "source:row")
    objectives: dict[str, list] = field(default_factory=dict)      # listwise key -> [count, first "source:row"]


def _read_split(src: str, split_name: str | None, data_cfg, out: Path, progress: PrepareProgress) -> _SplitRead:
    """Stage 1: read + normalise every unit of `src` in Ray tasks, which write the staged rows to `out`
    (a file per unit: reading order is file name order); the driver sums their per-block summaries."""
    import ray.data

    units = source_units(src, split=split_name)
    items = [{"unit": i, **u._asdict()} for i, u in enumerate(units)]
    out.mkdir(parents=True)
    dataset = ray.data.from_items(items, override_num_blocks=len(items)).map_batches(
        normalise_units, batch_size=1, batch_format="pyarrow",
        fn_kwargs={"fmt": data_cfg.format, "objectives": data_cfg.objectives, "score_fill": data_cfg.score_fill,
                   "out_dir": str(out)})
    read = _SplitRead()
    for block in _blocks(dataset):
        for summary in block.to_pylist():
            read.unit_sources.setdefault(summary["unit"], summary["source"])
            if summary["format"] is not None:
                read.formats[summary["source"]] = summary["format"]
            if data_cfg.objectives is None:  # listwise rows must agree on their objectives: count each set
                for key, n, where in json.loads(summary["objectives"]):
                    read.objectives.setdefault(key, [0, where])[0] += n
            read.rows_in += summary["rows"]
            read.kept += summary["kept"]
            progress.add(read=summary["rows"], rejected=summary["rows"] - summary["kept"])
    return read


def _verdicts(folder: Path, read: _SplitRead, configured_objectives: list[str] | None):
    """The split-wide checks' decisions (the objective set listwise rows must score, repeated ids) as an
    ObjectRef of `SplitVerdicts`, computed in Ray tasks: a hash group-by on id over the staged rows,
    `GROUP_BY_ROWS` ids a partition (never a dict of all ids on the driver). The tasks ask for no CPU: they
    read narrow columns, and the scoring actors, which may hold every CPU, wait for them."""
    import ray

    counts, common_key = None, None
    if configured_objectives is None and len(read.objectives) > 1:
        counts = [(json.loads(key), n, where) for key, (n, where) in read.objectives.items()]
        common_key = max(read.objectives, key=lambda key: read.objectives[key][0])  # first seen among equals
    files = [str(p) for p in sorted(folder.glob("*.parquet"))]
    partitions = max(1, math.ceil(read.kept / GROUP_BY_ROWS))
    find = ray.remote(num_cpus=0)(repeated_ids)
    repeated = [find.remote(files, p, partitions, common_key) for p in range(partitions)]
    return ray.remote(num_cpus=0)(split_verdicts).remote(counts, read.unit_sources, *repeated)


def _score_split(staged: Path, out: Path, verdicts, rows: int, pool: ScoringPool, scoring,
                 rejects: RejectsFile, objectives_at: dict, progress: PrepareProgress) -> dict[str, Any]:
    """Stage 2: split-wide verdicts, tokenization and reference scoring in the actor pool; kept rows to `out`,
    the split's final folder, every reject (of every stage so far) to `rejects`, both in reading order.
    Returns the split's statistics: rows out, rejects, truncation and token counts, the aggregate of its
    Hbar(x) (for c and the percentiles), its kind."""
    writer = ShardWriter(out, SCORED_SCHEMA, random_access=True)
    stats = dict.fromkeys(("rejected", "truncated_prompts", "truncated_responses", "prompt_tokens",
                           "response_tokens"), 0)
    entropy, kind = EntropyAggregate(), None
    if rows == 0:  # nothing read: the gate stops the run ("no usable rows")
        writer.close()
        return {"rows_out": 0, **stats, "kind": kind, "entropy": entropy}
    for block in pool.map(_slices(staged, _rows_per_block(rows, scoring)), verdicts):
        bad = pc.not_equal(block.column("reject_reason"), "")
        kept = block.filter(pc.invert(bad))
        writer.write(kept)
        for row in block.filter(bad).select(list(REJECT_COLUMNS)).to_pylist():
            rejects.add(Reject(*(row[c] for c in REJECT_COLUMNS)))
            stats["rejected"] += 1
        for names, source, row in zip(*(kept.column(c).to_pylist() for c in ("objectives", "source", "row"))):
            objectives_at.setdefault(tuple(names), f"{source}:{row}")
        if kept.num_rows:
            kind = kind or kept.column("kind")[0].as_py()
            stats["truncated_prompts"] += int(pc.sum(kept.column("prompt_truncated")).as_py() or 0)
            stats["truncated_responses"] += int(pc.sum(pc.list_flatten(kept.column("response_truncated"))).as_py() or 0)
            stats["prompt_tokens"] += int(pc.sum(kept.column("prompt_tokens")).as_py() or 0)
            stats["response_tokens"] += int(pc.sum(pc.list_flatten(kept.column("ref_token_counts"))).as_py() or 0)
            entropy.add(kept.column("hbar").to_numpy())
        progress.add(scored=kept.num_rows, rejected=block.num_rows - kept.num_rows)
    writer.close()
    return {"rows_out": writer.rows, **stats, "kind": kind, "entropy": entropy}


def _leaves_a_cpu(scoring) -> bool:
    """Whether the scoring actors leave the cluster a CPU for other tasks."""
    import ray

    return scoring.num_actors * scoring.num_cpus_per_actor + 1 <= ray.cluster_resources().get("CPU", 0)


def _scoring_pool(config: Config, model_path: Path, limits: LengthLimits) -> ScoringPool:
    scoring = config.data.scoring
    check_local_resources(("data.scoring.num_actors", scoring.num_actors),
                          {"CPU": ("num_cpus_per_actor", scoring.num_cpus_per_actor),
                           "GPU": ("num_gpus_per_actor", scoring.num_gpus_per_actor)})
    return ScoringPool(
        scoring.num_actors, num_cpus=scoring.num_cpus_per_actor, num_gpus=scoring.num_gpus_per_actor,
        tokenizer_path=str(model_path), limits=limits, batch_size=scoring.batch_size, model_path=str(model_path),
        dtype=config.model.dtype, max_chunk_mb=scoring.max_chunk_mb, share_prompt=config.model.share_prompt,
        pack=config.model.pack, trust_remote_code=config.model.trust_remote_code)


def prepare(config: Config, *, address: str | None = None, force: bool = False) -> PreparedData:
    """Validate, tokenize and reference-score `config.data`; reuse the cache when nothing changed."""
    data_cfg = config.data
    if not data_cfg.train:
        raise ValueError("data.train is empty: give a file, folder, save_to_disk folder or HF dataset name")
    model_path = resolve_model_path(config.model.name_or_path)
    sources = {split: src for split, src in (("train", data_cfg.train), ("validation", data_cfg.validation)) if src}
    for split, src in sources.items():
        check_raw_source(split, src)
    key = key_parts(config, sources, model_path)
    folder = Path(data_cfg.cache_dir).expanduser() / mf.cache_key(key)
    if not force and (cached := reuse(folder, data_cfg.max_bad_fraction)) is not None:
        return cached
    shutil.rmtree(folder, ignore_errors=True)
    folder.mkdir(parents=True)
    started = time.time()
    ensure_ray(address)
    limits = LengthLimits(data_cfg.max_prompt_length, data_cfg.max_response_length, data_cfg.max_length)
    staging, rejects_path = folder / "staging", folder / mf.REJECTS_FILE
    progress = PrepareProgress()
    with _ordered_ray_data(), ExitStack() as stack:
        # the scoring actors start now, to load the model while the data is read, when they leave a CPU for the
        # read tasks (whole-CPU actors filling a small node would leave none: those start after stage 1)
        start_pool = lambda: stack.enter_context(_scoring_pool(config, model_path, limits))  # noqa: E731
        pool = start_pool() if _leaves_a_cpu(data_cfg.scoring) else None
        # 1. read + normalise (a Ray task per file)
        reads: dict[str, _SplitRead] = {}
        for split, src in sources.items():
            progress.stage(f"reading and validating {split}")
            reads[split] = _read_split(src, data_cfg.split if split == "train" else None, data_cfg,
                                       staging / "normalised" / split, progress)
            progress.end_stage()
            check_kinds(reads[split].formats)
        # 2. split-wide checks, tokenize and score (the actor pool); every reject to rejects.jsonl
        scored, objectives_at = {}, {}
        pool = pool or start_pool()
        with RejectsFile(rejects_path) as rejects:
            for split, read in reads.items():
                progress.stage(f"tokenizing and scoring {split} on {data_cfg.scoring.num_actors} actor(s)",
                               read.rows_in)
                normalised = staging / "normalised" / split
                scored[split] = _score_split(
                    normalised, folder / split, _verdicts(normalised, read, data_cfg.objectives), read.rows_in,
                    pool, data_cfg.scoring, rejects, objectives_at, progress)
                progress.end_stage()
                if scored[split]["rows_out"] + scored[split]["rejected"] != read.rows_in:
                    raise RuntimeError(f"{split}: {read.rows_in} rows read, but {scored[split]['rows_out']} kept "
                                       f"and {scored[split]['rejected']} rejected")
        # 3. the bad-row gate, from the counts
        rejected = {split: stats.pop("rejected") for split, stats in scored.items()}
        rows_in = {split: read.rows_in for split, read in reads.items()}
        gate(rejects_path, rejected, rows_in, sources, data_cfg.max_bad_fraction)
        objectives = _shared_objectives(objectives_at)

    # 4. c from train's Hbar(x) (ALGORITHMS 2.3): readers compute s(x) = -c log Hbar(x) from it
    auto = data_cfg.dispersion_scale == "auto"
    c = scored["train"]["entropy"].scale() if auto else float(data_cfg.dispersion_scale)
    splits: dict[str, Any] = {}
    train_kind = None
    for split, stats in scored.items():
        entropy = stats.pop("entropy")
        kind = stats.pop("kind")
        splits[split] = {"rows_in": rows_in[split], "rejected": rejected[split], **stats,
                         **entropy_summary(entropy, c)}
        train_kind = kind if split == "train" else train_kind
    shutil.rmtree(staging)

    seconds = time.time() - started
    manifest = {
        **key,
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

