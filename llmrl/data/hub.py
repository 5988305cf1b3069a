"""Is the Hugging Face hub reachable? Asked before a hub dataset loads, because `datasets` retries
an unreachable hub with back-off for about 40 s before it gives up or falls back to its cache.
"""
from __future__ import annotations

import contextlib
import os
import socket
import threading
from collections.abc import Iterator
from urllib.parse import urlsplit

# Environment variables that switch the hub libraries to offline mode, and the values that mean on
# (the set huggingface_hub and datasets both accept).
OFFLINE_VARIABLES = ("HF_HUB_OFFLINE", "HF_DATASETS_OFFLINE")
TRUE_VALUES = {"1", "ON", "YES", "TRUE"}
PROBE_TIMEOUT_S = 2.0


def hub_offline_reason(timeout_s: float = PROBE_TIMEOUT_S) -> str | None:
    """Why the hub cannot be used now (offline mode set, or no connection to its endpoint within
    `timeout_s`), or None when it answers."""
    for variable in OFFLINE_VARIABLES:
        if os.environ.get(variable, "").upper() in TRUE_VALUES:
            return f"{variable}={os.environ[variable]}"
    endpoint = hub_endpoint()
    parts = urlsplit(endpoint)
    host = parts.hostname or endpoint
    port = parts.port or (80 if parts.scheme == "http" else 443)
    error = _connect_within(host, port, timeout_s)
    return None if error is None else f"no connection to {host}:{port}: {error}"


def hub_endpoint() -> str:
    from huggingface_hub import constants

    return constants.ENDPOINT  # HF_ENDPOINT, or https://huggingface.co


def _connect_within(host: str, port: int, timeout_s: float) -> str | None:
    """Open and close a TCP connection, name lookup included, in at most `timeout_s`: the error
    text, or None on success. The lookup has no timeout of its own, hence the thread."""
    outcome: list[str | None] = []

    def probe() -> None:
        try:
            with socket.create_connection((host, port), timeout=timeout_s):
                outcome.append(None)
        except OSError as err:
            outcome.append(err.strerror or type(err).__name__)

    thread = threading.Thread(target=probe, name="llmrl-hub-probe", daemon=True)
    thread.start()
    thread.join(timeout_s)
    return outcome[0] if outcome else f"no answer within {timeout_s:g} s"


@contextlib.contextmanager
def offline_datasets() -> Iterator[None]:
    """Within: `datasets` and `huggingface_hub` in offline mode, so a load uses the local cache
    and fails at once without it. Both read the setting from these module constants at call time
    (datasets.config.HF_HUB_OFFLINE, huggingface_hub.constants.HF_HUB_OFFLINE); the environment
    variable alone is read once, at import."""
    import datasets.config
    from huggingface_hub import constants

    saved = datasets.config.HF_HUB_OFFLINE, constants.HF_HUB_OFFLINE
    datasets.config.HF_HUB_OFFLINE = constants.HF_HUB_OFFLINE = True
    try:
        yield
    finally:
        datasets.config.HF_HUB_OFFLINE, constants.HF_HUB_OFFLINE = saved
