"""README usage examples stay runnable: every `densediff` command parses and names existing
configs, and the Python snippet runs against a freshly trained tiny checkpoint."""

import re
import shlex
from pathlib import Path

import numpy as np
from PIL import Image

from densediff.cli.main import build_parser
from densediff.testing.runs import copy_run

REPO = Path(__file__).resolve().parents[1]
README = (REPO / "README.md").read_text()


def code_blocks(lang):
    return re.findall(rf"```{lang}\n(.*?)```", README, flags=re.S)


def test_readme_commands_parse_and_configs_exist():
    parser = build_parser()
    commands = [line for block in code_blocks("bash") for line in block.splitlines()
                if line.startswith(("densediff ", "torchrun "))]
    assert len(commands) >= 6
    for line in commands:
        argv = shlex.split(line.split("#")[0])
        argv = argv[argv.index("densediff.cli.main") + 1:] if argv[0] == "torchrun" else argv[1:]
        args, extra = parser.parse_known_args(argv)
        assert all("=" in e for e in extra), line
        config = getattr(args, "config", None)
        if config:
            assert (REPO / config).is_file(), f"README names a missing config: {config}"


def test_readme_python_snippet_runs(tmp_path, monkeypatch, tiny_ddp_run):
    monkeypatch.chdir(tmp_path)
    copy_run(tiny_ddp_run, tmp_path / "runs" / "gen")  # the session's tiny DDP at the README's path
    Image.fromarray(np.full((24, 30, 3), 120, np.uint8)).save("street.png")
    (snippet,) = code_blocks("python")
    scope: dict = {}
    exec(snippet, scope)
    out = scope["out"]
    assert out.mask.shape == (24, 30) and out.overlay.shape == (24, 30, 3)
    assert out.trajectory.shape == (5, 24, 30) and out.uncertainty.shape == (24, 30)
    assert scope["strip"].shape[0] == 24
    assert len(scope["outs"]) == 2 and np.array_equal(scope["outs"][0].mask, out.mask)
