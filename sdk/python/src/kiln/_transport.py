"""HTTP to the daemon: one request description, a sync and an async way to send it.

Everything the two clients share (URLs, bodies, error mapping, event parsing) lives here or
in the operation builders, so ``Sandbox`` and ``AsyncSandbox`` differ only in ``await``.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from typing import (
    Any,
    AsyncGenerator,
    AsyncIterator,
    Callable,
    Generator,
    Iterator,
    Mapping,
    Optional,
    TypeVar,
)

import httpx

from . import __version__
from ._config import ConnectionConfig
from .exceptions import KilnError, Timeout, UnavailableError, error_from_response

T = TypeVar("T")

#: Longest line of a newline-delimited JSON stream the SDK accepts.
MAX_EVENT_LINE = 32 << 20


@dataclass
class Call:
    """One HTTP request to the API, named by its OpenAPI ``operationId``."""

    operation: str
    method: str
    path: str
    params: Optional[Mapping[str, Any]] = None
    json: Any = None
    content: Optional[bytes] = None
    #: Seconds to wait for the answer; None: the client's request timeout.
    timeout: Optional[float] = None
    #: Statuses returned to the caller instead of raised (e.g. 404 for ``exists``).
    allow: tuple[int, ...] = ()

    def query(self) -> Optional[dict[str, str]]:
        if not self.params:
            return None
        out: dict[str, str] = {}
        for key, value in self.params.items():
            if value is None:
                continue
            out[key] = ("true" if value else "false") if isinstance(value, bool) else str(value)
        return out


@dataclass
class Reply:
    """A finished response."""

    status: int
    body: bytes
    headers: Mapping[str, str]

    def json(self) -> Any:
        try:
            return json.loads(self.body)
        except ValueError as e:
            raise KilnError(f"the daemon answered with invalid JSON: {e}") from e


def _headers(config: ConnectionConfig) -> dict[str, str]:
    return {
        "authorization": f"Bearer {config.api_key}",
        "user-agent": f"kiln-sdk-python/{__version__}",
    }


def _timeout(config: ConnectionConfig, call: Call) -> httpx.Timeout:
    seconds = config.request_timeout if call.timeout is None else call.timeout
    return httpx.Timeout(seconds, connect=min(10.0, seconds))


def _transport_error(call: Call, e: httpx.HTTPError) -> KilnError:
    if isinstance(e, httpx.TimeoutException):
        return Timeout(f"{call.method} {call.path} ({call.operation}) timed out: {e}")
    if isinstance(e, httpx.ConnectError):
        return UnavailableError(
            f"cannot reach the kiln daemon: {e} (is `kiln serve` running? KILN_URL?)"
        )
    return KilnError(f"{call.method} {call.path} failed: {e}")


def _check(call: Call, reply: Reply) -> Reply:
    if reply.status >= 400 and reply.status not in call.allow:
        raise error_from_response(reply.status, reply.body, reply.headers)
    return reply


def parse_line(line: str) -> Optional[dict[str, Any]]:
    """One line of a newline-delimited JSON stream (None for a blank one)."""
    line = line.strip()
    if not line:
        return None
    if len(line) > MAX_EVENT_LINE:
        raise KilnError("a streamed event was larger than the SDK accepts")
    try:
        value = json.loads(line)
    except ValueError as e:
        raise KilnError(f"the daemon streamed invalid JSON: {e}") from e
    if not isinstance(value, dict):
        raise KilnError("the daemon streamed a non-object event")
    return value


class SyncTransport:
    """Sends calls with ``httpx.Client``."""

    def __init__(self, config: ConnectionConfig) -> None:
        self.config = config
        self._client = httpx.Client(base_url=config.url, headers=_headers(config))

    def close(self) -> None:
        self._client.close()

    def request(self, call: Call) -> Reply:
        try:
            response = self._client.request(
                call.method,
                call.path,
                params=call.query(),
                json=call.json,
                content=call.content,
                timeout=_timeout(self.config, call),
            )
        except httpx.HTTPError as e:
            raise _transport_error(call, e) from e
        return _check(call, Reply(response.status_code, response.content, response.headers))

    def _stream_client(self) -> httpx.Client:
        # A stream gets a connection pool of its own: an iterator the caller abandons is
        # closed whenever the garbage collector gets to it, possibly in the middle of another
        # request, and must not need the lock of a pool that request holds.
        return httpx.Client(base_url=self.config.url, headers=_headers(self.config))

    def stream_lines(self, call: Call) -> Generator[dict[str, Any], None, None]:
        """The events of a newline-delimited JSON response, as they arrive. Leaving the
        loop closes the connection (which ends a foreground command)."""
        try:
            with (
                self._stream_client() as client,
                client.stream(
                    call.method,
                    call.path,
                    params=call.query(),
                    json=call.json,
                    timeout=_timeout(self.config, call),
                ) as response,
            ):
                if response.status_code >= 400:
                    response.read()
                    _check(call, Reply(response.status_code, response.content, response.headers))
                for line in response.iter_lines():
                    event = parse_line(line)
                    if event is not None:
                        yield event
        except httpx.HTTPError as e:
            raise _transport_error(call, e) from e

    def stream_bytes(self, call: Call) -> Iterator[bytes]:
        """A response body in pieces as it arrives."""
        try:
            with (
                self._stream_client() as client,
                client.stream(
                    call.method,
                    call.path,
                    params=call.query(),
                    timeout=_timeout(self.config, call),
                ) as response,
            ):
                if response.status_code >= 400:
                    response.read()
                    _check(call, Reply(response.status_code, response.content, response.headers))
                yield from response.iter_bytes()
        except httpx.HTTPError as e:
            raise _transport_error(call, e) from e

    def upload(self, call: Call, chunks: Iterator[bytes]) -> Reply:
        """Sends a body given in pieces (a file, a generator)."""
        try:
            response = self._client.request(
                call.method,
                call.path,
                params=call.query(),
                content=chunks,
                timeout=_timeout(self.config, call),
            )
        except httpx.HTTPError as e:
            raise _transport_error(call, e) from e
        return _check(call, Reply(response.status_code, response.content, response.headers))


class AsyncTransport:
    """Sends calls with ``httpx.AsyncClient``."""

    def __init__(self, config: ConnectionConfig) -> None:
        self.config = config
        self._client = httpx.AsyncClient(base_url=config.url, headers=_headers(config))

    async def close(self) -> None:
        await self._client.aclose()

    async def request(self, call: Call) -> Reply:
        try:
            response = await self._client.request(
                call.method,
                call.path,
                params=call.query(),
                json=call.json,
                content=call.content,
                timeout=_timeout(self.config, call),
            )
        except httpx.HTTPError as e:
            raise _transport_error(call, e) from e
        return _check(call, Reply(response.status_code, response.content, response.headers))

    def _stream_client(self) -> httpx.AsyncClient:
        # A pool of its own per stream, as in SyncTransport.
        return httpx.AsyncClient(base_url=self.config.url, headers=_headers(self.config))

    async def stream_lines(self, call: Call) -> AsyncGenerator[dict[str, Any], None]:
        """The events of a newline-delimited JSON response, as they arrive."""
        try:
            async with (
                self._stream_client() as client,
                client.stream(
                    call.method,
                    call.path,
                    params=call.query(),
                    json=call.json,
                    timeout=_timeout(self.config, call),
                ) as response,
            ):
                if response.status_code >= 400:
                    await response.aread()
                    _check(call, Reply(response.status_code, response.content, response.headers))
                async for line in response.aiter_lines():
                    event = parse_line(line)
                    if event is not None:
                        yield event
        except httpx.HTTPError as e:
            raise _transport_error(call, e) from e

    async def stream_bytes(self, call: Call) -> AsyncIterator[bytes]:
        """A response body in pieces as it arrives."""
        try:
            async with (
                self._stream_client() as client,
                client.stream(
                    call.method,
                    call.path,
                    params=call.query(),
                    timeout=_timeout(self.config, call),
                ) as response,
            ):
                if response.status_code >= 400:
                    await response.aread()
                    _check(call, Reply(response.status_code, response.content, response.headers))
                async for chunk in response.aiter_bytes():
                    yield chunk
        except httpx.HTTPError as e:
            raise _transport_error(call, e) from e

    async def upload(self, call: Call, chunks: AsyncIterator[bytes]) -> Reply:
        """Sends a body given in pieces."""
        try:
            response = await self._client.request(
                call.method,
                call.path,
                params=call.query(),
                content=chunks,
                timeout=_timeout(self.config, call),
            )
        except httpx.HTTPError as e:
            raise _transport_error(call, e) from e
        return _check(call, Reply(response.status_code, response.content, response.headers))


def operations(*ids: str) -> Callable[[T], T]:
    """Marks an SDK method with the API operations (OpenAPI ``operationId``) it calls; the
    coverage test checks every operation has a method."""

    def mark(method: T) -> T:
        setattr(method, "__kiln_operations__", tuple(ids))
        return method

    return mark
