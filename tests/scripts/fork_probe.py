"""Test driver: start one test rank the way conftest does for a start method, in a world where importing transformers
probes CUDA (a fake flash-attn distribution is installed and sitecustomize records every torch.cuda.is_available call
with its PID), and print which processes probed and what the rank's ancestors were.

    python tests/scripts/fork_probe.py forkserver|spawn
"""

from __future__ import annotations

import json
import os
import sys
import tempfile
from pathlib import Path

TESTS = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(TESTS))

SITECUSTOMIZE = """
import os
import torch

_available = torch.cuda.is_available


def _probe():
    with open(os.environ["SHARDTUNE_CUDA_PROBES"], "a") as f:
        f.write(f"{os.getpid()}\\n")
    return _available()


torch.cuda.is_available = _probe
"""

REPORT = """
import json, os, sys
from pathlib import Path
from transformers import LlamaForCausalLM  # what a rank imports on its way to training
pid, ancestors = os.getpid(), []
while pid > 1:
    pid = int(Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[1])
    ancestors.append(pid)
Path(sys.argv[1]).write_text(json.dumps({"rank": os.getpid(), "ancestors": ancestors}))
"""


def fake_flash_attn(root: Path) -> None:
    """What `pip install flash-attn` leaves for transformers to find: the package and its distribution metadata."""
    (root / "flash_attn").mkdir()
    (root / "flash_attn" / "__init__.py").write_text('__version__ = "2.8.3"\n')
    info = root / "flash_attn-2.8.3.dist-info"
    info.mkdir()
    (info / "METADATA").write_text("Metadata-Version: 2.1\nName: flash-attn\nVersion: 2.8.3\n")
    (info / "top_level.txt").write_text("flash_attn\n")
    (info / "RECORD").write_text("flash_attn/__init__.py,,\n")


def main() -> int:
    method = sys.argv[1]
    work = Path(tempfile.mkdtemp(prefix="fork-probe-"))
    fake_flash_attn(work)
    (work / "sitecustomize.py").write_text(SITECUSTOMIZE)
    (work / "report.py").write_text(REPORT)
    probes = work / "probes"
    probes.touch()
    os.environ["SHARDTUNE_CUDA_PROBES"] = str(probes)
    os.environ["PYTHONPATH"] = os.pathsep.join([str(work), os.environ.get("PYTHONPATH", "")])
    import conftest

    os.environ["PYTHONPATH"] = os.pathsep.join([str(work), os.environ["PYTHONPATH"]])  # for the ranks, too
    conftest.ROOT = TESTS.parent
    result = conftest.ForkedRun([str(work / "rank.json")], script=str(work / "report.py"), start_method=method,
                                env={"PYTHONPATH": os.environ["PYTHONPATH"]}).wait(timeout=240)  # fmt: skip
    if result.returncode:
        print(result.stderr[-3000:], file=sys.stderr)
        return 1
    report = json.loads((work / "rank.json").read_text())
    report["probes"] = sorted({int(line) for line in probes.read_text().split()})
    print(json.dumps(report))
    return 0


if __name__ == "__main__":
    sys.exit(main())
