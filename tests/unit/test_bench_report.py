"""The benchmarks' RESULTS.md table (benchmarks/report.py) from synthetic measurements: rows, targets, met flags,
causes; and run.py's plan of measurements."""

from __future__ import annotations

from benchmarks.common import Workload
from benchmarks.report import CAUSES, Measurements, render, rows
from benchmarks.run import MEASUREMENTS, measurement_plan


def _step(tokens_per_s: float, rss_mib: float = 3000.0, model_tokens_per_s: float | None = None,
          reference_forwards: int = 0) -> dict:
    """A step measurement's JSON line (step_mallows / step_trl), only the keys the report reads."""
    return {"median_tokens_per_s": tokens_per_s, "median_tokens_per_cpu_s": tokens_per_s / 2,
            "median_model_tokens_per_s": model_tokens_per_s or tokens_per_s, "peak_rss_mib": rss_mib,
            "parameters": 1e8, "reference_forwards_per_step": reference_forwards}


def _measurements(**overrides) -> Measurements:
    """Every measurement present, every target met; `overrides` replace (or, with None, fail) measurements."""
    results = {
        "matmul": {"peak_flops": 1e12},
        "step_matmuls": {"median_flops": 9e11},
        # achieved = 6 x 1e8 x 1200 = 7.2e11: 0.72 of the peak on the tokens the model ran
        "mallows_step": _step(1600.0, rss_mib=1900.0, model_tokens_per_s=1200.0),
        "mallows_step_unpacked": _step(1200.0, rss_mib=2000.0, model_tokens_per_s=800.0),
        "mallows_step_per_response": _step(900.0, rss_mib=2100.0),
        "mallows_step_compiled": {**_step(1800.0, model_tokens_per_s=1350.0), "warmup_seconds": [210.4]},
        "trl_default": _step(500.0, rss_mib=3000.0, reference_forwards=1),
        "trl_precompute": _step(600.0, rss_mib=2800.0),
        "trl_default_workers_allocator": _step(625.0, rss_mib=3100.0, reference_forwards=1),
        "pool": {"rows_per_second": 9.0},
        "scoring_loop": {"rows_per_second": 10.0, "entropy_seconds": 1.05, "logprob_seconds": 1.0},
        "chunked": {"increment_mib": 100.0},
        "naive": {"increment_mib": 400.0},
        "e2e_mallows": {"seconds": 40.0},
        "e2e_trl": {"seconds_in_process": 100.0},
    }
    results.update(overrides)
    return Measurements(machine={"cpu": "test"}, load_before="0 0 0", busy_before=0.0, workload=Workload(),
                        e2e_pairs=32, scoring_pairs=16, quick=False, invocation="python benchmarks/run.py",
                        results=results, commands={name: f"python -m benchmarks.x {name}" for name in results})


def _row(m: Measurements, prefix: str):
    """The row whose label starts with `prefix` (exactly one)."""
    found = [row for row in rows(m) if row.item.startswith(prefix)]
    assert len(found) == 1, (prefix, [row.item for row in found])
    return found[0]


def test_bench_table_rows_targets_and_met_flags():
    m = _measurements()
    table = rows(m)
    expected = {  # label start: (target, met)
        "1a. step tokens/s, mallows_ray / TRL default": (">= 3.0x", True),
        "1b. step tokens/s, mallows_ray / TRL precompute_ref_log_probs": (">= 2.5x", True),
        "1a'. tokens per CPU-second": ("(context)", None),
        "1b'. tokens per CPU-second": ("(context)", None),
        "1c. peak RSS, mallows_ray / TRL default": ("<= 0.66x", True),
        "1d. peak RSS": ("(none)", None),
        "1e. step tokens/s, mallows_ray shared prompt / one row per response": ("(optimisation pays: > 1)", True),
        "1f. step tokens/s, mallows_ray packed / unpacked": ("(optimisation pays: > 1)", True),
        "1f'. tokens per CPU-second (load-robust), packed / unpacked": ("(context)", None),
        "1g. step tokens/s, TRL default under mallows_ray's worker allocator settings": ("(context)", None),
        "1g'. step tokens/s, mallows_ray / TRL default under the same allocator settings": ("(context)", None),
        "2. achieved / fp32 matmul peak, mallows_ray packed, the default": (">= 0.65", True),
        "2. achieved / fp32 matmul peak, mallows_ray unpacked": ("(context)", None),
        "2. achieved / fp32 matmul peak, mallows_ray packed (pair-sequence tokens, 2')": ("(context)", None),
        "2. achieved / fp32 matmul peak, mallows_ray packed, model.compile": ("(context)", None),
        "1h. step tokens/s, mallows_ray with model.compile / without": ("(context)", None),
        "2. achieved / fp32 matmul peak, TRL default under the workers' allocator settings": ("(context)", None),
        "2''. the default step's linear-layer and head matmuls alone": ("(context)", None),
        "3a. reference scoring rows/s": ("(context)", None),
        "3b. scoring time": ("<= 1.10x", True),
        "3c. scoring forward peak-memory increment": ("< 1.0x", True),
        "4. prepare + 1 epoch on 32 pairs": ("<= 0.5x", True),
    }
    for prefix, (target, met) in expected.items():
        row = _row(m, prefix)
        assert (row.target, row.met, row.cause) == (target, met, ""), prefix
    assert len(table) == 12 + 8 + 4  # step rows, row 2 (x7) and its upper bound, rows 3a-3c and 4
    # 1h: the compiled step against the default one, and what compiling cost (the first step; here none recorded)
    assert _row(m, "1h.").measured == "**1.12x** (1800 vs 1600 tokens/s; first step 210 s against ?)"
    # the measurements each ratio is taken from: 1e is the shared prompt alone, 1f packing alone
    assert _row(m, "1e.").measured.startswith("**1.33x** (1200 vs 900 tokens/s)")
    assert _row(m, "1f.").measured.startswith("**1.33x** (1600 vs 1200 tokens/s)")
    assert _row(m, "1a.").measured.startswith("**3.20x** (1600 vs 500 tokens/s)")
    assert _row(m, "2. achieved / fp32 matmul peak, mallows_ray packed, the default").measured == \
        "**0.72** (720.0 of 1000.0 GFLOP/s)"
    assert _row(m, "2''.").measured == "**0.90** (900.0 of 1000.0 GFLOP/s)"
    assert "python -m benchmarks.scale" in _row(m, "3a.").item and ">= 0.9x at >= 2000 rows" in _row(m, "3a.").item
    text = render(m)
    assert "## Missed targets" not in text
    assert "| 1c. peak RSS, mallows_ray / TRL default | **0.63x** (1900 vs 3000 MiB) | <= 0.66x | yes |" in text
    assert "- trl_default_workers_allocator: `python -m benchmarks.x trl_default_workers_allocator`" in text


def test_bench_1g_rows_and_1a_target_missed_with_its_cause():
    # TRL under the workers' allocator settings: 1.25x TRL as users run it; mallows_ray 2.6x TRL default
    m = _measurements(mallows_step=_step(1300.0, rss_mib=1900.0, model_tokens_per_s=1000.0))
    g = _row(m, "1g. ")
    assert g.item == ("1g. step tokens/s, TRL default under mallows_ray's worker allocator settings / TRL default "
                      "as users run it")
    assert (g.measured, g.target, g.met) == ("**1.25x** (625 vs 500 tokens/s)", "(context)", None)
    g2 = _row(m, "1g'.")
    assert g2.item == "1g'. step tokens/s, mallows_ray / TRL default under the same allocator settings"
    assert (g2.measured, g2.target, g2.met) == ("**2.08x** (1300 vs 625 tokens/s)", "(context)", None)
    a = _row(m, "1a.")
    assert (a.measured, a.target, a.met, a.cause) == ("**2.60x** (1300 vs 500 tokens/s)", ">= 3.0x", False,
                                                       CAUSES["speed_default"])
    text = render(m)
    assert "| 1a. step tokens/s, mallows_ray / TRL default | **2.60x** (1300 vs 500 tokens/s) | >= 3.0x | **no** |" \
        in text
    missed = text.split("## Missed targets: gap and cause", 1)[1].split("## Raw figures", 1)[0]
    assert ("- 1a. step tokens/s, mallows_ray / TRL default: measured 2.60x (1300 vs 500 tokens/s), target >= 3.0x. "
            + CAUSES["speed_default"]) in missed
    assert "\n- 1g" not in missed  # context rows are never missed


def test_bench_every_target_missed_states_its_cause():
    m = _measurements(
        matmul={"peak_flops": 1e12},
        mallows_step=_step(400.0, rss_mib=3500.0, model_tokens_per_s=300.0),  # 0.18 of the peak
        mallows_step_unpacked=_step(800.0),
        mallows_step_per_response=_step(900.0),
        scoring_loop={"rows_per_second": 10.0, "entropy_seconds": 2.0, "logprob_seconds": 1.0},
        chunked={"increment_mib": 500.0},
        e2e_mallows={"seconds": 60.0},
    )
    missed = [row for row in rows(m) if row.met is False]
    causes = {row.item.split(" ", 1)[0]: row.cause for row in missed}
    assert causes == {"1a.": CAUSES["speed_default"], "1b.": CAUSES["speed_precompute"], "1c.": CAUSES["memory"],
                      "1e.": CAUSES["share_prompt"], "1f.": CAUSES["pack"], "2.": CAUSES["mfu"],
                      "3b.": CAUSES["entropy"], "3c.": CAUSES["chunked_memory"], "4.": CAUSES["end_to_end"]}
    assert all(row.cause for row in missed)
    # every row with a target can miss, and each one that does says why
    targeted = [row for row in rows(_measurements()) if row.met is not None]
    assert len(missed) == len(targeted)
    assert _row(m, "4. ").measured.startswith("**0.60x**") and _row(m, "4. ").target == "<= 0.5x"


def test_bench_row_2_threshold_is_the_issue_target():
    at = _measurements(mallows_step=_step(1600.0, model_tokens_per_s=1084.0))  # 6.504e11: 0.650
    below = _measurements(mallows_step=_step(1600.0, model_tokens_per_s=1067.0))  # 6.402e11: 0.640
    main = "2. achieved / fp32 matmul peak, mallows_ray packed, the default"
    assert _row(at, main).met is True
    row = _row(below, main)
    assert (row.met, row.cause, row.measured) == (False, CAUSES["mfu"], "**0.64** (640.2 of 1000.0 GFLOP/s)")
    # the unpacked variant is context: never missed, whatever its figure
    assert _row(below, "2. achieved / fp32 matmul peak, mallows_ray unpacked").met is None


def test_bench_failed_or_skipped_measurements_say_so():
    m = _measurements(trl_default_workers_allocator=None)
    del m.results["mallows_step_unpacked"]  # skipped: never run
    del m.results["step_matmuls"]
    for prefix in ("2''.", "1e.", "1f.", "1f'.", "1g.", "1g'.", "2. achieved / fp32 matmul peak, mallows_ray unpacked",
                   "2. achieved / fp32 matmul peak, TRL default under"):
        row = _row(m, prefix)
        assert (row.measured, row.met) == ("not measured (failed or skipped; see logs/)", None), prefix
    assert _row(m, "1a.").met is True
    assert "| trl_default_workers_allocator | 0 | FAILED |" in render(m)


def test_bench_plan_flags_and_skip_names():
    workload = Workload()
    plan = measurement_plan(workload, Workload(pairs=32), scoring_pairs=16, quick=False)
    assert set(plan) == set(MEASUREMENTS)
    base = [f"--{k}" for k in ("pairs=8", "micro-batch=2", "max-prompt-length=64", "max-response-length=64",
                               "warmup-steps=1", "measured-steps=4", "threads=2")]
    assert plan["mallows_step"] == ("step_mallows", [*base, "--pack=1"])
    assert plan["step_matmuls"] == ("step_matmuls", base)  # row 2'': the same micro-batches as mallows_step
    assert plan["mallows_step_unpacked"] == ("step_mallows", [*base, "--pack=0"])
    assert plan["mallows_step_per_response"] == ("step_mallows", [*base, "--share-prompt=0", "--pack=0"])
    assert plan["trl_default"] == ("step_trl", base)
    assert plan["trl_precompute"] == ("step_trl", [*base, "--precompute"])
    assert plan["trl_default_workers_allocator"] == ("step_trl", [*base, "--allocator=workers"])
    assert "mallows_step_packed" not in plan


def test_step_matmuls_times_every_linear_layer_of_the_body_not_the_head():
    """Row 2'' shapes: each linear layer of the body as [out, in] with its count (the head is timed apart)."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    from benchmarks.step_matmuls import linear_shapes

    config = LlamaConfig(vocab_size=97, hidden_size=32, intermediate_size=48, num_hidden_layers=3,
                         num_attention_heads=4, num_key_value_heads=2, head_dim=8)
    with torch.device("meta"):
        model = LlamaForCausalLM(config)
    assert linear_shapes(model) == {(32, 32): 6, (16, 32): 6, (48, 32): 6, (32, 48): 3}  # q, o; k, v; gate, up; down
