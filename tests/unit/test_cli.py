"""The command line: --help lists the sub-commands; config errors exit 2 with the key named."""

import subprocess
import sys


def test_help_lists_subcommands():
    out = subprocess.run([sys.executable, "-m", "mallows_ray.cli", "--help"], capture_output=True, text=True)
    assert out.returncode == 0
    for command in ("prepare", "train", "demo", "bandit"):
        assert command in out.stdout


def test_config_error_exits_2(capsys):
    from mallows_ray.cli import main

    assert main(["prepare", "data.train=x.jsonl", "data.max_lenght=3"]) == 2
    assert "unknown key data.max_lenght" in capsys.readouterr().err
    # loss parameters are validated against the registered loss's signature
    assert main(["prepare", "data.train=x.jsonl", "loss.nme=dpo"]) == 2
    assert "nme" in capsys.readouterr().err


def _cli(*args, cwd=None):
    return subprocess.run([sys.executable, "-m", "mallows_ray.cli", *args], capture_output=True, text=True, cwd=cwd)


def test_config_file_and_yaml_errors_are_one_line_and_exit_2(tmp_path):
    """No traceback: a missing --config, malformed YAML in a file or an override, NaN, a bad run.name."""
    bad = tmp_path / "bad.yaml"
    bad.write_text("optim: {lr: 1e-5\n")
    cases = [
        (["train", "--config", str(tmp_path / "missing.yaml")],
         f"config file {tmp_path / 'missing.yaml'} does not exist"),
        (["train", "--config", str(bad)], f"config file {bad} is not valid YAML"),
        (["train", "model.lora={rank: 8"], "override 'model.lora={rank: 8': the value is not valid YAML"),
        (["train", "optim.lr=.nan"], "optim.lr: nan is not a finite number"),
        (["demo", "--out", str(tmp_path / "demo"), "run.name=.."], "run.name: '..' is not a plain folder name"),
        (["demo", "--out", str(tmp_path / "demo"), "run.name="], "run.name"),
    ]
    for args, needle in cases:
        out = _cli(*args)
        assert out.returncode == 2, (args, out.stderr)
        assert needle in out.stderr and "Traceback" not in out.stderr, (args, out.stderr)
        assert len(out.stderr.strip().splitlines()) == 1, out.stderr


def test_demo_stops_on_an_earlier_run_folder_and_fresh_deletes_only_a_marked_one(tmp_path):
    """Before Ray starts: an earlier run folder stops the demo; --fresh refuses a folder mallows-ray did not make;
    nothing else is touched either way."""
    out_dir = tmp_path / "demo"
    run = out_dir / "demo"  # the demo config's run.name
    run.mkdir(parents=True)
    (run / "precious.txt").write_text("keep me")
    sibling = out_dir / "other"
    sibling.mkdir()
    stopped = _cli("demo", "--out", str(out_dir))
    assert stopped.returncode == 2 and "holds an earlier demo run" in stopped.stderr and "--fresh" in stopped.stderr
    refused = _cli("demo", "--out", str(out_dir), "--fresh")
    assert refused.returncode == 2 and "is not a run folder made by mallows-ray" in refused.stderr
    assert (run / "precious.txt").read_text() == "keep me" and sibling.is_dir()
