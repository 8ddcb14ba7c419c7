"""gpu-check's first step, and the list of wheels it needs (`make gpu-wheels`). Standard library only at import: it
runs on a bare image to say, in one line, what is missing.

    python tests/gpu/preflight.py cuda            one line and exit 2 unless torch sees a CUDA GPU
    python tests/gpu/preflight.py check           import everything gpu-check runs; print every distribution that
                                                  loaded, its version and where it came from (the image or the
                                                  wheels); one line and exit 2 if one is missing or older than
                                                  pyproject.toml allows
    python tests/gpu/preflight.py wheels          name==version of every distribution gpu-check needs beyond the
                                                  image (tests/gpu/image.txt): the import closure of what it runs,
                                                  with their Requires-Dist, resolved in this environment

The import closure is found by importing, not by reading code: ENTRY are the modules and scripts gpu-check loads
(pytest collects tests/gpu, which runs launch.train in ranks; gpu_throughput.py builds through the harness), and
LAZY the ones shardtune imports inside functions on those paths.
"""

from __future__ import annotations

import argparse
import builtins
import importlib
import importlib.metadata as metadata
import importlib.util
import os
import re
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
ENTRY = ["launch.train", "launch.export", "launch.plan", "launch.plot", "tests/conftest.py", "tests/gpu/test_gpu.py",
         "tests/bench/harness.py", "tests/bench/gpu_throughput.py", "tests/scripts/train_and_inspect.py",
         "pytest"]  # fmt: skip
# Imported inside functions on gpu-check's paths: DCP's filesystem writer, and (OPTIONAL: without it loss.png is not
# drawn, with a warning) the loss plot.
LAZY = ["torch.distributed.checkpoint"]
OPTIONAL = ["matplotlib.figure", "matplotlib.backends.backend_agg"]
CARRIED = {"pytest"}  # on the image, but its version is unknown: gpu-check brings its own
GPU_SITE = os.environ.get("GPU_SITE", "")


def normalize(name: str) -> str:
    return re.sub(r"[-_.]+", "-", name).lower()


def refuse(message: str) -> int:
    print(f"gpu-check: {message}", file=sys.stderr)
    return 2


def cuda() -> int:
    try:
        import torch
    except ImportError:
        return refuse(f"torch does not import in {sys.executable}; gpu-check needs the GPU image's Python")
    if not torch.cuda.is_available():
        return refuse("needs a CUDA GPU, and this machine has none (torch.cuda.is_available() is False)")
    return 0


class ImportGraph:
    """Who imports what, at the level of top-level modules, while it is installed: every `import` statement
    (`builtins.__import__`) and every first import by name (a meta-path finder that finds nothing itself)."""

    def __init__(self) -> None:
        self.edges: set[tuple[str, str]] = set()
        self.original_import = builtins.__import__

    def __enter__(self) -> ImportGraph:
        graph = self

        def recording_import(name, globals=None, locals=None, fromlist=(), level=0):
            if level == 0 and globals:
                graph.edges.add((str(globals.get("__name__", "")).split(".")[0], name.split(".")[0]))
            return graph.original_import(name, globals, locals, fromlist, level)

        class Finder:
            @staticmethod
            def find_spec(name, path=None, target=None):
                frame = sys._getframe(1)  # up to the frame whose code imports, past importlib and recording_import
                while frame is not None and (frame.f_code is recording_import.__code__ or str(
                        frame.f_globals.get("__name__", "")).startswith(("importlib", "_frozen"))):  # fmt: skip
                    frame = frame.f_back
                importer = str(frame.f_globals.get("__name__", "")) if frame is not None else ""
                graph.edges.add((importer.split(".")[0], name.split(".")[0]))
                return None

        builtins.__import__ = recording_import
        sys.meta_path.insert(0, Finder)
        self.finder = Finder
        return self

    def __exit__(self, *exc) -> None:
        builtins.__import__ = self.original_import
        sys.meta_path.remove(self.finder)


def load_entry() -> ImportGraph:
    """Import ENTRY and LAZY as gpu-check does (the repository and tests/ on sys.path); returns the import graph."""
    for path in (ROOT, ROOT / "tests", ROOT / "tests" / "bench", ROOT / "tests" / "scripts"):
        sys.path.insert(0, str(path))
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    with ImportGraph() as graph:
        for entry in ENTRY + LAZY:
            if entry.endswith(".py"):
                name = "preflight_" + Path(entry).stem
                spec = importlib.util.spec_from_file_location(name, ROOT / entry)
                module = importlib.util.module_from_spec(spec)
                sys.modules[name] = module
                spec.loader.exec_module(module)
            else:
                importlib.import_module(entry)
        graph.missing_optional = []
        for name in OPTIONAL:
            try:
                importlib.import_module(name)
            except ImportError as error:
                graph.missing_optional.append(f"{name} ({error})")
    return graph


def own_modules() -> set[str]:
    """Top-level modules loaded from the repository's own code (not from an environment or a site directory that
    happens to lie under it, such as the rehearsal's)."""
    own_dirs = tuple(str(ROOT / d) + os.sep for d in ("launch", "backbones", "fsdp", "tests"))
    own = set()
    for name, module in list(sys.modules.items()):
        if (getattr(module, "__file__", None) or "").startswith(own_dirs):
            own.add(name.split(".")[0])
    return own


def owner(top: str, owners: dict[str, list[str]]) -> str | None:
    """The distribution a loaded top-level module comes from; None for the standard library, the repository's own
    modules and namespace packages (which several distributions share)."""
    module = sys.modules.get(top)
    if top in sys.stdlib_module_names or top not in owners or getattr(module, "__file__", None) is None:
        return None
    return normalize(metadata.distribution(owners[top][0]).metadata["Name"])


def loaded_distributions() -> dict[str, metadata.Distribution]:
    """The installed distributions whose top-level modules are loaded now."""
    owners, own = metadata.packages_distributions(), own_modules()
    found = {}
    for name in list(sys.modules):
        if "." not in name and name not in own and (dist := owner(name, owners)):
            found[dist] = metadata.distribution(dist)
    return found


def floors() -> dict[str, str]:
    """pyproject.toml's lower bounds: name -> version."""
    import tomllib

    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    requirements = project["dependencies"] + [r for extra in project["optional-dependencies"].values() for r in extra]
    out = {}
    for requirement in requirements:
        match = re.match(r"^\s*([A-Za-z0-9_.\-]+)\s*(?:\[[^\]]*\])?\s*>=\s*([0-9][^,;\s]*)", requirement)
        if match:
            out[normalize(match.group(1))] = match.group(2)
    return out


def version_tuple(version: str) -> tuple:
    return tuple(int(x) for x in re.findall(r"\d+", version.split("+")[0])[:4])


def check() -> int:
    try:
        graph = load_entry()
    except ImportError as error:
        missing = getattr(error, "name", None) or str(error)
        return refuse(f"cannot import {missing} ({error}); run `make gpu-wheels` where there is network and carry "
                      ".whl/ to this machine")  # fmt: skip
    dists, minimum = loaded_distributions(), floors()
    owners = metadata.packages_distributions()
    optional = {owner(name.split(".")[0], owners) for name in OPTIONAL if name.split(".")[0] in sys.modules}
    print(f"gpu-check: Python {sys.version.split()[0]} at {sys.executable}")
    too_old = []
    for name in sorted(dists):
        dist = dists[name]
        where = "wheels" if GPU_SITE and str(dist.locate_file("")).startswith(GPU_SITE) else "image"
        floor = minimum.get(name)
        print(f"  {name:<22} {dist.version:<14} {where:<7}" + (f" (needs >= {floor})" if floor else ""))
        if floor and version_tuple(dist.version) < version_tuple(floor):
            problem = f"{name} {dist.version} is older than the {floor} pyproject.toml needs"
            if name in optional:
                print(f"  (optional) {problem}: if it fails, loss.png will not be drawn")
            else:
                too_old.append(problem)
    for missing in graph.missing_optional:
        print(f"  (optional) {missing}: loss.png will not be drawn")
    if too_old:
        return refuse(too_old[0] + "; install a newer one or carry its wheel in .whl/ (make gpu-wheels)")
    return 0


def requirements_of(dist: metadata.Distribution) -> list[str]:
    """Names of the distributions `dist` requires on the GPU image (Python 3.12, Linux x86_64, no extras)."""
    from packaging.requirements import Requirement

    environment = {"python_version": "3.12", "python_full_version": "3.12.3", "sys_platform": "linux",
                   "platform_system": "Linux", "platform_machine": "x86_64", "os_name": "posix",
                   "extra": ""}  # fmt: skip
    out = []
    for line in dist.requires or []:
        requirement = Requirement(line)
        if requirement.marker is None or requirement.marker.evaluate(environment):
            out.append(normalize(requirement.name))
    return out


def closure(names: set[str]) -> set[str]:
    """`names` and everything they require, as installed here."""
    seen, stack = set(), list(names)
    while stack:
        name = stack.pop()
        if name in seen:
            continue
        seen.add(name)
        try:
            stack += requirements_of(metadata.distribution(name))
        except metadata.PackageNotFoundError:
            continue
    return seen


def image_packages() -> set[str]:
    lines = (ROOT / "tests" / "gpu" / "image.txt").read_text().splitlines()
    return {normalize(line.split("==")[0]) for line in lines if line.strip() and not line.startswith("#")}


def needed_beyond_image(graph: ImportGraph) -> set[str]:
    """Distributions reached from the repository's modules through imports that do not pass through the image's
    distributions (the image provides those, and what they import), plus CARRIED; then their Requires-Dist closure.
    An optional import of an image package (torch trying `dill`) is the image's business, not gpu-check's."""
    owners, own = metadata.packages_distributions(), own_modules()
    provided = closure(image_packages() - CARRIED)
    needed, visited, frontier = set(CARRIED), set(), list(own)
    while frontier:
        importer = frontier.pop()
        if importer in visited:
            continue
        visited.add(importer)
        for a, b in graph.edges:
            if a == importer and b not in own and (dist := owner(b, owners)) and dist not in provided:
                needed.add(dist)
                frontier.append(b)
    return closure(needed) - provided


def wheels() -> int:
    graph = load_entry()
    for name in sorted(needed_beyond_image(graph)):
        print(f"{metadata.distribution(name).metadata['Name']}=={metadata.version(name)}")
    return 0


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("command", choices=["cuda", "check", "wheels"])
    args = parser.parse_args()
    return {"cuda": cuda, "check": check, "wheels": wheels}[args.command]()


if __name__ == "__main__":
    sys.exit(main())
