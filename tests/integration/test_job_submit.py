"""`ray job submit` end to end, the way a cluster user runs training: a real Ray head started with
`ray start --head` on loopback (token authentication on, free ports, its own temp dir), the tiny training job
submitted with the `ray job submit` command line and `--working-dir` the repository, followed until it
succeeds; then its export and metrics are checked. The head and everything it started are ended whatever
happens (isolated_ray.py), and neither the session's Ray nor other Ray instances on the machine are touched.
"""

from __future__ import annotations

import json
import math
import subprocess
import time
import urllib.error
import urllib.request
from pathlib import Path

import pytest
import yaml
from isolated_ray import free_ports, isolated_ray_scratch, kill_marked
from preference_data import write_jsonl as _write_jsonl
from preference_data import yes_no_pairs as _pairs
from test_train import BASE

from mallows_ray.config import load_config
from mallows_ray.typed_config import apply_override

REPO = Path(__file__).resolve().parents[2]
TRAIN_ROWS, VALIDATION_ROWS = 16, 4
STEPS = 4  # 1 epoch of 16 prompts in global batches of 2 workers x 2
JOB_TIMEOUT_S = 900


def _job_config(folder: Path, model_dir: Path) -> Path:
    """The tiny run of test_train.py (ZeRO-2, one epoch) as the YAML file a user would submit."""
    items = {**BASE, "model.name_or_path": model_dir, "data.cache_dir": folder / "cache",
             "data.train": _write_jsonl(folder / "train.jsonl", _pairs(TRAIN_ROWS, 0)),
             "data.validation": _write_jsonl(folder / "validation.jsonl", _pairs(VALIDATION_ROWS, 100)),
             "deepspeed.zero_stage": 2, "optim.epochs": 1, "run.checkpoint_every": 2, "run.eval_every": 0,
             "run.storage_path": folder / "runs", "run.name": "submitted"}
    data: dict = {}
    for key, value in items.items():
        apply_override(data, f"{key}={value}")
    path = folder / "job.yaml"
    path.write_text(yaml.safe_dump(data))
    load_config(path)  # the test's own config must be valid before a job is spent on it
    return path


def _wait_for_job_server(url: str, token: str, head: subprocess.Popen, head_log: Path, timeout_s: float = 180):
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if head.poll() is not None:
            raise RuntimeError(f"`ray start --head` exited with {head.returncode}:\n{head_log.read_text()}")
        try:
            _get(f"{url}/api/jobs/", token)
            return
        except urllib.error.HTTPError:
            raise  # the server answers but refuses the token: waiting longer will not help
        except (urllib.error.URLError, ConnectionError):
            time.sleep(1)
    raise TimeoutError(f"the job server at {url} did not answer within {timeout_s} s:\n{head_log.read_text()}")


def _get(url: str, token: str | None) -> int:
    headers = {"Authorization": f"Bearer {token}"} if token else {}
    with urllib.request.urlopen(urllib.request.Request(url, headers=headers), timeout=10) as response:
        return response.status


@pytest.mark.slow
def test_ray_job_submit_trains_and_exports(tiny_model_dir):
    started = time.monotonic()
    with isolated_ray_scratch() as scratch:
        config = _job_config(scratch.folder, tiny_model_dir)
        gcs, dashboard, client, agent = free_ports(4)
        # The job server listens on loopback only. The GCS port cannot: Ray 2.60 turns
        # --node-ip-address=127.0.0.1 into the machine's routable address, so the token is what guards it.
        head_log = scratch.folder / "head.log"
        with head_log.open("w") as log:  # Popen keeps its own descriptor
            head = subprocess.Popen(
                ["ray", "start", "--head", "--block", "--dashboard-host=127.0.0.1",
                 f"--port={gcs}", f"--dashboard-port={dashboard}", f"--ray-client-server-port={client}",
                 f"--dashboard-agent-listen-port={agent}", "--include-dashboard=true", "--num-cpus=2", "--num-gpus=0",
                 f"--object-store-memory={256 * 2**20}", f"--temp-dir={scratch.folder}", "--disable-usage-stats"],
                env=scratch.env, stdout=log, stderr=subprocess.STDOUT,
            )
        try:
            url = f"http://127.0.0.1:{dashboard}"
            token = scratch.token_file.read_text()
            _wait_for_job_server(url, token, head, head_log)
            # token authentication is on: the job API refuses a client without the token
            with pytest.raises(urllib.error.HTTPError) as refused:
                _get(f"{url}/api/jobs/", None)
            assert refused.value.code in (401, 403)

            submit = subprocess.run(
                ["ray", "job", "submit", f"--address={url}", f"--working-dir={REPO}", "--submission-id=tiny-train",
                 "--", "python", "jobs/train.py", "--config", str(config), "run.log_every=1"],
                env=scratch.env, cwd=REPO, capture_output=True, text=True, timeout=JOB_TIMEOUT_S,
            )
            logs = submit.stdout + submit.stderr
            assert submit.returncode == 0 and "Job 'tiny-train' succeeded" in logs, logs[-6000:]
            # the CLI prints one JSON line at the end: metrics, checkpoint, export folder
            summary = json.loads(next(line for line in reversed(submit.stdout.splitlines())
                                      if line.startswith('{"metrics"')))
        finally:
            head.terminate()  # `ray start --block` ends its node's processes on SIGTERM; the scratch exit does the rest
            try:
                head.wait(timeout=30)
            except subprocess.TimeoutExpired:
                pass
        # the head wrote its address into its own temp dir, not the machine's default one that a bare
        # `ray.init()` reads; the folder goes away with the scratch
        assert (scratch.folder / "ray_current_cluster").read_text().strip().endswith(f":{gcs}")
        run_dir = scratch.folder / "runs" / "submitted"
        metrics = summary["metrics"]
        assert metrics["step"] == STEPS and math.isfinite(metrics["loss"])
        assert metrics["eval/examples"] == VALIDATION_ROWS
        assert summary["export"] == str(run_dir / "export")
        assert (run_dir / "export" / "model.safetensors").is_file()
        assert (run_dir / "export" / "config.json").is_file()
        assert Path(summary["checkpoint"]).name == f"ckpt_step{STEPS:06d}" and Path(summary["checkpoint"]).is_dir()
    assert kill_marked(str(scratch.folder), grace_s=0) == 0  # nothing of the head outlived the test
    assert not scratch.folder.exists()
    print(f"ray job submit test: {time.monotonic() - started:.0f} s including head start and teardown")
