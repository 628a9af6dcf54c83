"""Transient Hub failures (5xx, 408, 429, connection errors and timeouts) are retried HUB_TRIES times in all,
waiting 2, 4, 8 s (a 429's Retry-After wins, up to a minute); 4xx answers (bad token, no access, invalid card)
fail at once."""
from __future__ import annotations

import sys
import time

HUB_TRIES = 4  # one call and up to three retries of a transient failure
BACKOFF_S = 2.0  # the first wait; doubled for each retry


def transient(e: BaseException) -> bool:
    """A failure worth another try: a 5xx, 408 or 429 answer, a connection error or a timeout. Never a 4xx
    (bad token, no access, invalid card) nor offline mode."""
    from huggingface_hub import errors

    if isinstance(e, errors.OfflineModeIsEnabled):
        return False
    if isinstance(e, errors.HfHubHTTPError):
        status = e.response.status_code if e.response is not None else None
        return status is not None and (status >= 500 or status in (408, 429))
    http = sys.modules.get(getattr(errors, "HTTPError", OSError).__module__)  # httpx2 (or httpx)
    transport = getattr(http, "TransportError", None)
    return isinstance(e, (ConnectionError, TimeoutError, *((transport,) if transport else ())))


def _retry_after(e: BaseException) -> float | None:
    response = getattr(e, "response", None)
    try:
        return min(60.0, float(response.headers["Retry-After"])) if response is not None else None
    except (KeyError, TypeError, ValueError):
        return None


def tries_text(e: BaseException) -> str:
    n = getattr(e, "uptrain_tries", 1)
    return f" after {n} tries" if n > 1 else ""


def _sleep(seconds: float) -> None:  # (tests replace it)
    time.sleep(seconds)


def with_retries(call, what: str):
    """call(), again after a transient failure (HUB_TRIES in all, exponential backoff); the last failure,
    or the first that is not transient, is raised with the number of tries (`uptrain_tries`)."""
    for attempt in range(1, HUB_TRIES + 1):
        try:
            return call()
        except Exception as e:
            if attempt == HUB_TRIES or not transient(e):
                e.uptrain_tries = attempt  # type: ignore[attr-defined]  # read by hub_errors
                raise
            wait = _retry_after(e) or BACKOFF_S * 2 ** (attempt - 1)
            status = getattr(getattr(e, "response", None), "status_code", None)
            print(f"{what}: {status or type(e).__name__} from the Hub; trying again in {wait:g} s (try "
                  f"{attempt + 1} of {HUB_TRIES})", file=sys.stderr, flush=True)
            _sleep(wait)
