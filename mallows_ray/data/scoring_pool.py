"""Prepare's reference-scoring actor pool: Ray actors that start with `prepare`, import torch and transformers
and load the reference model while stage 1 reads and validates the data, then tokenize and score slices of
the staged rows; the driver takes the results in reading order.

Why not Ray Data's `ActorPoolStrategy`: its actors start only when their dataset executes, after the read
stage and the split-wide checks, so a run paid the actors' start (a process, ~5 s of imports, the model) on
top of everything else: 9 s of a 25 s prepare of 10k rows on 2 cores. Its read tasks were more processes on
the same cores, and it hands each read task's output to one actor, so the blocks had to be cut to balance
the pool. Here each actor reads its own slice (a few 256-row groups of a staging file on the shared cache),
and a slice is the unit of work, of load balance (it goes to the actor with the least unfinished work) and
of progress.
"""

from __future__ import annotations

from collections import Counter, deque
from typing import Any, Iterator

import pyarrow as pa

from mallows_ray.data.scoring import SCORE_FIELDS, ReferenceScorer
from mallows_ray.data.stages import TOKENIZED_SCHEMA, finalise_and_tokenize, read_slice
from mallows_ray.data.tokenize import LengthLimits, cached_tokenizer

QUEUED_PER_ACTOR = 2  # unfinished slices an actor holds: the next one is queued when the current one ends
HELD_PER_ACTOR = 3  # slices per actor submitted and not yet taken by the driver (bounds memory in flight)
RESTARTS = 2  # a scoring actor that dies (a lost node, OOM) is restarted and its slice retried this often


class ScoringActor:
    """One process of the pool: the split-wide verdicts and tokenization (`stages.finalise_and_tokenize`),
    then the reference scores of the rows that survive them (`ReferenceScorer`).

    Each `score` returns one row per staged row in order: the tokenized columns (`TOKENIZED_SCHEMA`) and the
    score columns (`SCORE_FIELDS`, null on rejects)."""

    def __init__(self, *, tokenizer_path: str, limits: LengthLimits, batch_size: int, **scorer_kwargs):
        # the pad id from the actor's own tokenizer: the driver then never imports transformers
        self.scorer = ReferenceScorer(**scorer_kwargs, pad_id=cached_tokenizer(tokenizer_path).pad_token_id)
        self.tokenize = dict(tokenizer_path=tokenizer_path, limits=limits)
        self.batch_size = batch_size
        self.verdicts_ref, self.verdicts = None, None

    def score(self, piece: dict[str, Any], verdicts: list) -> pa.Table:
        """`piece`: {file, start, rows} of a staging file. `verdicts`: [ObjectRef of the split's
        `stages.SplitVerdicts`], in a list so that Ray does not wait for it before the call, fetched once a
        split."""
        import ray

        if verdicts[0] != self.verdicts_ref:
            self.verdicts_ref, self.verdicts = verdicts[0], ray.get(verdicts[0])
        rows = finalise_and_tokenize(read_slice(**piece), verdicts=self.verdicts, **self.tokenize)
        table = pa.Table.from_pylist(rows, schema=TOKENIZED_SCHEMA)
        for field, column in zip(SCORE_FIELDS, self.scorer.score_columns(rows, self.batch_size)):
            table = table.append_column(field, column)
        return table


class ScoringPool:
    """`size` ScoringActors, started on construction (a context manager that kills them on exit)."""

    def __init__(self, size: int, *, num_cpus: float, num_gpus: float, **actor_kwargs):
        import ray

        remote = ray.remote(num_cpus=num_cpus, num_gpus=num_gpus, max_restarts=RESTARTS,
                            max_task_retries=RESTARTS)(ScoringActor)
        self.actors = [remote.remote(**actor_kwargs) for _ in range(size)]

    def __enter__(self) -> "ScoringPool":
        return self

    def __exit__(self, *exc) -> None:
        import ray

        for actor in self.actors:
            ray.kill(actor)

    def map(self, pieces: list[dict[str, Any]], verdicts) -> Iterator[pa.Table]:
        """Each piece's scored table (`ScoringActor.score`), in the order of `pieces`, whichever actor scored it
        and whenever it finished. `verdicts`: the ObjectRef of the split's SplitVerdicts."""
        import ray

        pending, held, finished = deque(pieces), deque(), set()  # held: (ref, actor), in piece order
        while pending or held:
            self._submit(pending, held, finished, [verdicts])
            head = held[0][0]
            while head not in finished:
                ready, _ = ray.wait([ref for ref, _ in held if ref not in finished], num_returns=1)
                finished.update(ready)
                self._submit(pending, held, finished, [verdicts])
            held.popleft()
            finished.discard(head)
            yield ray.get(head)

    def _submit(self, pending: deque, held: deque, finished: set, verdicts: list) -> None:
        """Give pending pieces to the actors with the least unfinished work, within the queue and memory caps."""
        load = Counter(actor for ref, actor in held if ref not in finished)
        while pending and len(held) < HELD_PER_ACTOR * len(self.actors):
            actor = min(range(len(self.actors)), key=lambda a: load[a])
            if load[actor] >= QUEUED_PER_ACTOR:
                return
            held.append((self.actors[actor].score.remote(pending.popleft(), verdicts), actor))
            load[actor] += 1
