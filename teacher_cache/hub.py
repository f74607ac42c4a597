"""One quick question to the Hugging Face Hub before a load from it: `datasets` and
`huggingface_hub` retry an unreachable hub for half a minute or more before their error."""

from __future__ import annotations

HUB_PROBE_TIMEOUT_S = 5.0


def hub_unreachable() -> str | None:
    """Why the hub does not answer one HEAD request now (no retries), or None if it does. None
    in offline mode (HF_HUB_OFFLINE=1) too: there the libraries read their local cache and fail
    fast on their own."""
    from huggingface_hub import constants
    from huggingface_hub.utils import get_session

    if constants.is_offline_mode():
        return None
    try:
        get_session().head(constants.ENDPOINT, timeout=HUB_PROBE_TIMEOUT_S)
    except Exception as e:  # the HTTP client's errors (connect, DNS, timeout, TLS) share no base
        return (f"the hub {constants.ENDPOINT} does not answer ({e}); check the network, or set "
                f"HF_HUB_OFFLINE=1 to use what is in the local Hugging Face cache")
    return None
