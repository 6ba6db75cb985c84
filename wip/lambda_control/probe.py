"""Probe, not part of the package: does lambda conditioning control SmolLM2's generations? (issue 17)

In one process, no Ray or DeepSpeed: the embedded SmolLM2-135M-Instruct with LoRA (q/k/v/o), the demo's
training data, each step `--B` prompts under the 3 vertex lambdas (plus a Dirichlet draw with --mixed), the
library's `listwise`, `listwise_nll` and `lambda_contrast` (--xlam; wip/README.md); every
`--eval_every` steps greedy replies to the first `--eval_prompts` test prompts under each vertex, judged, with
the demo's paired bootstrap. About 9.5 s a step on 2 cores. Session 24's runs A-F are in wip/README.md, e.g.

    python wip/lambda_control/probe.py --steps 40 --lr 1.5e-3 --const --nll 2 --xlam 3 --xbeta 1 --omit_zero

(--omit_zero is now the library's rendering; without it the probe renders every objective, the old form.)
"""
import argparse, gzip, json, time, random, math, sys
import torch
from mallows_ray.models import resolve_model_path, load_model, load_tokenizer, response_stats
from mallows_ray.data.collate import pack_responses
from mallows_ray.data.tokenize import render_prompt_ids
from mallows_ray.lambdas.vectors import condition_messages
from mallows_ray.drivers.generate import generate
from mallows_ray.demo.judges import score_all, OBJECTIVES
from mallows_ray.demo.control import control_differences, controlled
from mallows_ray.losses import ListwiseInputs, lambda_contrast, listwise, listwise_nll

ap = argparse.ArgumentParser()
ap.add_argument("--steps", type=int, default=60)
ap.add_argument("--B", type=int, default=4)
ap.add_argument("--lr", type=float, default=1e-3)
ap.add_argument("--rank", type=int, default=16)
ap.add_argument("--mlp", action="store_true")
ap.add_argument("--nll", type=float, default=1.0)
ap.add_argument("--rank_w", type=float, default=1.0)
ap.add_argument("--beta", type=float, default=0.5)
ap.add_argument("--tau", type=float, default=0.1)
ap.add_argument("--eval_every", type=int, default=20)
ap.add_argument("--eval_prompts", type=int, default=32)
ap.add_argument("--mixed", action="store_true", help="add a dirichlet copy")
ap.add_argument("--xlam", type=float, default=0.0)
ap.add_argument("--xbeta", type=float, default=0.5)
ap.add_argument("--omit_zero", action="store_true")
ap.add_argument("--const", action="store_true")
ap.add_argument("--threads", type=int, default=2)
ap.add_argument("--placement", default="system", choices=["system", "prefix", "suffix"])
ap.add_argument("--seed", type=int, default=0)
args = ap.parse_args()
torch.set_num_threads(args.threads)
import mallows_ray.lambdas.vectors as L
if not args.omit_zero:  # the rendering before session 24: every objective listed
    def every_name(lam, objectives):
        values = L.lambda_vector(lam, objectives)
        return L.LAMBDA_PREFIX + ", ".join(f"{n}={v:.2f}" for n, v in zip(objectives, values))
    L.format_lambda = every_name
torch.manual_seed(args.seed)
random.seed(args.seed)

def conditioned(prompt, lam):
    """The chat with the weights line where --placement puts it (system: the library's condition_messages)."""
    if args.placement == "system":
        return condition_messages([{"role": "user", "content": prompt}], lam, objs)
    line = L.format_lambda(lam, objs)
    return [{"role": "user", "content": f"{line}\n\n{prompt}" if args.placement == "prefix" else f"{prompt}\n\n{line}"}]

objs = list(OBJECTIVES)
path = resolve_model_path("embedded:smollm2-135m-instruct")
tok = load_tokenizer(path)
model = load_model(path, torch.float32)
model.config._attn_implementation = "sdpa"
from peft import LoraConfig, get_peft_model
targets = ["q_proj", "k_proj", "v_proj", "o_proj"] + (["gate_proj", "up_proj", "down_proj"] if args.mlp else [])
model = get_peft_model(model, LoraConfig(r=args.rank, lora_alpha=2 * args.rank, target_modules=targets, lora_dropout=0.0))
base = model.base_model.model

def load(split):
    with gzip.open(f"/work/main/mallows_ray/demo/resources/listwise/{split}.jsonl.gz", "rt") as f:
        return [json.loads(l) for l in f]
train, test = load("train"), load("test")
eos = tok.eos_token_id
def resp_ids(rec):
    return [ids + [eos] for ids in tok(list(rec["responses"]), add_special_tokens=False)["input_ids"]]
vertices = [tuple(1.0 if i == k else 0.0 for i in range(3)) for k in range(3)]

def stats(m, prompts, responses):
    packed = pack_responses(prompts, responses, tok.pad_token_id, share_prompt=True)
    s = response_stats(m, **packed.model_inputs(), with_entropy=False)
    return s.logp_sum, packed.token_counts.float()

# reference log-probs on the unconditioned prompt
t0 = time.time()
ref = []
with torch.no_grad(), model.disable_adapter():
    for rec in train:
        lp, _ = stats(base, [render_prompt_ids(tok, [{"role": "user", "content": rec["prompt"]}])], [resp_ids(rec)])
        ref.append(lp)
print(f"ref scored in {time.time()-t0:.0f}s", flush=True)

params = [p for p in model.parameters() if p.requires_grad]
opt = torch.optim.AdamW(params, lr=args.lr, weight_decay=0.0)
def lr_at(step):
    warm = 2
    if step < warm: return args.lr * (step + 1) / warm
    if args.const: return args.lr
    return args.lr * 0.5 * (1 + math.cos(math.pi * (step - warm) / max(1, args.steps - warm)))

def evaluate(step):
    model.eval()
    prompts = [r["prompt"] for r in test[: args.eval_prompts]]
    scores = {}
    t = time.time()
    for k, v in enumerate(vertices):
        replies = generate(model, tok, [conditioned(p, v) for p in prompts], max_new_tokens=40, batch_size=len(prompts))
        per = [score_all(p, r) for p, r in zip(prompts, replies)]
        scores[objs[k]] = {j: [d[j] for d in per] for j in objs}
        print(f'   sample {objs[k]}: {replies[0][:100]!r} | {replies[1][:100]!r}', flush=True)
    diffs = control_differences(scores, objs)
    ok = controlled(diffs)
    line = " | ".join(f"{k}: " + ", ".join(f"{scores[v][k] and sum(scores[v][k])/len(prompts):.3f}" for v in objs) for k in objs)
    print(f"[eval step {step}] {time.time()-t:.0f}s judge means rows=vertex: {line}", flush=True)
    for k in objs:
        print(f"   {k}: " + ", ".join(f"vs {j} {d['mean']:+.3f} [{d['lo']:+.3f},{d['hi']:+.3f}]" for j, d in diffs[k].items()), flush=True)
    print(f"   controlled {ok}", flush=True)
    model.train()

order = list(range(len(train)))
random.shuffle(order)
pos = 0
model.train()
evaluate(0)
t0 = time.time()
for step in range(args.steps):
    for g in opt.param_groups: g["lr"] = lr_at(step)
    idx = []
    for _ in range(args.B):
        if pos == len(order): random.shuffle(order); pos = 0
        idx.append(order[pos]); pos += 1
    prompts, responses, lams, refs, S = [], [], [], [], []
    for i in idx:
        rec = train[i]
        lam_list = list(vertices)
        if args.mixed:
            lam_list.append(tuple(torch.distributions.Dirichlet(torch.ones(3)).sample().tolist()))
        for lam in lam_list:
            msgs = conditioned(rec["prompt"], lam)
            prompts.append(render_prompt_ids(tok, msgs)); responses.append(resp_ids(rec))
            lams.append(torch.tensor(lam)); refs.append(ref[i])
            S.append(torch.tensor([rec["scores"][k] for k in objs]))  # [K, N]
    lp, n = stats(base, prompts, responses)
    lp = lp.view(len(prompts), 4); n = n.view(len(prompts), 4)
    ref_t = torch.stack(refs).view(len(prompts), 4)
    S = torch.stack(S)  # [rows, K, N]
    lam_t = torch.stack(lams)  # [rows, K]
    target = (lam_t[:, :, None] * torch.softmax(S / args.tau, dim=-1)).sum(1)  # [rows, N]
    inputs = ListwiseInputs(lp, ref_t, n, target)
    rank_loss = listwise(inputs, beta=args.beta).losses.mean()
    nll = listwise_nll(inputs).losses.mean()
    copies = len(prompts) // args.B  # rows of one prompt, adjacent
    group = torch.arange(args.B).repeat_interleave(copies)
    xl = lambda_contrast(ListwiseInputs(lp, ref_t, n, target, group=group), beta=args.xbeta).losses.mean()
    loss = args.rank_w * rank_loss + args.nll * nll + args.xlam * xl
    opt.zero_grad(); loss.backward()
    gn = torch.nn.utils.clip_grad_norm_(params, 1.0)
    opt.step()
    if (step + 1) % 5 == 0:
        el = time.time() - t0
        print(f"step {step+1} x {xl.item():.3f} rank {rank_loss.item():.3f} nll {nll.item():.3f} gn {gn:.2f} {el/(step+1):.1f}s/step", flush=True)
    if (step + 1) % args.eval_every == 0:
        evaluate(step + 1)
