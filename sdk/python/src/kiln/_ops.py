"""The API's operations as request descriptions and result parsers, shared by the sync and
the async client. Names follow the SDK; the API's field names are written here only."""

from __future__ import annotations

import base64
from typing import Any, Callable, Mapping, Optional, Sequence, Union
from urllib.parse import quote, urlsplit

from ._transport import Call, Reply
from .exceptions import CommandExitError, KilnError, Timeout, error_from_response
from .models import (
    BuildEvent,
    Execution,
    ExecutionError,
    Logs,
    Result,
    CommandResult,
    ExecEvent,
    NetworkPolicy,
    OutputChunk,
    SandboxInfo,
    TemplateInfo,
)

#: A command: a shell line (run by ``/bin/sh -c``) or an argv list (run directly).
Cmd = Union[str, Sequence[str]]
#: Called with each piece of output, as text.
OutputCallback = Callable[[str], None]

#: Seconds a command may run when ``timeout`` is not given (E2B's default); 0 means no limit.
DEFAULT_COMMAND_TIMEOUT = 60.0
#: Extra seconds the HTTP request waits beyond a command's own timeout.
_GRACE = 30.0


def sandbox_path(sandbox_id: str, suffix: str = "") -> str:
    return f"/v1/sandboxes/{quote(sandbox_id, safe='')}{suffix}"


def process_path(sandbox_id: str, pid: Union[int, str], suffix: str) -> str:
    return sandbox_path(sandbox_id, f"/processes/{quote(str(pid), safe='')}{suffix}")


def snapshot_path(snapshot: str) -> str:
    return f"/v1/snapshots/{quote(snapshot, safe='')}"


def template_path(name: str) -> str:
    return f"/v1/templates/{quote(name, safe='')}"


#: How long a stream that lasts as long as something else (a command, a build) may stay
#: open; each piece of it must still arrive within this.
LONG_STREAM = 86400.0


def attach_call(sandbox_id: str, pid: Union[int, str]) -> Call:
    return Call(
        "attach_process", "GET", process_path(sandbox_id, pid, "/stream"), timeout=LONG_STREAM
    )


def build_call(spec: Optional[str], name: Optional[str]) -> Call:
    if (spec is None) == (name is None):
        raise ValueError("give spec= (a new template) or name= (an existing one)")
    body = {"spec": spec} if spec is not None else {"name": name}
    return Call("build_template", "POST", "/v1/templates", json=body, timeout=LONG_STREAM)


def build_outcome(event: BuildEvent) -> Optional[TemplateInfo]:
    """The template once a build is ``ready``; raises on ``error``; None before either."""
    if event.type == "ready":
        return TemplateInfo.from_json(event.raw["template"])
    if event.type == "error":
        raise KilnError(
            f"building the template failed: {event.raw.get('message', event.raw)}",
            code=str(event.raw.get("code", "build_failed")),
        )
    return None


def create_call(
    *,
    template: Optional[str],
    timeout: Optional[int],
    metadata: Optional[Mapping[str, str]],
    envs: Optional[Mapping[str, str]],
    cpus: Optional[float],
    memory_mib: Optional[int],
    disk_mib: Optional[int],
    network: Optional[NetworkPolicy],
    public_ports: Optional[bool],
    auto_resume: Optional[bool],
    on_expiry: Optional[str],
    snapshot: Optional[str],
    request_timeout: Optional[float],
) -> Call:
    body: dict[str, Any] = {}
    if template is not None:
        body["template"] = template
    if timeout is not None:
        body["ttl_secs"] = int(timeout)
    if metadata:
        body["metadata"] = dict(metadata)
    if envs:
        body["env"] = dict(envs)
    if cpus is not None:
        body["cpus"] = cpus
    if memory_mib is not None:
        body["memory_mib"] = memory_mib
    if disk_mib is not None:
        body["disk_mib"] = disk_mib
    if network is not None:
        body["network"] = network.to_json()
    if public_ports is not None:
        body["ports"] = {"public": public_ports}
    if auto_resume is not None:
        body["auto_resume"] = auto_resume
    if on_expiry is not None:
        body["on_expiry"] = on_expiry
    if snapshot is not None:
        body["snapshot"] = snapshot
    return Call("create_sandbox", "POST", "/v1/sandboxes", json=body, timeout=request_timeout)


def list_call(
    state: Optional[str],
    metadata: Optional[Mapping[str, str]],
    limit: Optional[int],
    cursor: Optional[str],
) -> Call:
    params: dict[str, Any] = {"state": state, "limit": limit, "cursor": cursor}
    for key, value in (metadata or {}).items():
        params[f"metadata.{key}"] = value
    return Call("list_sandboxes", "GET", "/v1/sandboxes", params=params)


def update_call(
    sandbox_id: str,
    *,
    timeout: Optional[int] = None,
    network: Optional[NetworkPolicy] = None,
    auto_resume: Optional[bool] = None,
    on_expiry: Optional[str] = None,
) -> Call:
    body: dict[str, Any] = {}
    if timeout is not None:
        body["ttl_secs"] = int(timeout)
    if network is not None:
        body["network"] = network.to_json()
    if auto_resume is not None:
        body["auto_resume"] = auto_resume
    if on_expiry is not None:
        body["on_expiry"] = on_expiry
    if not body:
        raise ValueError("give at least one of timeout, network, auto_resume, on_expiry")
    return Call("update_sandbox", "PATCH", sandbox_path(sandbox_id), json=body)


def fork_call(
    sandbox_id: str,
    count: int,
    metadata: Optional[Mapping[str, str]],
    timeout: Optional[int],
) -> Call:
    body: dict[str, Any] = {"count": count}
    if metadata:
        body["metadata"] = dict(metadata)
    if timeout is not None:
        body["ttl_secs"] = int(timeout)
    return Call("fork_sandbox", "POST", sandbox_path(sandbox_id, "/fork"), json=body)


def host_for_port(info: SandboxInfo, port: int) -> str:
    """``<port>-<id>.<domain>[:<port>]``: the host name the daemon serves a sandbox's port
    under (its access token goes in ``X-Kiln-Access-Token`` unless its ports are public)."""
    if not info.port_url:
        raise KilnError("this sandbox has no port URL: the daemon runs without sandbox networking")
    if not 1 <= port <= 65535:
        raise ValueError("port must be between 1 and 65535")
    return urlsplit(info.port_url.replace("{port}", str(port))).netloc


def port_url(info: SandboxInfo, port: int) -> str:
    """The full URL of a sandbox's port."""
    if not info.port_url:
        raise KilnError("this sandbox has no port URL: the daemon runs without sandbox networking")
    host_for_port(info, port)
    return info.port_url.replace("{port}", str(port))


def exec_body(
    cmd: Cmd,
    *,
    background: bool = False,
    envs: Optional[Mapping[str, str]] = None,
    cwd: Optional[str] = None,
    user: Optional[str] = None,
    timeout: Optional[float] = None,
    stdin: Union[str, bool, None] = None,
    tag: Optional[str] = None,
    pty: Optional[tuple[int, int]] = None,
) -> dict[str, Any]:
    command: Any = cmd if isinstance(cmd, str) else list(cmd)
    body: dict[str, Any] = {"command": command}
    if envs:
        body["env"] = dict(envs)
    if cwd is not None:
        body["cwd"] = cwd
    if user is not None:
        body["user"] = user
    seconds = DEFAULT_COMMAND_TIMEOUT if timeout is None else timeout
    if seconds > 0:
        body["timeout_ms"] = int(seconds * 1000)
    if isinstance(stdin, str):
        body["stdin"] = stdin
    elif stdin is True:
        body["open_stdin"] = True
    if background:
        body["background"] = True
    if tag is not None:
        body["tag"] = tag
    if pty is not None:
        body["pty"] = {"rows": pty[0], "cols": pty[1]}
    return body


def request_timeout_for(body: Mapping[str, Any]) -> Optional[float]:
    """How long the HTTP request for a command may take: its own timeout plus a grace
    period, or no limit for a command without one."""
    timeout_ms = body.get("timeout_ms")
    return None if timeout_ms is None else timeout_ms / 1000 + _GRACE


def stdin_call(sandbox_id: str, pid: Union[int, str], data: Union[str, bytes], close: bool) -> Call:
    body: dict[str, Any] = {"close": close}
    if isinstance(data, bytes):
        if data:
            body["data_b64"] = base64.b64encode(data).decode()
    elif data:
        body["data"] = data
    return Call("write_process_stdin", "POST", process_path(sandbox_id, pid, "/stdin"), json=body)


def checked(result: CommandResult) -> CommandResult:
    """The result, or the error a failed command raises."""
    if result.timed_out:
        raise Timeout(
            "the command was killed when its timeout passed "
            f"(stdout {len(result.stdout)} bytes, stderr {len(result.stderr)} bytes so far)"
        )
    if result.exit_code != 0:
        raise CommandExitError(
            exit_code=result.exit_code,
            signal=result.signal,
            stdout=result.stdout,
            stderr=result.stderr,
        )
    return result


class EventCollector:
    """Turns a command's streamed events into callbacks and, at its exit, a result."""

    def __init__(
        self,
        on_stdout: Optional[OutputCallback] = None,
        on_stderr: Optional[OutputCallback] = None,
    ) -> None:
        self.on_stdout = on_stdout
        self.on_stderr = on_stderr
        self.pid: Optional[int] = None
        self._stdout: list[bytes] = []
        self._stderr: list[bytes] = []
        self.result: Optional[CommandResult] = None

    def feed(self, raw: Mapping[str, Any]) -> Optional[OutputChunk]:
        """Takes one event; returns the output it carried, if any."""
        event = ExecEvent.from_json(raw)
        if event.type == "start":
            self.pid = event.pid
        elif event.type in ("stdout", "stderr"):
            chunk = OutputChunk("stdout" if event.type == "stdout" else "stderr", event.data)
            (self._stdout if chunk.stream == "stdout" else self._stderr).append(chunk.data)
            callback = self.on_stdout if chunk.stream == "stdout" else self.on_stderr
            if callback is not None:
                callback(chunk.text)
            return chunk
        elif event.type == "exit":
            self.result = CommandResult(
                exit_code=event.exit_code,
                signal=event.signal,
                stdout=b"".join(self._stdout).decode("utf-8", "replace"),
                stderr=b"".join(self._stderr).decode("utf-8", "replace"),
                timed_out=event.timed_out,
            )
        elif event.type == "error":
            raise KilnError(f"the command's stream broke: {event.message}", code=event.code)
        return None

    def restarted(self) -> EventCollector:
        """A collector for a stream that starts over (a new attach replays the output), with
        the same callbacks."""
        return EventCollector(self.on_stdout, self.on_stderr)

    def finish(self) -> CommandResult:
        if self.result is None:
            raise KilnError("the command's stream ended before its exit")
        return self.result


def run_code_body(
    code: str,
    language: str,
    context: Optional[str],
    envs: Optional[Mapping[str, str]],
    timeout: Optional[float],
) -> dict[str, Any]:
    body: dict[str, Any] = {"code": code, "language": language}
    if context is not None:
        body["context"] = context
    if envs:
        body["env"] = dict(envs)
    if timeout:
        body["timeout_ms"] = int(timeout * 1000)
    return body


def code_call(sandbox_id: str, body: Mapping[str, Any], stream: bool) -> Call:
    suffix = "/code/stream" if stream else "/code"
    timeout = body.get("timeout_ms")
    return Call(
        "run_code_stream" if stream else "run_code",
        "POST",
        sandbox_path(sandbox_id, suffix),
        json=dict(body),
        timeout=timeout / 1000 + _GRACE if timeout else LONG_STREAM,
    )


def code_context_call(operation: str, sandbox_id: str, context: Optional[str] = None) -> Call:
    base = sandbox_path(sandbox_id, "/code/contexts")
    if operation == "create_code_context":
        return Call(operation, "POST", base)
    if operation == "list_code_contexts":
        return Call(operation, "GET", base)
    path = f"{base}/{quote(str(context), safe='')}"
    if operation == "delete_code_context":
        return Call(operation, "DELETE", path, allow=(404,))
    return Call(operation, "POST", path + "/interrupt")


class CodeCollector:
    """Turns a code run's streamed events into callbacks and, at its end, an Execution."""

    def __init__(
        self,
        on_stdout: Optional[OutputCallback] = None,
        on_stderr: Optional[OutputCallback] = None,
        on_result: Optional[Callable[[Result], None]] = None,
        on_error: Optional[Callable[[ExecutionError], None]] = None,
    ) -> None:
        self.on_stdout, self.on_stderr = on_stdout, on_stderr
        self.on_result, self.on_error = on_result, on_error
        self.stdout: list[str] = []
        self.stderr: list[str] = []
        self.results: list[Result] = []
        self.error: Optional[ExecutionError] = None
        self.execution: Optional[Execution] = None

    def feed(self, event: Mapping[str, Any]) -> None:
        kind = event.get("type")
        if kind in ("stdout", "stderr"):
            text = str(event.get("text", ""))
            (self.stdout if kind == "stdout" else self.stderr).append(text)
            callback = self.on_stdout if kind == "stdout" else self.on_stderr
            if callback is not None:
                callback(text)
        elif kind in ("display", "result"):
            result = Result(dict(event.get("data") or {}), kind == "result")
            self.results.append(result)
            if self.on_result is not None:
                self.on_result(result)
        elif kind == "error":
            self.error = ExecutionError(
                str(event.get("name")), str(event.get("value")), str(event.get("traceback"))
            )
            if self.on_error is not None:
                self.on_error(self.error)
        elif kind == "done":
            self.execution = Execution(
                results=self.results,
                logs=Logs(self.stdout, self.stderr),
                error=self.error,
                execution_count=int(event.get("execution_count", 0)),
                timed_out=bool(event.get("timed_out", False)),
            )
        elif kind == "failure":
            raise KilnError(
                f"the code's stream broke: {event.get('message')}", code=str(event.get("code"))
            )

    def finish(self) -> Execution:
        if self.execution is None:
            raise KilnError("the code's stream ended before the run did")
        return self.execution


def deleted_context(reply: Reply) -> bool:
    """Whether a context was deleted; a missing sandbox (not a missing context) raises."""
    if reply.status != 404:
        return True
    error = error_from_response(reply.status, reply.body, reply.headers)
    if not str(error.message).startswith("code context"):
        raise error
    return False
