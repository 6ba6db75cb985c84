"""Probe, not part of the package: where the weights line sits, and what the BASE model does with it (issue 17).

Greedy replies of the untrained SmolLM2-135M-Instruct to the first --n test prompts under each vertex lambda,
with the weights line placed as a system message (the library's default), as a prefix of the user turn, or
as a suffix of the user turn (where jobs/build_demo_data.py put the style instructions); judged, with the
demo's paired bootstrap.

    python wip/lambda_control/zeroshot.py --n 64
"""
import argparse, gzip, json, time
import torch
from mallows_ray.models import resolve_model_path
from mallows_ray.drivers.generate import generate
from mallows_ray.export_format import load_export
from mallows_ray.lambdas.vectors import format_lambda
from mallows_ray.demo.judges import score_all, OBJECTIVES
from mallows_ray.demo.control import control_differences, controlled

ap = argparse.ArgumentParser()
ap.add_argument("--n", type=int, default=64)
ap.add_argument("--placements", default="system,prefix,suffix")
ap.add_argument("--max_new_tokens", type=int, default=40)
args = ap.parse_args()
torch.set_num_threads(2)
objs = list(OBJECTIVES)
model, tok = load_export(resolve_model_path("embedded:smollm2-135m-instruct"))[:2]
with gzip.open("mallows_ray/demo/resources/listwise/test.jsonl.gz", "rt") as f:
    prompts = [json.loads(l)["prompt"] for l in f][: args.n]
vertices = [tuple(1.0 if i == k else 0.0 for i in range(3)) for k in range(3)]

def chat(prompt, line, where):
    if where == "system":
        return [{"role": "system", "content": line}, {"role": "user", "content": prompt}]
    if where == "prefix":
        return [{"role": "user", "content": f"{line}\n\n{prompt}"}]
    return [{"role": "user", "content": f"{prompt}\n\n{line}"}]

for where in args.placements.split(","):
    t = time.time()
    scores = {}
    for k, v in enumerate(vertices):
        line = format_lambda(v, objs)
        replies = generate(model, tok, [chat(p, line, where) for p in prompts], max_new_tokens=args.max_new_tokens,
                           batch_size=len(prompts))
        per = [score_all(p, r) for p, r in zip(prompts, replies)]
        scores[objs[k]] = {j: [d[j] for d in per] for j in objs}
        print(f"  {where} {objs[k]}: {replies[0][:90]!r}", flush=True)
    diffs = control_differences(scores, objs)
    means = " | ".join(f"{j}: " + ", ".join(f"{sum(scores[v][j]) / len(prompts):.3f}" for v in objs) for j in objs)
    print(f"[{where}] {time.time() - t:.0f}s judge means (rows = vertex): {means}", flush=True)
    for j in objs:
        print(f"   {j}: " + ", ".join(f"vs {o} {d['mean']:+.3f} [{d['lo']:+.3f},{d['hi']:+.3f}]"
                                     for o, d in diffs[j].items()), flush=True)
    print(f"   controlled {controlled(diffs)}", flush=True)
