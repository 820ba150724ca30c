"""The HTTP policy toward the hub, one place for all of it: timeouts, deadlines, bounded retries, Retry-After, and
JSON answers read with limits.

Why our own requests for the two JSON calls a pull makes (repo info, tree listing) rather than ``HfApi``: read from
``huggingface_hub`` 2.x, its shared client has no timeout (``timeout=None``: a hub that accepts the connection and
never answers hangs the pull for ever), its pagination sleeps whatever ``Retry-After`` says plus one second (a 429
with ``Retry-After: 86400`` stalls a day) and follows ``Link: next`` without bound, and ``RepoFile(**entry)``
raises KeyError/TypeError on a field of the wrong type. The session (proxies, certificates, ``set_client_factory``)
and the headers (token, user agent) are still huggingface_hub's.

Settings, read at call time: ``MERTOOLS_HUB_TIMEOUT`` (seconds without a byte before a request is given up, default
30), ``MERTOOLS_HUB_RETRY_WAIT`` (base backoff, default 1 s, doubling, capped at 16x). A ``Retry-After`` of up to
60 s is honoured; a longer one ends the command at once with the wait in the message. A JSON answer or a range read
must also be complete within DEADLINE_FACTOR x the timeout (a range read: plus one second per 64 KiB it reads), so a
hub that trickles one byte per almost-timeout cannot hold a call for ever; a late answer counts as a failed attempt
(a range read keeps what arrived and asks only for the rest next time).
"""

from __future__ import annotations

import contextlib
import email.utils
import json
import os
import re
import threading
import time
import zlib
from datetime import datetime, timezone
from typing import Any, Callable, Iterator
from urllib.parse import urlsplit

from ..errors import MertoolsError
from .remote import HubError

RETRIES = 6  # attempts in a row that bring nothing new before giving up
RETRY_STATUS = {408, 429, 500, 502, 503, 504}
MAX_RETRY_AFTER = 60.0  # seconds of Retry-After honoured; a longer wait ends the command with the wait in the message
MAX_RETRY_AFTER_SHOWN = 999_999_999  # a longer Retry-After is shown as this (it only ever ends the command)
# one API answer, decoded: a page of a tree listing is about 1 MB; 8 MB of JSON is already ~100 MB of Python objects
MAX_JSON = 8 << 20
DEADLINE_FACTOR = 4  # a whole JSON answer or range read within this many timeouts (plus RANGE_RATE's allowance)
RANGE_RATE = 64 << 10  # bytes per second a range read is allowed on top of its deadline
MIN_PROGRESS = 1 << 20  # new bytes that make a run of failed attempts count as progress (see progress_step)


class Retry(Exception):
    """One attempt failed in a way a later attempt may mend; ``wait``: the hub's Retry-After, if it sent one."""

    def __init__(self, problem: str, wait: float | None = None) -> None:
        super().__init__(problem)
        self.wait = wait


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
    """The ``Retry-After`` delay in seconds, at most MAX_RETRY_AFTER_SHOWN; junk counts as absent.

    >>> retry_after({"Retry-After": "120"}), retry_after({"Retry-After": "9" * 400}), retry_after({"Retry-After": "²"})
    (120.0, 999999999.0, None)
    """
    v = (headers.get("Retry-After") or "").strip()
    if re.fullmatch(r"[0-9]+", v, re.ASCII):  # ASCII: str.isdigit() takes "²", which float() refuses
        return float(int(v)) if len(v) <= 9 else float(MAX_RETRY_AFTER_SHOWN)
    if not v or len(v) > 64:
        return None
    try:  # the HTTP-date form
        when = email.utils.parsedate_to_datetime(v)
        if when.tzinfo is None:
            when = when.replace(tzinfo=timezone.utc)
        delay = (when - datetime.now(timezone.utc)).total_seconds()
    except (TypeError, ValueError, IndexError, OverflowError):
        return None
    return float(min(max(0.0, delay), MAX_RETRY_AFTER_SHOWN))


def check_retry_after(what: str, status: int, headers: Any, again: str = "try again after that") -> None:
    """A hub asking to wait longer than MAX_RETRY_AFTER: say so now instead of sleeping for it; ``again`` says
    what to do (the command's own words)."""
    ra = retry_after(headers)
    if ra is not None and ra > MAX_RETRY_AFTER:
        raise HubError(f"{what}: the hub answered HTTP {status} and asks to wait {int(ra)} s before trying again "
                       f"(rate limited or busy); {again}")


def is_transport_error(exc: BaseException) -> bool:
    return type(exc).__module__.split(".")[0].rstrip("0123456789") in ("httpx", "httpcore", "h11")


def permanent_transport_error(exc: BaseException) -> str | None:
    """Transport errors that a retry cannot mend: a redirect loop, a redirect to another scheme, a bad URL."""
    name = type(exc).__name__
    if name == "TooManyRedirects":
        return "the hub's redirects loop (more than the limit); check HF_ENDPOINT or the proxy"
    if name in ("UnsupportedProtocol", "InvalidURL"):
        return f"the hub redirected to a URL that is not http(s) ({first_line(exc)}); refusing to follow it"
    return None


def first_line(exc: BaseException) -> str:
    lines = str(exc).strip().splitlines()
    return lines[0] if lines else type(exc).__name__


def same_origin(url: str, base: str) -> bool:
    a, b = urlsplit(url), urlsplit(base)
    return (a.scheme, a.hostname, a.port) == (b.scheme, b.hostname, b.port)


def with_retries(what: str, once: Callable[[], Any], give_up: Callable[[str, bool], str], *,
                 progress: Callable[[], bool] | None = None, stop: threading.Event | None = None) -> Any:
    """``once()``'s value, calling it again (with backoff) while it raises :class:`Retry` or a transport error.

    Gives up with ``HubError(give_up(problem, transport))`` after RETRIES failed attempts in a row (``transport``:
    the last failure was the network's, not an answer's); ``progress()`` (asked after
    each failure) True means the attempt brought enough to reset that count. A transport error no retry can mend is
    one HubError at once; our own errors (MertoolsError) and bugs pass through. ``stop`` ends the wait between
    attempts at once (an interrupted pull must not sleep out a Retry-After).

    >>> with_retries("org/m", lambda: 42, lambda p, t: f"org/m: gave up ({p})")
    42
    """
    fails = 0
    while True:
        if stop is not None and stop.is_set():
            raise HubError(f"{what}: stopped")
        try:
            return once()
        except Retry as exc:
            problem, wait, transport = str(exc), exc.wait, False
        except MertoolsError:
            raise
        except Exception as exc:
            if not is_transport_error(exc):
                raise
            if (why := permanent_transport_error(exc)) is not None:
                raise HubError(f"{what}: {why}") from None
            problem, wait, transport = f"{type(exc).__name__}: {first_line(exc)}", None, True
        fails = 0 if progress is not None and progress() else fails + 1
        if fails >= RETRIES:
            raise HubError(give_up(problem, transport)) from None
        delay = backoff(fails, wait)
        if stop is None:
            time.sleep(delay)
        elif stop.wait(delay):
            raise HubError(f"{what}: stopped")


def retry_status(what: str, r: Any, again: str = "try again after that") -> None:
    """Raise :class:`Retry` for a status worth another attempt (a Retry-After too long is one HubError now)."""
    if r.status_code in RETRY_STATUS:
        check_retry_after(what, r.status_code, r.headers, again)
        raise Retry(f"HTTP {r.status_code}", retry_after(r.headers))


class Deadline:
    """The time one answer may take in all: per-read timeouts alone let one byte per almost-timeout go on for ever."""

    def __init__(self, what: str, extra: float = 0.0) -> None:
        self.what, self.seconds = what, DEADLINE_FACTOR * timeout() + extra
        self.end = time.monotonic() + self.seconds

    def extend(self, seconds: float) -> None:
        """Allow ``seconds`` more (a range read answered with the whole file: the prefix it skips is read too)."""
        self.seconds += seconds
        self.end += seconds

    def check(self) -> None:
        if time.monotonic() > self.end:
            raise Retry(f"the answer took longer than {self.seconds:g} s")


def _encoding(r: Any) -> str:
    return (r.headers.get("Content-Encoding") or "identity").strip().lower()


def get_json(url: str, what: str, *, params: dict[str, str] | None = None) -> tuple[Any, Any]:
    """GET a JSON answer from the hub: (decoded value, response headers); retried on 429/5xx and transport errors
    (bounded), size-limited after decompression (gzip is accepted, as CDNs send it), within a deadline, and every
    failure one HubError naming ``what``.

    >>> info, headers = get_json(f"{endpoint()}/api/models/org/m", "org/m")   # doctest: +SKIP
    """
    from huggingface_hub import get_session
    from huggingface_hub.utils import build_hf_headers

    from .remote import endpoint

    def once() -> tuple[Any, Any]:
        h = {**build_hf_headers(), "Accept-Encoding": "gzip"}  # only what we decode, bounded, below
        deadline = Deadline(what)
        with get_session().stream("GET", url, params=params, headers=h, timeout=timeout(),
                                  follow_redirects=True) as r:
            retry_status(what, r)
            if r.status_code >= 400:
                raise HubError(_status_message(what, r.status_code, r.headers))
            body = _read_json_body(r, what, deadline)
            return decode_json(body, what), r.headers

    def give_up(problem: str, transport: bool) -> str:
        if problem.startswith("HTTP"):
            return f"{what}: the hub answered {problem} {RETRIES} times in a row; try again later"
        if transport:
            return (f"{what}: cannot reach {endpoint()}: {RETRIES} attempts failed ({problem}); check the network "
                    "or HF_ENDPOINT, or try again later")
        return (f"{what}: no usable answer from {endpoint()} in {RETRIES} attempts ({problem}); try again later, or "
                "check HF_ENDPOINT or the proxy")

    return with_retries(what, once, give_up)


def _read_json_body(r: Any, what: str, deadline: Deadline) -> bytes:
    """The answer's bytes, decoded from gzip where the hub sent that; at most MAX_JSON bytes after decoding (a small
    gzip can inflate to gigabytes: the cap is applied to what decompression produces, as it produces it)."""
    enc = _encoding(r)
    if enc in ("gzip", "x-gzip"):
        z: Any = zlib.decompressobj(16 + zlib.MAX_WBITS)
    elif enc in ("", "identity"):
        z = None
    else:
        raise HubError(f"{what}: the hub sent its answer {enc[:40]}-encoded although asked for gzip or identity; "
                       "check HF_ENDPOINT or the proxy")
    too_big = HubError(f"{what}: the hub's answer is larger than {MAX_JSON >> 20} MiB; it is not what a hub sends: "
                       "check HF_ENDPOINT")
    chunks, n = [], 0
    try:
        for b in r.iter_raw():
            deadline.check()
            if z is not None:
                if z.eof:
                    if b:
                        raise zlib.error("bytes after the end of the gzip stream")
                    continue
                b = z.decompress(b, MAX_JSON + 1 - n)
                if z.unconsumed_tail:
                    raise too_big
            n += len(b)
            if n > MAX_JSON:
                raise too_big
            chunks.append(b)
        if z is not None and not z.eof:
            raise zlib.error("the gzip stream ends early")
    except zlib.error as exc:
        raise Retry(f"a broken gzip answer ({exc})") from None
    return b"".join(chunks)


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


def progress_step(size: int) -> int:
    """New bytes that make a run of failed attempts count as progress, for a transfer of ``size`` bytes: 1 MiB, or
    a RETRIES-th of a smaller transfer (so a small file cut every few KB still gets through, while a hub that sends
    one new byte per answer is still given up on).

    >>> progress_step(50 << 20), progress_step(700_000), progress_step(3)
    (1048576, 116666, 1)
    """
    return min(MIN_PROGRESS, max(1, size // RETRIES))


def get_range(url: str, what: str, start: int, end: int, *, size: int | None = None) -> bytes:
    """Bytes [start, end] (inclusive) of a hub file by range requests, retried like :func:`get_json`; never
    reads more than asked, whatever the hub sends (an ignored Range gets a 200 with the whole file: only the bytes
    up to ``end`` are read, then the connection is dropped). A failed attempt keeps what arrived and the next asks
    only for the rest; attempts that bring less than :func:`progress_step` new bytes count toward giving up.

    ``size``: the file's size as the listing gives it. An answer whose headers say otherwise (a 200's
    Content-Length, a 206's Content-Range total, or a Content-Length that is not the span its Content-Range names)
    is the hub contradicting its listing: :class:`IntegrityError` at once, no retry, as a download does. A 206
    holding fewer bytes than asked, consistently, is a short read: the rest is asked for again.

    The deadline of an attempt (:class:`Deadline`) allows RANGE_RATE for the bytes it reads: those asked for, and,
    where the hub ignored Range, the prefix of the whole file it skips (the bytes before ``start`` plus what earlier
    attempts kept). A hub that ignores Range is slow to answer a read far into a file, not wrong.

    >>> get_range(resolve_url(RepoSpec("org/m"), sha, "model.safetensors"), "org/m", 0, 7)   # doctest: +SKIP
    """
    from huggingface_hub import get_session
    from huggingface_hub.utils import build_hf_headers

    want = end - start + 1
    buf = bytearray()  # across attempts: a late or cut answer keeps what it brought
    st = {"mark": 0, "done": False}

    def once() -> bytes:
        pos = start + len(buf)
        deadline = Deadline(what, (end - pos + 1) / RANGE_RATE)  # the bytes asked this time; a 200 adds its prefix
        # identity: a range counts the file's plain bytes
        h = {**build_hf_headers(), "Range": f"bytes={pos}-{end}", "Accept-Encoding": "identity"}
        with get_session().stream("GET", url, headers=h, timeout=timeout(), follow_redirects=True) as r:
            retry_status(what, r)
            if r.status_code >= 400:
                raise HubError(_status_message(what, r.status_code, r.headers))
            if r.status_code not in (200, 206):
                raise HubError(f"{what}: range request answered HTTP {r.status_code}; check HF_ENDPOINT")
            if (enc := _encoding(r)) not in ("", "identity"):
                raise HubError(f"{what}: the hub sent it {enc[:40]}-encoded although asked for identity; a range "
                               "counts the plain bytes: check HF_ENDPOINT or the proxy")
            if r.status_code == 206 and not r.headers.get("Content-Range", "").strip().startswith(f"bytes {pos}-"):
                raise HubError(f"{what}: asked for bytes {pos}-{end}, the hub answered "
                               f"{r.headers.get('Content-Range')!r}; check HF_ENDPOINT")
            if size is not None:
                _check_range_sizes(r, what, pos, end, size)
            skip = pos if r.status_code == 200 else 0
            deadline.extend(skip / RANGE_RATE)  # the whole file from byte 0: the prefix is read and thrown away
            got = 0
            for b in r.iter_raw():
                if skip:
                    cut = min(skip, len(b))
                    b, skip = b[cut:], skip - cut
                b = b[:want - len(buf)]
                buf.extend(b)
                got += len(b)
                if len(buf) >= want:
                    break
                deadline.check()
            if len(buf) == want or (len(buf) < want and not skip and _short_ok(r, pos, got)):
                return bytes(buf)
            raise Retry(f"{len(buf)} of {want} bytes arrived")

    def progress() -> bool:
        if len(buf) - st["mark"] >= min(progress_step(want), want - st["mark"]):
            st["mark"] = len(buf)
            return True
        return False

    return with_retries(what, once, lambda problem, _: f"{what}: gave up after {RETRIES} attempts in a row that "
                        f"brought less than {progress_step(want)} new bytes ({problem}); run it again later, or check "
                        "HF_ENDPOINT", progress=progress)


def _check_range_sizes(r: Any, what: str, pos: int, end: int, size: int) -> None:
    """The answer's headers against the listed ``size`` (before a body byte is read): a 200 holds the whole file, a
    206 the asked bytes that exist, of a file of ``size`` bytes."""
    from .remote import IntegrityError

    def number(v: str | None) -> int | None:
        return int(v.strip()) if v is not None and re.fullmatch(r"\s*[0-9]{1,20}\s*", v, re.ASCII) else None

    def refuse(holds: str) -> IntegrityError:
        return IntegrityError(f"{what}: the hub's answer {holds} where its listing says the file has {size} bytes; "
                              "the hub contradicts itself: check HF_ENDPOINT or the proxy")

    length = r.headers.get("Content-Length")
    if length is not None and number(length) is None:
        raise IntegrityError(f"{what}: the hub's Content-Length {length[:40]!r} is not a number; check HF_ENDPOINT")
    n = number(length)
    if r.status_code == 200:
        if n is not None and n != size:
            raise refuse(f"holds {n} bytes of the whole file (it ignored the range)")
        return
    crange = (r.headers.get("Content-Range") or "").strip()
    total = crange.rpartition("/")[2]
    if total.strip() != "*" and number(total) != size:
        raise refuse(f"gives the file's size as {total.strip()[:40]!r}")
    # A 206 may hold fewer bytes than asked (a server or CDN that caps its answers): its Content-Length is checked
    # against the span its own Content-Range names, and the rest is a short read, asked for again. Only a span past
    # the file's end, or a length that is not the span's, is the hub contradicting itself.
    span = re.fullmatch(r"bytes\s+([0-9]{1,20})-([0-9]{1,20})/\S+", crange, re.ASCII)
    if span is None:
        if n is not None and n != min(end, size - 1) - pos + 1:
            raise refuse(f"holds {n} bytes for bytes {pos}-{end}")
        return
    first, last = int(span[1]), int(span[2])
    if last < first or last > size - 1:
        raise refuse(f"holds bytes {first}-{last}")
    if n is not None and n != last - first + 1:
        raise refuse(f"holds {n} bytes for its bytes {first}-{last}")


def _short_ok(r: Any, start: int, got: int) -> bool:
    """A range past the end of the file legitimately comes back shorter: the whole rest arrived."""
    m = (r.headers.get("Content-Range") or "").rsplit("/", 1)
    total = m[1] if len(m) == 2 else None
    if total is None or not re.fullmatch(r"[0-9]{1,20}", total.strip(), re.ASCII):
        return False
    return start + got == int(total)


@contextlib.contextmanager
def session_timeout(*, read: bool = True) -> Iterator[None]:
    """huggingface_hub's shared client with our timeout while the block runs (push's HfApi calls: create_repo,
    create_branch, create_commit, LFS uploads), then the caller's own setting back.

    The client has no timeout by default (``timeout=None``), and those calls pass none of their own. Only the
    fields the caller left unset (None) get ours: a timeout set through ``set_client_factory`` is kept. ``read``
    False leaves the read timeout unset: a commit of thousands of files may take the hub minutes to answer, and
    giving up on it would report a failure for a commit that may still land (connect, write and pool stay bounded).
    Only the client's default is changed, never the client: nothing is closed or replaced under another thread.
    Nested or concurrent blocks share the client, so the read timeout stays unset while any open block asked for
    ``read=False``; the caller's setting comes back once, when the last block ends.

    huggingface_hub closes its shared client on a connection error and makes a new one from its factory at the next
    request (``http_backoff``): while a block is open, the factory is wrapped so that a client made then gets the
    same timeout (without that, the rest of a push after one connection error ran with none), and each client a
    block touched gets its own setting back at the end. An upload huggingface_hub hands to ``hf_xet`` (a
    Xet-backed repo) does not go through this client and keeps that library's own policy (README).

    >>> with session_timeout(read=False):                                    # doctest: +SKIP
    ...     HfApi().create_commit(...)
    """
    from huggingface_hub import get_session

    seconds = timeout()
    with _client_lock(), _SCOPE_LOCK:
        if _SCOPE["depth"] == 0:  # the first block wraps the factory; the last one puts everything back
            _SCOPE["seconds"] = seconds
            _wrap_factory()
        _SCOPE["depth"] += 1
        _SCOPE["unbounded"] += 0 if read else 1
    try:
        # outside our locks: get_session takes huggingface_hub's lock and may call the factory under it
        client = get_session()
        with _SCOPE_LOCK:
            _track(client)
            _apply_scope()
        yield
    finally:
        with _client_lock(), _SCOPE_LOCK:
            _SCOPE["depth"] -= 1
            _SCOPE["unbounded"] -= 0 if read else 1
            if _SCOPE["depth"] == 0:
                for c, saved in _SCOPE["clients"]:
                    c.timeout = saved
                _SCOPE["clients"] = []
                _unwrap_factory()
                _SCOPE["seconds"] = None
            else:
                _apply_scope()


def _hf_http() -> Any:
    import importlib

    return importlib.import_module("huggingface_hub.utils._http")


def _client_lock() -> Any:
    """huggingface_hub's own lock over its factory and shared client, where the release has one: held around our
    read and write of the factory, a ``set_client_factory`` from another thread in between is not lost.

    Lock order: huggingface_hub's, then ours (_SCOPE_LOCK). ``get_session`` calls the factory with its lock held,
    and the wrapped factory takes ours: the same order, so no deadlock."""
    lock = getattr(_hf_http(), "_CLIENT_LOCK", None)
    return lock if lock is not None else contextlib.nullcontext()


def _wrap_factory() -> None:
    """(with _client_lock() and _SCOPE_LOCK held) Make clients huggingface_hub creates while blocks are open get
    our timeout. The factory is a private global of huggingface_hub: where a release has none, clients made
    mid-block are not bounded, as before this wrapper existed."""
    mod = _hf_http()
    factory = getattr(mod, "_GLOBAL_CLIENT_FACTORY", None)
    if factory is None:
        return
    # a wrapper of ours set back by the caller (set_client_factory with what it read mid-block): wrap what it wraps
    factory = getattr(factory, "_mertools_wraps", factory)
    wrapper = _scoped_factory(factory)
    _SCOPE["wrapper"] = wrapper
    mod._GLOBAL_CLIENT_FACTORY = wrapper


def _unwrap_factory() -> None:
    """(with _client_lock() and _SCOPE_LOCK held) The caller's factory back, unless the caller has set another
    meanwhile."""
    mod = _hf_http()
    wrapper = _SCOPE["wrapper"]
    if wrapper is not None and getattr(mod, "_GLOBAL_CLIENT_FACTORY", None) is wrapper:
        mod._GLOBAL_CLIENT_FACTORY = wrapper._mertools_wraps
    _SCOPE["wrapper"] = None


def _scoped_factory(factory: Callable[[], Any]) -> Callable[[], Any]:
    """``factory`` wrapped: its clients get the open blocks' timeout. The wrapper holds ``factory`` itself, never
    reads it back from the scope: another thread's ``get_session`` may have loaded the wrapper while a block was
    open and call it after the last block ended, and it must still make the client with the caller's factory
    (proxy, certificates), not huggingface_hub's default."""

    def scoped() -> Any:
        client = factory()  # the caller's factory, outside our lock
        with _SCOPE_LOCK:
            if _SCOPE["depth"] > 0:
                _track(client)
                _apply_scope()
        return client

    scoped._mertools_wraps = factory  # type: ignore[attr-defined]
    return scoped


def _track(client: Any) -> None:
    """(with _SCOPE_LOCK held) Remember ``client``'s own timeout, once, to give it back when the last block ends."""
    if all(c is not client for c, _ in _SCOPE["clients"]):
        _SCOPE["clients"].append((client, client.timeout))


def _apply_scope() -> None:
    """Set the timeout of the clients the open blocks use (call with _SCOPE_LOCK held). The read timeout is
    unset while any open block asked for ``read=False``: the client is shared, so one thread's create_commit would
    otherwise time out on the read timeout another thread's create_repo set (or keep it after that block ended)."""
    seconds = _SCOPE["seconds"]
    ours = {"connect": seconds, "write": seconds, "pool": seconds,
            "read": None if _SCOPE["unbounded"] > 0 else seconds}
    for client, saved in _SCOPE["clients"]:
        mine = {k: getattr(saved, k, None) for k in ours}
        client.timeout = type(saved)(**{k: mine[k] if mine[k] is not None else v for k, v in ours.items()})


_SCOPE_LOCK = threading.Lock()
_SCOPE: dict[str, Any] = {"depth": 0, "unbounded": 0, "seconds": None, "wrapper": None, "clients": []}
