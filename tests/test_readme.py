"""The README's commands run as written on a fresh clone (the suite runs each one's launcher), and whatever they write
lands in an ignored path (outputs in the checkout would make run.json report a dirty tree)."""

from __future__ import annotations

import json
import re
import shlex
import subprocess

import pytest
from conftest import ROOT

README = (ROOT / "README.md").read_text()


def commands() -> list[str]:
    """Every command line of the README's bash blocks (continuations joined, comments dropped)."""
    blocks = re.findall(r"^```bash\n(.*?)^```", README, re.M | re.S)
    joined = "\n".join(blocks).replace("\\\n", " ")
    return [line.split("  #")[0].strip() for line in joined.splitlines() if line.strip()]


def written_paths(command: str) -> list[str]:
    words = shlex.split(command.replace("[", " ").replace("]", " "))
    paths = [words[i + 1] for i, word in enumerate(words[:-1]) if word in ("--run.output_dir", "--out", "--json")]
    if "launch.export" in words:  # SOURCE DESTINATION
        paths.append([w for w in words[words.index("launch.export") + 1 :] if not w.startswith("-")][1])
    if words[0] == "sbatch":  # SCRIPT RECIPE OUTPUT_DIR [overrides]
        paths.append([w for w in words[1:] if not w.startswith("-")][2])
    return paths


def test_every_readme_command_writes_into_an_ignored_path():
    if not (ROOT / ".git").exists():
        pytest.skip("not a git checkout")
    paths = {path for command in commands() for path in written_paths(command)}
    assert {"runs/tiny-accelerate", "runs/7b-chat-export", "runs/7b"} <= paths  # the parser finds them
    inside = sorted(p for p in paths if not p.startswith("/"))
    ignored = subprocess.run(["git", "check-ignore", *inside], cwd=ROOT, capture_output=True, text=True).stdout
    assert sorted(ignored.split()) == inside


def test_plotting_several_runs_writes_beside_them_not_into_the_working_directory(tmp_path, monkeypatch):
    from launch.plot import main

    for name in ("a", "b"):
        (tmp_path / name).mkdir()
        (tmp_path / name / "metrics.jsonl").write_text(json.dumps({"step": 1, "loss": 2.0, "lr": 1e-3}) + "\n")
    work = tmp_path / "checkout"
    work.mkdir()
    monkeypatch.chdir(work)
    assert main([str(tmp_path / "a"), str(tmp_path / "b")]) == 0
    assert (tmp_path / "runs.png").stat().st_size > 0 and not list(work.iterdir())


def test_the_readmes_accelerate_cpu_command_is_the_one_the_suite_runs():
    """test_train.py runs `accelerate launch --multi_gpu --num_processes 2 -m launch.train ...` on CPU (and checks it
    trains like torchrun): the README's line launches the same way, with no flag accelerate rejects (`--cpu` beside
    `--multi_gpu` is one)."""
    (line,) = [c for c in commands() if c.startswith("accelerate launch") and "tiny" in c]
    words = shlex.split(line)
    launcher = words[: words.index("-m")]
    assert launcher == ["accelerate", "launch", "--multi_gpu", "--num_processes", "2"]
    assert words[words.index("-m") + 1] == "launch.train" and "--cpu" not in words
