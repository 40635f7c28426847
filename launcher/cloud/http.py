"""JSON over HTTP for the provider clients, and where their API keys come from.

Why one client: both providers want the same care. Every call has a timeout; calls are paced at the
provider's documented request rate (catalog/providers.yaml `request_interval_s`: Lambda 1/s); 429 (honouring
Retry-After, else waiting at least `rate_limited_wait_s`: Lambda documents no Retry-After), 5xx and network
errors are retried a bounded number of times with exponential backoff and jitter; other 4xx are never
retried; errors carry the provider's own message (RunPod problem+json, Lambda {"error": {...}}); and the
API key, sent as `Authorization: Bearer <key>`, never reaches an exception, a repr or a log line.

A POST is not repeated after a 5xx or a lost response unless the caller says it is idempotent: RunPod
can answer 5xx yet create (and bill) the pod, so creates look themselves up by name instead (see
`create_once`). 429s and refused connections are always safe to retry: nothing was done.

Keys come from launcher.cloud.credentials.
"""

from __future__ import annotations

import json as jsonlib
import logging
import random
import time
from typing import Any, Callable, TypeVar

import httpx

from launcher.cloud.base import AuthError, ProviderError, provider_message, scrub
from launcher.cloud.credentials import base_url
from launcher.spec.catalog import provider_facts

log = logging.getLogger("ftl.providers")

TIMEOUT_S = 15.0  # per HTTP call (connect + each read)
ATTEMPTS = 4  # first try + 3 retries
BACKOFF_S = 1.0  # first wait; doubled each retry, with +-50% jitter
BACKOFF_CAP_S = 30.0
RETRY_AFTER_CAP_S = 60.0  # a longer Retry-After is cut to this (RunPod's windows are a minute)
IDEMPOTENT = {"GET", "HEAD", "PUT", "DELETE", "OPTIONS"}

T = TypeVar("T")


# ---------------------------------------------------------------------------------------------
# client


def _error_code(body: bytes) -> str | None:
    """Lambda's machine-readable error code ("instance-operations/launch/insufficient-capacity"), if any."""
    try:
        d = jsonlib.loads(body)
    except (ValueError, UnicodeDecodeError):
        return None
    if isinstance(d, dict) and isinstance(d.get("error"), dict):
        return d["error"].get("code")
    return None


class JsonClient:
    """One provider's API: base URL, key, retry policy. `sleep` and `rng` are injectable for tests."""

    def __init__(self, provider: str, key: str, base: str | None = None, *, sleep: Callable[[float], None] = time.sleep,
                 clock: Callable[[], float] = time.monotonic, timeout_s: float = TIMEOUT_S, attempts: int = ATTEMPTS,
                 backoff_s: float = BACKOFF_S, retry_after_cap_s: float = RETRY_AFTER_CAP_S,
                 request_interval_s: float | None = None, rate_limited_wait_s: float | None = None,
                 rng: Callable[[], float] = random.random, transport: httpx.BaseTransport | None = None):
        self.provider, self.base = provider, (base or base_url(provider)).rstrip("/")
        self._key = key
        facts = provider_facts()[provider]
        self.key_env = facts["key_env"]
        self.sleep, self.clock, self.rng = sleep, clock, rng
        self.request_interval_s = float(facts.get("request_interval_s") or 0.0) if request_interval_s is None \
            else request_interval_s
        self.rate_limited_wait_s = float(facts.get("rate_limited_wait_s") or 0.0) if rate_limited_wait_s is None \
            else rate_limited_wait_s
        self._last_request: float | None = None
        self.attempts, self.backoff_s, self.retry_after_cap_s = max(1, attempts), backoff_s, retry_after_cap_s
        self._http = httpx.Client(timeout=httpx.Timeout(timeout_s), follow_redirects=True, transport=transport,
                                  headers={"Accept": "application/json", "User-Agent": "ftl-providers"})

    def __repr__(self) -> str:
        return f"<JsonClient {self.provider} {self.base}>"

    def close(self) -> None:
        self._http.close()

    def scrub(self, text: str) -> str:
        return scrub(text, self._key)

    def _backoff(self, attempt: int) -> float:
        return min(self.backoff_s * 2 ** (attempt - 1), BACKOFF_CAP_S) * (0.5 + self.rng())

    def _pace(self) -> None:
        """At most one call per request_interval_s (the provider's documented rate)."""
        if self.request_interval_s > 0 and self._last_request is not None:
            wait = self._last_request + self.request_interval_s - self.clock()
            if wait > 0:
                self.sleep(wait)
        self._last_request = self.clock()

    def request(self, method: str, path: str, *, json: Any = None, params: dict[str, Any] | None = None,
                idempotent: bool | None = None) -> Any:
        """The decoded JSON answer (None for an empty body); ProviderError / AuthError otherwise."""
        method = method.upper()
        safe = method in IDEMPOTENT if idempotent is None else idempotent
        url = self.base + path
        last = ""
        for attempt in range(1, self.attempts + 1):
            wait = self._backoff(attempt)
            self._pace()
            try:
                resp = self._http.request(method, url, json=json, params=params,
                                          headers={"Authorization": f"Bearer {self._key}"})
            except (httpx.ConnectError, httpx.ConnectTimeout) as e:  # nothing reached the server
                last = self.scrub(f"{type(e).__name__}: {e}")
            except httpx.TransportError as e:  # the request may have been acted on
                last = self.scrub(f"{type(e).__name__}: {e}")
                if not safe:
                    raise ProviderError(f"{self.provider}: {method} {path} failed ({last}); not repeated because it "
                                        "may have taken effect", provider=self.provider) from None
            else:
                log.debug("%s %s %s -> %s (attempt %d)", self.provider, method, path, resp.status_code, attempt)
                if resp.status_code < 400:
                    return self._decode(resp, method, path)
                msg = self.scrub(provider_message(resp.content or b"") or resp.reason_phrase)
                code = _error_code(resp.content or b"")
                last = f"HTTP {resp.status_code}: {msg}"
                retryable = resp.status_code == 429 or (resp.status_code >= 500 and safe)
                if not retryable:
                    raise self._error(resp.status_code, msg, code, method, path)
                ra = resp.headers.get("Retry-After")
                if resp.status_code == 429:
                    try:
                        wait = min(max(float(ra), 0.0), self.retry_after_cap_s)  # type: ignore[arg-type]
                    except (TypeError, ValueError):  # none, or an HTTP-date: a whole documented window at least
                        wait = max(wait, self.rate_limited_wait_s)
            if attempt < self.attempts:
                log.info("%s: %s %s: %s; retrying in %.1fs (%d/%d)", self.provider, method, path, last, wait,
                         attempt, self.attempts - 1)
                self.sleep(wait)
        status = int(last[5:8]) if last.startswith("HTTP ") else None
        raise ProviderError(f"{self.provider}: {method} {path} failed after {self.attempts} attempts; last: {last}",
                            status=status, provider=self.provider)

    def _decode(self, resp: httpx.Response, method: str, path: str) -> Any:
        if resp.status_code == 204 or not resp.content.strip():
            return None
        try:
            return resp.json()
        except ValueError:
            text = self.scrub(resp.content[:200].decode("utf-8", "replace"))
            raise ProviderError(f"{self.provider}: {method} {path} did not answer JSON: {text}",
                                status=resp.status_code, provider=self.provider) from None

    def _error(self, status: int, msg: str, code: str | None, method: str, path: str) -> ProviderError:
        where = f"{self.provider}: {method} {path} answered HTTP {status}: {msg}"
        if status == 401:
            return AuthError(f"{where} (the API key was refused: set {self.key_env} to a valid key)", self.key_env,
                             status, self.provider, code)
        if status == 403:
            where += f" (check that the key in {self.key_env} has write access and the account is active)"
        return ProviderError(where, status, self.provider, code)


def create_once(post: Callable[[], T], lookup: Callable[[], T | None], sleep: Callable[[float], None],
                attempts: int = ATTEMPTS, backoff_s: float = BACKOFF_S) -> T:
    """Run a non-idempotent create; after a 5xx or a lost answer, look the resource up by name before trying again.

    Why: a create can fail on the wire yet succeed on the provider (RunPod has billed pods behind 5xx
    answers), so blindly repeating the POST could start two machines.
    """
    for attempt in range(1, attempts + 1):
        try:
            return post()
        except ProviderError as e:
            if isinstance(e, AuthError) or (e.status is not None and e.status < 500):
                raise
            if attempt == attempts:
                raise
            sleep(min(backoff_s * 2 ** (attempt - 1), BACKOFF_CAP_S))
            found = lookup()
            if found is not None:
                log.info("create answered %s but the resource exists; using it", e)
                return found
    raise AssertionError("unreachable")
