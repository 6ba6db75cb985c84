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
