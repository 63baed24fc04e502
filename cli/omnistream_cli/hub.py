"""Fail fast without a network: decide once, quickly, whether the Hugging Face hub can be reached.

Offline, ``huggingface_hub`` and ``transformers`` spend half a minute on connection retries before saying a model is
not cached (and print a page of tracebacks). A command that may download calls :func:`prefer_offline_when_unreachable`
first: when the hub does not answer within a few seconds it switches this process to offline mode, so hub ids
resolve from the local cache at once or fail at once with the command's own message.
"""

from __future__ import annotations

import os
import socket
import sys
import threading
from urllib.parse import urlsplit

DEFAULT_ENDPOINT = "https://huggingface.co"
PROBE_TIMEOUT_S = 3.0


def hub_endpoint() -> str:
    return os.environ.get("HF_ENDPOINT") or DEFAULT_ENDPOINT


def hub_reachable(timeout_s: float = PROBE_TIMEOUT_S) -> bool:
    """Whether a TCP connection to the hub endpoint opens within ``timeout_s`` (name lookup included)."""
    url = urlsplit(hub_endpoint())
    host = url.hostname or ""
    port = url.port or (443 if url.scheme == "https" else 80)
    result: list[bool] = []

    def probe() -> None:
        try:
            with socket.create_connection((host, port), timeout=timeout_s):
                result.append(True)
        except OSError:
            result.append(False)

    # A thread bounds the name lookup too, which create_connection's timeout does not cover.
    thread = threading.Thread(target=probe, name="hub-probe", daemon=True)
    thread.start()
    thread.join(timeout_s)
    return bool(result and result[0])


def offline_mode() -> bool:
    return (os.environ.get("HF_HUB_OFFLINE") or os.environ.get("TRANSFORMERS_OFFLINE") or "").upper() in (
        "1",
        "ON",
        "YES",
        "TRUE",
    )


def prefer_offline_when_unreachable(timeout_s: float = PROBE_TIMEOUT_S) -> bool:
    """Switches this process to Hugging Face offline mode when the hub cannot be reached; returns True when the
    process is (now) offline."""
    if offline_mode():
        return True
    if hub_reachable(timeout_s):
        return False
    os.environ["HF_HUB_OFFLINE"] = "1"
    constants = sys.modules.get("huggingface_hub.constants")
    if constants is not None:  # already imported: it read the environment at import time
        constants.HF_HUB_OFFLINE = True
    return True
