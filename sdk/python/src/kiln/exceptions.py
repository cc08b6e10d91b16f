"""Errors the SDK raises, one class per meaning.

Every error from the daemon is a :class:`KilnError` carrying the HTTP status, the API's
error ``code`` and ``message``, and the request id when the daemon gives one. Catch the
subclass that says what happened (``SandboxNotFound``, ``AuthenticationError``, ...).
"""

from __future__ import annotations

import builtins
import json
from typing import Mapping, Optional


class KilnError(Exception):
    """Anything that went wrong talking to kiln."""

    def __init__(
        self,
        message: str,
        *,
        status: Optional[int] = None,
        code: Optional[str] = None,
        request_id: Optional[str] = None,
    ) -> None:
        super().__init__(message)
        self.message = message
        self.status = status
        self.code = code
        self.request_id = request_id

    def __str__(self) -> str:
        parts = [self.message]
        if self.code:
            parts.append(f"({self.code}, HTTP {self.status})")
        if self.request_id:
            parts.append(f"[request {self.request_id}]")
        return " ".join(parts)


class AuthenticationError(KilnError):
    """No API key, or one the daemon does not know (HTTP 401)."""


class ForbiddenError(KilnError):
    """The key may not do this, e.g. manage keys without being an admin key (HTTP 403)."""


class NotFoundError(KilnError):
    """Something named in the call does not exist (HTTP 404)."""


class SandboxNotFound(NotFoundError):
    """No such sandbox for this key's tenant (destroyed, expired, or never made)."""


class TemplateNotFound(NotFoundError):
    """No such template; ``Template.list()`` lists them."""


class SnapshotNotFound(NotFoundError):
    """No such snapshot."""


class FileNotFound(NotFoundError):
    """No such file or directory in the sandbox."""


class ProcessNotFound(NotFoundError):
    """No process with that pid or tag in the sandbox."""


class InvalidRequestError(KilnError):
    """The request was malformed or impossible; the message names the field (HTTP 400)."""


class ConflictError(KilnError):
    """The sandbox's state forbids it: failed, paused without auto-resume, path exists."""


class TooLargeError(KilnError):
    """A body or file over the daemon's limit, or the sandbox's disk is full (HTTP 413)."""


class SandboxError(KilnError):
    """The sandbox could not do it (its own failure; the daemon is fine; HTTP 422)."""


class UnavailableError(KilnError):
    """The sandbox does not answer right now, or the host ran out of capacity (HTTP 503)."""


class QuotaExceeded(KilnError):
    """The tenant is at a limit the operator set, e.g. its live sandboxes (HTTP 429): destroy
    some first."""


class InsufficientStorage(KilnError):
    """The host's disk space for sandboxes (its reserve or budget) does not allow a create,
    fork, pause or snapshot now (HTTP 507): destroy sandboxes or snapshots first."""


class Timeout(KilnError, builtins.TimeoutError):
    """Something timed out; the message says what (a command, a request, the daemon)."""


class CommandExitError(KilnError):
    """A command finished with a non-zero exit code (or was killed by a signal)."""

    def __init__(
        self,
        *,
        exit_code: Optional[int],
        signal: Optional[int],
        stdout: str,
        stderr: str,
    ) -> None:
        how = f"exit code {exit_code}" if exit_code is not None else f"signal {signal}"
        tail = stderr.strip().splitlines()[-1:] or stdout.strip().splitlines()[-1:]
        message = f"command failed with {how}" + (f": {tail[0]}" if tail else "")
        super().__init__(message)
        self.exit_code = exit_code
        self.signal = signal
        self.stdout = stdout
        self.stderr = stderr


_BY_CODE = {
    "unauthenticated": AuthenticationError,
    "forbidden": ForbiddenError,
    "invalid_request": InvalidRequestError,
    "method_not_allowed": InvalidRequestError,
    "conflict": ConflictError,
    "too_large": TooLargeError,
    "guest_error": SandboxError,
    "unavailable": UnavailableError,
    "quota_exceeded": QuotaExceeded,
    "insufficient_storage": InsufficientStorage,
    "timeout": Timeout,
}

# The daemon's not-found messages start with what was not found: "sandbox `sb-1` not found".
_NOT_FOUND = {
    "sandbox": SandboxNotFound,
    "template": TemplateNotFound,
    "snapshot": SnapshotNotFound,
    "path": FileNotFound,
    "file": FileNotFound,
    "process": ProcessNotFound,
}


def error_from_response(status: int, body: bytes, headers: Mapping[str, str]) -> KilnError:
    """The error for an HTTP error response of the daemon."""
    code: Optional[str] = None
    message = ""
    request_id = headers.get("x-request-id")
    try:
        parsed = json.loads(body)
        if isinstance(parsed, dict):
            code = parsed.get("code") if isinstance(parsed.get("code"), str) else None
            message = str(parsed.get("message", ""))
            if isinstance(parsed.get("request_id"), str):
                request_id = parsed["request_id"]
    except ValueError:
        pass
    if not message:
        text = body.decode("utf-8", "replace").strip()
        message = text[:500] or f"HTTP {status} with an empty body"
    cls: type[KilnError]
    if status == 404 or code == "not_found":
        first = message.split(" ", 1)[0].lower()
        cls = _NOT_FOUND.get(first, NotFoundError)
    elif code in _BY_CODE:
        cls = _BY_CODE[code]
    elif status == 401:
        cls = AuthenticationError
    elif status == 504:
        cls = Timeout
    elif 400 <= status < 500:
        cls = InvalidRequestError
    else:
        cls = KilnError
    return cls(message, status=status, code=code or "http_error", request_id=request_id)
