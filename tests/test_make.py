"""The Makefile's install step: pip's own errors reach the terminal and fail the target (its noise filter once hid
them behind `| grep -v ... || true`), and a failed install leaves no stamp that would skip the next try."""

from __future__ import annotations

import subprocess

from conftest import ROOT
from test_gpu_check import fresh_make_env

FAILING_PIP = """#!/bin/bash
echo "WARNING: Location 'https://example.invalid' is ignored"  # the noise the filter drops
echo "ERROR: Could not find a version that satisfies the requirement ${@: -1} (from versions: none)" >&2
exit 1
"""


def test_make_install_shows_pips_error_and_fails(tmp_path):
    fake_python = tmp_path / "python3"  # `-m venv DIR` makes a venv whose pip fails as pip does
    fake_python.write_text(f"""#!/bin/bash
mkdir -p "$3/bin" && cat > "$3/bin/pip" <<'PIP'
{FAILING_PIP}PIP
chmod +x "$3/bin/pip"
""")
    fake_python.chmod(0o755)
    venv = tmp_path / "venv"
    result = subprocess.run(["make", "install", f"PYTHON={fake_python}", f"VENV={venv}"], cwd=ROOT,
                            capture_output=True, text=True, timeout=60, env=fresh_make_env())  # fmt: skip
    assert result.returncode != 0
    assert "ERROR: Could not find a version that satisfies the requirement" in result.stdout + result.stderr
    assert "is ignored" not in result.stdout + result.stderr
    assert not (venv / ".installed").exists()
