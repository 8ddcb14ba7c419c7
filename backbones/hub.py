"""Is the Hugging Face Hub reachable? Asked once, in a few seconds, before anything would wait on it: without network,
`from_pretrained` and `load_dataset` retry for close to a minute before their error."""

from __future__ import annotations

import os
import socket
import threading
from functools import lru_cache
from urllib.parse import urlparse

PROBE_SECONDS = 3.0


def hub_endpoint() -> str:
    return os.environ.get("HF_ENDPOINT", "https://huggingface.co")


@lru_cache(maxsize=1)
def hub_unreachable() -> str | None:
    """None when the Hub answers (or HF_HUB_OFFLINE is set: nothing will be asked), else why it does not."""
    if os.environ.get("HF_HUB_OFFLINE", "0").lower() in ("1", "true", "yes"):
        return None
    url = urlparse(hub_endpoint())
    port = url.port or (443 if url.scheme == "https" else 80)
    result: list[str | None] = [f"no answer within {PROBE_SECONDS:.0f} s"]

    def probe() -> None:  # in a thread: name resolution itself has no timeout
        try:
            socket.create_connection((url.hostname, port), timeout=PROBE_SECONDS).close()
            result[0] = None
        except OSError as error:
            result[0] = str(error) or type(error).__name__

    thread = threading.Thread(target=probe, daemon=True)
    thread.start()
    thread.join(PROBE_SECONDS + 0.5)
    return result[0]


def offline_advice(what: str) -> str:
    return (f"cannot reach the Hugging Face Hub at {hub_endpoint()} ({hub_unreachable()}) to get {what}; without "
            "network, point --model.path (or --data.path) at a local directory, or set HF_HUB_OFFLINE=1 to use what "
            "the Hub cache already holds")  # fmt: skip
