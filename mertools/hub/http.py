"""The pull's HTTP policy toward the hub, one place for all of it: timeouts, bounded retries, Retry-After, and JSON
answers read with limits.

Why our own requests for the two JSON calls a pull makes (repo info, tree listing) rather than ``HfApi``: read from
``huggingface_hub`` 2.x, its shared client has no timeout (``timeout=None``: a hub that accepts the connection and
never answers hangs the pull for ever), its pagination sleeps whatever ``Retry-After`` says plus one second (a 429
with ``Retry-After: 86400`` stalls a day) and follows ``Link: next`` without bound, and ``RepoFile(**entry)``
raises KeyError/TypeError on a field of the wrong type. The session (proxies, certificates, ``set_client_factory``)
and the headers (token, user agent) are still huggingface_hub's.

Settings, read at call time: ``MERTOOLS_HUB_TIMEOUT`` (seconds without a byte before a request is given up, default
30), ``MERTOOLS_HUB_RETRY_WAIT`` (base backoff, default 1 s, doubling, capped at 16x). A ``Retry-After`` of up to
60 s is honoured; a longer one ends the pull at once with the wait in the message.
"""

from __future__ import annotations

import json
import os
import time
from typing import Any
from urllib.parse import urlsplit

from .remote import HubError

RETRIES = 6  # attempts in a row that bring nothing new before giving up
RETRY_STATUS = {408, 429, 500, 502, 503, 504}
MAX_RETRY_AFTER = 60.0  # seconds of Retry-After honoured; a longer wait ends the pull with the wait in the message
MAX_JSON = 64 << 20  # one API answer; a page of a tree listing is about 1 MB


def _seconds(name: str, default: str, *, positive: bool) -> float:
    raw = os.environ.get(name, default)
    try:
        v = float(raw)
    except ValueError:
        v = -1.0
    if v != v or v in (float("inf"),) or v < 0 or (positive and v == 0):
        raise HubError(f"{name}={raw!r}: expected a number of seconds{' above 0' if positive else ''}")
    return v


def retry_wait() -> float:
    """Base backoff in seconds (doubles per failed attempt, capped at 16x): MERTOOLS_HUB_RETRY_WAIT, default 1."""
    return _seconds("MERTOOLS_HUB_RETRY_WAIT", "1", positive=False)


def timeout() -> float:
    """Seconds a request may wait for the connection or for the next byte: MERTOOLS_HUB_TIMEOUT, default 30."""
    return _seconds("MERTOOLS_HUB_TIMEOUT", "30", positive=True)


def backoff(attempt: int, retry_after: float | None = None) -> float:
    """Seconds to wait before attempt ``attempt + 1`` (``attempt`` >= 1 failed in a row): our backoff, or the
    hub's ``Retry-After`` where that is longer (:func:`check_retry_after` has refused one over MAX_RETRY_AFTER)."""
    wait = min(retry_wait() * 2 ** max(0, attempt - 1), retry_wait() * 16)
    if retry_after is not None:
        wait = max(wait, min(retry_after, MAX_RETRY_AFTER))
    return wait


def retry_after(headers: Any) -> float | None:
    """The ``Retry-After`` delay in seconds (the delay-seconds form; a date or junk counts as absent)."""
    v = (headers.get("Retry-After") or "").strip()
    return float(v) if v.isdigit() else None


def check_retry_after(what: str, status: int, headers: Any) -> None:
    """A hub asking to wait longer than MAX_RETRY_AFTER: say so now instead of sleeping for it."""
    ra = retry_after(headers)
    if ra is not None and ra > MAX_RETRY_AFTER:
        raise HubError(f"{what}: the hub answered HTTP {status} and asks to wait {int(ra)} s before trying again "
                       "(rate limited or busy); run the pull again after that: what was downloaded is kept")


def is_transport_error(exc: BaseException) -> bool:
    return type(exc).__module__.split(".")[0].rstrip("0123456789") in ("httpx", "httpcore", "h11")


def permanent_transport_error(exc: BaseException) -> str | None:
    """Transport errors that a retry cannot mend: a redirect loop, a redirect to another scheme, a bad URL."""
    name = type(exc).__name__
    if name == "TooManyRedirects":
        return "the hub's redirects loop (more than the limit); check HF_ENDPOINT or the proxy"
    if name in ("UnsupportedProtocol", "InvalidURL"):
        return f"the hub redirected to a URL that is not http(s) ({_first_line(exc)}); refusing to follow it"
    return None


def _first_line(exc: BaseException) -> str:
    lines = str(exc).strip().splitlines()
    return lines[0] if lines else type(exc).__name__


def same_origin(url: str, base: str) -> bool:
    a, b = urlsplit(url), urlsplit(base)
    return (a.scheme, a.hostname, a.port) == (b.scheme, b.hostname, b.port)


def get_json(url: str, what: str, *, params: dict[str, str] | None = None) -> tuple[Any, Any]:
    """GET a JSON answer from the hub: (decoded value, response headers); retried on 429/5xx and transport errors
    (bounded), size-limited, and every failure one HubError naming ``what``."""
    from huggingface_hub import get_session
    from huggingface_hub.utils import build_hf_headers

    from .remote import endpoint

    fails = 0
    while True:
        status, headers, body, problem = None, None, b"", None
        try:
            with get_session().stream("GET", url, params=params, headers=build_hf_headers(), timeout=timeout(),
                                      follow_redirects=True) as r:
                status, headers = r.status_code, r.headers
                if status in RETRY_STATUS:
                    check_retry_after(what, status, headers)
                    problem = f"HTTP {status}"
                elif status >= 400:
                    raise HubError(_status_message(what, status, headers))
                else:
                    chunks, n = [], 0
                    for b in r.iter_raw():
                        n += len(b)
                        if n > MAX_JSON:
                            raise HubError(f"{what}: the hub's answer is larger than {MAX_JSON >> 20} MiB; it is not "
                                           "what a hub sends: check HF_ENDPOINT")
                        chunks.append(b)
                    body = b"".join(chunks)
        except HubError:
            raise
        except Exception as exc:
            if not is_transport_error(exc):
                raise
            if (why := permanent_transport_error(exc)) is not None:
                raise HubError(f"{what}: {why}") from None
            problem = f"{type(exc).__name__}: {_first_line(exc)}"
        if problem is None:
            return decode_json(body, what), headers
        fails += 1
        if fails >= RETRIES:
            if problem.startswith("HTTP"):
                raise HubError(f"{what}: the hub answered {problem} {RETRIES} times in a row; try again later "
                               "(HF_HUB_OFFLINE=1 uses the local cache)")
            raise HubError(f"{what}: cannot reach {endpoint()}: {RETRIES} attempts failed ({problem}); check the "
                           "network or try again later (HF_HUB_OFFLINE=1 uses the local cache)")
        time.sleep(backoff(fails, retry_after(headers) if headers is not None else None))


def decode_json(body: bytes, what: str) -> Any:
    try:
        return json.loads(body)
    except (ValueError, RecursionError):  # RecursionError: nesting deeper than the interpreter's stack
        raise HubError(f"{what}: the hub's answer is not valid JSON; check HF_ENDPOINT (a proxy or captive portal "
                       "may be answering instead of the hub)") from None


def _status_message(what: str, status: int, headers: Any) -> str:
    from .remote import endpoint

    code = headers.get("X-Error-Code", "")
    if code == "RevisionNotFound":
        return f"{what}: revision not found; check --revision (a branch, tag or commit sha)"
    if code == "EntryNotFound":
        return f"{what}: file not found in the repo"
    if code == "GatedRepo":
        return f"{what}: the repo is gated: accept its terms on the hub, then use HF_TOKEN or `hf auth login`"
    if status in (401, 404) or code == "RepoNotFound":
        return (f"{what}: repository not found on {endpoint()} (check the id; a private repo needs HF_TOKEN or "
                "`hf auth login`)")
    if status == 403:
        return f"{what}: access denied (HTTP 403); a gated or private repo needs HF_TOKEN or `hf auth login`"
    return f"{what}: the hub answered HTTP {status}; check the repo id and HF_ENDPOINT"


def get_range(url: str, what: str, start: int, end: int) -> bytes:
    """Bytes [start, end] (inclusive) of a hub file by one range request, retried like :func:`get_json`; never
    reads more than asked, whatever the hub sends (an ignored Range gets a 200 with the whole file: only its first
    ``end + 1`` bytes are read, then the connection is dropped)."""
    from huggingface_hub import get_session
    from huggingface_hub.utils import build_hf_headers

    want = end - start + 1
    fails = 0
    while True:
        headers, problem = None, None
        try:
            h = {**build_hf_headers(), "Range": f"bytes={start}-{end}", "Accept-Encoding": "identity"}
            with get_session().stream("GET", url, headers=h, timeout=timeout(), follow_redirects=True) as r:
                headers = r.headers
                if r.status_code in RETRY_STATUS:
                    check_retry_after(what, r.status_code, headers)
                    problem = f"HTTP {r.status_code}"
                elif r.status_code >= 400:
                    raise HubError(_status_message(what, r.status_code, headers))
                elif r.status_code not in (200, 206):
                    raise HubError(f"{what}: range request answered HTTP {r.status_code}; check HF_ENDPOINT")
                else:
                    skip = start if r.status_code == 200 else 0
                    if r.status_code == 206 and not r.headers.get("Content-Range", "").strip().startswith(
                            f"bytes {start}-"):
                        raise HubError(f"{what}: asked for bytes {start}-{end}, the hub answered "
                                       f"{r.headers.get('Content-Range')!r}; check HF_ENDPOINT")
                    buf = bytearray()
                    for b in r.iter_raw():
                        if skip:
                            cut = min(skip, len(b))
                            b, skip = b[cut:], skip - cut
                        buf += b[:want - len(buf)]
                        if len(buf) >= want:
                            break
                    if len(buf) == want or (len(buf) < want and not skip and _short_ok(r, start, len(buf))):
                        return bytes(buf)
                    problem = f"{len(buf)} of {want} bytes arrived"
        except HubError:
            raise
        except Exception as exc:
            if not is_transport_error(exc):
                raise
            if (why := permanent_transport_error(exc)) is not None:
                raise HubError(f"{what}: {why}") from None
            problem = f"{type(exc).__name__}: {_first_line(exc)}"
        fails += 1
        if fails >= RETRIES:
            raise HubError(f"{what}: gave up after {RETRIES} attempts ({problem}); run it again later, or check "
                           "HF_ENDPOINT")
        time.sleep(backoff(fails, retry_after(headers) if headers is not None else None))


def _short_ok(r: Any, start: int, got: int) -> bool:
    """A range past the end of the file legitimately comes back shorter: the whole rest arrived."""
    m = (r.headers.get("Content-Range") or "").rsplit("/", 1)
    total = m[1] if len(m) == 2 else None
    if total is None or not total.strip().isdigit():
        return False
    return start + got == int(total)
