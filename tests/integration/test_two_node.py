"""Training across nodes: `run_training` on a simulated 2-node cluster (`ray.cluster_utils.Cluster`: a head
and two worker nodes, each a real raylet with its own object store on this machine), one Ray Train worker per
worker node, so the gloo all-reduces, the DeepSpeed ZeRO-3 gathers and the dataset streaming cross raylets.

The cluster runs in a subprocess: the pytest process may hold the session's `ray.init` (the `ray_local`
fixture), which a second cluster in the same process would break. isolated_ray.py gives the subprocess its own
temp dir and token and ends everything it started, whatever happens.
"""

from __future__ import annotations

import json
import math
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest
from isolated_ray import free_ports, isolated_ray_scratch, kill_marked
from preference_data import write_jsonl as _write_jsonl
from preference_data import yes_no_pairs as _pairs
from test_train import BASE

from mallows_ray.config import load_config
from mallows_ray.typed_config import to_dict

TRAIN_ROWS = 16
STEPS = 4  # 1 epoch of 16 prompts in global batches of 2 workers x 2
# CPU counts decide placement (scaling has no custom resources per worker): a train worker needs 1.5 CPUs,
# so neither the 1-CPU head nor a 2-CPU worker node has room for two, and each worker node gets exactly one.
HEAD_CPUS, NODE_CPUS, CPUS_PER_WORKER = 1, 2, 1.5

SCRIPT = textwrap.dedent("""
    import json, sys
    import ray
    from ray._private.state import actors
    from ray.cluster_utils import Cluster
    from mallows_ray.config import from_dict, Config
    from mallows_ray.drivers.train import run_training

    config = from_dict(Config, json.loads(sys.argv[1]))
    head_cpus, node_cpus, dashboard_port, agent_port = (int(arg) for arg in sys.argv[2:6])
    # free ports instead of the fixed defaults (8265, 52365), which another Ray on the machine may hold
    cluster = Cluster(initialize_head=True, head_node_args={
        "num_cpus": head_cpus, "include_dashboard": False, "dashboard_port": dashboard_port,
        "dashboard_agent_listen_port": agent_port})
    try:
        worker_nodes = [cluster.add_node(num_cpus=node_cpus) for _ in range(2)]
        cluster.wait_for_nodes()
        ray.init(address=cluster.address)
        result = run_training(config)
        placed = [a["Address"]["NodeID"] for a in actors().values() if a["ActorClassName"] == "RayTrainWorker"]
        print("RESULT " + json.dumps({
            "history": result.history, "export": result.export_dir, "worker_node_ids": placed,
            "head_node_id": cluster.head_node.node_id, "node_ids": [n.node_id for n in worker_nodes],
        }))
    finally:
        ray.shutdown()
        cluster.shutdown()
""")


@pytest.mark.slow
def test_training_on_two_nodes_one_worker_each(tiny_model_dir):
    started = time.monotonic()
    with isolated_ray_scratch() as scratch:
        items = {**BASE, "model.name_or_path": tiny_model_dir, "data.cache_dir": scratch.folder / "cache",
                 "data.train": _write_jsonl(scratch.folder / "train.jsonl", _pairs(TRAIN_ROWS, 0)),
                 "optim.epochs": 1, "run.checkpoint_every": 2, "run.eval_every": 0,
                 "scaling.cpus_per_worker": CPUS_PER_WORKER, "data.scoring.num_actors": 1,
                 "run.storage_path": scratch.folder / "runs", "run.name": "two-node"}
        config = load_config(None, [f"{key}={value}" for key, value in items.items()])
        assert config.deepspeed.zero_stage == 3 and config.scaling.num_workers == 2
        try:
            proc = subprocess.run(
                [sys.executable, "-c", SCRIPT, json.dumps(to_dict(config)),
                 *(str(n) for n in (HEAD_CPUS, NODE_CPUS, *free_ports(2)))],
                env=scratch.env, cwd=scratch.folder, capture_output=True, text=True, timeout=900,
            )
        except subprocess.TimeoutExpired as err:
            pytest.fail(f"the 2-node run did not finish in {err.timeout} s:\n{(err.stdout or b'')[-6000:]}")
        output = proc.stdout + proc.stderr
        assert proc.returncode == 0, output[-8000:]
        result = json.loads(next(line for line in proc.stdout.splitlines() if line.startswith("RESULT "))[7:])
        assert (Path(result["export"]) / "model.safetensors").is_file()
    assert kill_marked(str(scratch.folder), grace_s=0) == 0  # the subprocess's cluster left nothing behind

    # one Ray Train worker on each worker node, none on the head
    assert sorted(result["worker_node_ids"]) == sorted(result["node_ids"])
    assert result["head_node_id"] not in result["worker_node_ids"]
    history = result["history"]
    assert [h["step"] for h in history] == list(range(1, STEPS + 1))
    assert history[0]["loss"] == pytest.approx(math.log(2), abs=1e-5)  # policy == reference at step 1
    assert history[-1]["loss"] < history[0]["loss"]
    # ZeRO-3 across the two nodes: each worker holds about half of the parameters
    assert 0.49 < history[-1]["params/local_fraction_min"] <= history[-1]["params/local_fraction_max"] < 0.52
    print(f"two-node training test: {time.monotonic() - started:.0f} s")
