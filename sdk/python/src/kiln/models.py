"""What the API returns, as typed values."""

from __future__ import annotations

import base64
from dataclasses import dataclass, field
from typing import Any, Literal, Mapping, Optional

SandboxState = Literal["running", "pausing", "paused", "resuming", "failed"]


def _opt_int(value: Any) -> Optional[int]:
    return int(value) if value is not None else None


@dataclass(frozen=True)
class NetworkPolicy:
    """A sandbox's egress policy: the internet on or off, domains or CIDRs allowed or
    denied on top, and optional limits: bandwidth each way in Mbit/s and connections open at
    once (see docs/networking.md)."""

    internet: bool = True
    allow_out: list[str] = field(default_factory=list)
    deny_out: list[str] = field(default_factory=list)
    bandwidth_mbit: Optional[int] = None
    max_connections: Optional[int] = None

    def to_json(self) -> dict[str, Any]:
        body: dict[str, Any] = {
            "internet": self.internet,
            "allow_out": list(self.allow_out),
            "deny_out": list(self.deny_out),
        }
        if self.bandwidth_mbit is not None:
            body["bandwidth_mbit"] = self.bandwidth_mbit
        if self.max_connections is not None:
            body["max_connections"] = self.max_connections
        return body

    @staticmethod
    def from_json(data: Mapping[str, Any]) -> NetworkPolicy:
        return NetworkPolicy(
            internet=bool(data.get("internet", True)),
            allow_out=list(data.get("allow_out", [])),
            deny_out=list(data.get("deny_out", [])),
            bandwidth_mbit=_opt_int(data.get("bandwidth_mbit")),
            max_connections=_opt_int(data.get("max_connections")),
        )


@dataclass(frozen=True)
class SandboxInfo:
    """A sandbox as the daemon describes it."""

    sandbox_id: str
    template: str
    state: SandboxState
    metadata: dict[str, str]
    created_at_ms: int
    expires_at_ms: Optional[int]
    ttl_secs: Optional[int]
    reason: Optional[str]
    parent_id: Optional[str]
    auto_resume: bool
    on_expiry: str
    network: Optional[NetworkPolicy]
    ports_public: bool
    port_url: Optional[str]
    access_token: Optional[str]

    @staticmethod
    def from_json(data: Mapping[str, Any]) -> SandboxInfo:
        ports = data.get("ports") or {}
        network = data.get("network")
        return SandboxInfo(
            sandbox_id=str(data["id"]),
            template=str(data.get("template", "")),
            state=data.get("state", "running"),
            metadata=dict(data.get("metadata") or {}),
            created_at_ms=int(data.get("created_at_ms", 0)),
            expires_at_ms=_opt_int(data.get("expires_at_ms")),
            ttl_secs=_opt_int(data.get("ttl_secs")),
            reason=data.get("reason"),
            parent_id=data.get("parent_id"),
            auto_resume=bool(data.get("auto_resume", True)),
            on_expiry=str(data.get("on_expiry", "destroy")),
            network=NetworkPolicy.from_json(network) if network else None,
            ports_public=bool(ports.get("public", False)),
            port_url=ports.get("url"),
            access_token=ports.get("access_token"),
        )


@dataclass(frozen=True)
class SandboxPage:
    """One page of a sandbox listing; pass ``next_cursor`` as ``cursor`` for the next."""

    sandboxes: list[SandboxInfo]
    next_cursor: Optional[str]


@dataclass(frozen=True)
class CommandResult:
    """A command that ran to completion."""

    exit_code: Optional[int]
    signal: Optional[int]
    stdout: str
    stderr: str
    truncated: bool = False
    timed_out: bool = False
    duration_ms: Optional[float] = None

    @staticmethod
    def from_json(data: Mapping[str, Any]) -> CommandResult:
        return CommandResult(
            exit_code=_opt_int(data.get("exit_code")),
            signal=_opt_int(data.get("signal")),
            stdout=str(data.get("stdout", "")),
            stderr=str(data.get("stderr", "")),
            truncated=bool(data.get("truncated", False)),
            timed_out=bool(data.get("timed_out", False)),
            duration_ms=data.get("duration_ms"),
        )


@dataclass(frozen=True)
class ProcessInfo:
    """A process started through the API (running, or recently finished)."""

    pid: int
    tag: Optional[str]
    argv: list[str]
    background: bool
    running: bool
    exit_code: Optional[int]
    signal: Optional[int]

    @staticmethod
    def from_json(data: Mapping[str, Any]) -> ProcessInfo:
        return ProcessInfo(
            pid=int(data["pid"]),
            tag=data.get("tag"),
            argv=list(data.get("argv", [])),
            background=bool(data.get("background", False)),
            running=bool(data.get("running", False)),
            exit_code=_opt_int(data.get("exit_code")),
            signal=_opt_int(data.get("signal")),
        )


OutputStream = Literal["stdout", "stderr"]


@dataclass(frozen=True)
class OutputChunk:
    """A piece of a command's output (on a terminal, everything arrives as stdout)."""

    stream: OutputStream
    data: bytes

    @property
    def text(self) -> str:
        return self.data.decode("utf-8", "replace")


@dataclass(frozen=True)
class ExecEvent:
    """One event of a streamed command: ``start``, ``stdout``, ``stderr``, ``dropped``,
    ``exit`` or ``error``."""

    type: str
    pid: Optional[int] = None
    data: bytes = b""
    exit_code: Optional[int] = None
    signal: Optional[int] = None
    timed_out: bool = False
    dropped_bytes: int = 0
    code: Optional[str] = None
    message: Optional[str] = None

    @staticmethod
    def from_json(data: Mapping[str, Any]) -> ExecEvent:
        kind = str(data.get("type", ""))
        raw = b""
        if "data_b64" in data and data["data_b64"] is not None:
            raw = base64.b64decode(data["data_b64"])
        elif data.get("data") is not None:
            raw = str(data["data"]).encode()
        return ExecEvent(
            type=kind,
            pid=_opt_int(data.get("pid")),
            data=raw,
            exit_code=_opt_int(data.get("exit_code")),
            signal=_opt_int(data.get("signal")),
            timed_out=bool(data.get("timed_out", False)),
            dropped_bytes=int(data.get("bytes", 0) or 0),
            code=data.get("code"),
            message=data.get("message"),
        )


EntryKind = Literal["file", "dir", "symlink", "other"]


@dataclass(frozen=True)
class EntryInfo:
    """A file or directory in a sandbox."""

    path: str
    kind: EntryKind
    size: int
    mode: int
    modified_ms: int

    @property
    def name(self) -> str:
        return self.path.rstrip("/").rsplit("/", 1)[-1]

    @staticmethod
    def from_json(data: Mapping[str, Any]) -> EntryInfo:
        return EntryInfo(
            path=str(data["path"]),
            kind=data.get("kind", "other"),
            size=int(data.get("size", 0)),
            mode=int(data.get("mode", 0)),
            modified_ms=int(data.get("modified_ms", 0)),
        )


@dataclass(frozen=True)
class WriteInfo:
    """A file written."""

    path: str
    bytes: int


@dataclass(frozen=True)
class ForkResult:
    """A fork's children (each continues from the parent's moment of the fork) and cost."""

    sandbox_ids: list[str]
    sandboxes: list[SandboxInfo]
    parent_paused_ms: float
    bytes_written: int

    @staticmethod
    def from_json(data: Mapping[str, Any]) -> ForkResult:
        children = [SandboxInfo.from_json(s) for s in data.get("sandboxes", [])]
        return ForkResult(
            sandbox_ids=[c.sandbox_id for c in children],
            sandboxes=children,
            parent_paused_ms=float(data.get("parent_paused_ms", 0.0)),
            bytes_written=int(data.get("bytes_written", 0)),
        )


@dataclass(frozen=True)
class Forward:
    """A plain TCP forward: connections to ``address`` (``host:port``) go to ``port`` of the
    sandbox. Open to anyone who reaches that address."""

    port: int
    address: str
    created_at_ms: int

    @staticmethod
    def from_json(data: Mapping[str, Any]) -> Forward:
        return Forward(
            port=int(data["port"]),
            address=str(data.get("address", "")),
            created_at_ms=int(data.get("created_at_ms", 0)),
        )


@dataclass(frozen=True)
class SnapshotInfo:
    """A snapshot: a sandbox's memory, device state and disk at one moment."""

    snapshot_id: str
    name: str
    sandbox_id: str
    template: str
    size_bytes: int
    created_at_ms: int

    @staticmethod
    def from_json(data: Mapping[str, Any]) -> SnapshotInfo:
        return SnapshotInfo(
            snapshot_id=str(data["id"]),
            name=str(data.get("name", "")),
            sandbox_id=str(data.get("sandbox_id", "")),
            template=str(data.get("template", "")),
            size_bytes=int(data.get("size_bytes", 0)),
            created_at_ms=int(data.get("created_at_ms", 0)),
        )


@dataclass(frozen=True)
class SandboxMetrics:
    """What a sandbox uses, measured on the host (``None``: not measurable now, such as CPU
    and memory while it is paused, or network without sandbox networking)."""

    sandbox_id: str
    state: str
    cpu_seconds: Optional[float]
    memory_bytes: Optional[int]
    memory_limit_bytes: Optional[int]
    disk_bytes: Optional[int]
    network_rx_bytes: Optional[int]
    network_tx_bytes: Optional[int]
    measured_at_ms: int

    @staticmethod
    def from_json(data: Mapping[str, Any]) -> SandboxMetrics:
        def number(name: str) -> Optional[int]:
            value = data.get(name)
            return int(value) if value is not None else None

        cpu = data.get("cpu_seconds")
        return SandboxMetrics(
            sandbox_id=str(data["sandbox_id"]),
            state=str(data.get("state", "")),
            cpu_seconds=float(cpu) if cpu is not None else None,
            memory_bytes=number("memory_bytes"),
            memory_limit_bytes=number("memory_limit_bytes"),
            disk_bytes=number("disk_bytes"),
            network_rx_bytes=number("network_rx_bytes"),
            network_tx_bytes=number("network_tx_bytes"),
            measured_at_ms=int(data.get("measured_at_ms", 0)),
        )


@dataclass(frozen=True)
class TemplateInfo:
    """A template sandboxes are made from."""

    name: str
    description: Optional[str]
    vcpus: int
    memory_mib: int
    disk_mib: int
    ready: bool
    is_global: bool

    @staticmethod
    def from_json(data: Mapping[str, Any]) -> TemplateInfo:
        return TemplateInfo(
            name=str(data["name"]),
            description=data.get("description"),
            vcpus=int(data.get("vcpus", 1)),
            memory_mib=int(data.get("memory_mib", 0)),
            disk_mib=int(data.get("disk_mib", 0)),
            ready=bool(data.get("ready", False)),
            is_global=bool(data.get("global", False)),
        )


@dataclass(frozen=True)
class BuildEvent:
    """Progress of a template build: ``step``, ``step_done``, ``ready`` or ``error``."""

    type: str
    raw: dict[str, Any]

    @staticmethod
    def from_json(data: Mapping[str, Any]) -> BuildEvent:
        return BuildEvent(type=str(data.get("type", "")), raw=dict(data))


@dataclass(frozen=True)
class SandboxEvent:
    """A lifecycle event: ``created``, ``forked``, ``paused``, ``resumed``, ``failed`` or
    ``destroyed``."""

    type: str
    sandbox_id: Optional[str]
    raw: dict[str, Any]

    @staticmethod
    def from_json(data: Mapping[str, Any]) -> SandboxEvent:
        sandbox = data.get("sandbox_id") or data.get("id")
        return SandboxEvent(
            type=str(data.get("type", data.get("event", ""))),
            sandbox_id=str(sandbox) if sandbox is not None else None,
            raw=dict(data),
        )


@dataclass(frozen=True)
class Health:
    """The daemon's health."""

    status: str
    version: str
    accel: str


@dataclass(frozen=True)
class Result:
    """Something a code run showed, by MIME type: the value of its last expression
    (``is_main_result``) or a figure or ``display(x)`` during it."""

    data: dict[str, Any]
    is_main_result: bool = False

    def _get(self, mime: str) -> Optional[str]:
        value = self.data.get(mime)
        return value if isinstance(value, str) else None

    @property
    def text(self) -> Optional[str]:
        return self._get("text/plain")

    @property
    def html(self) -> Optional[str]:
        return self._get("text/html")

    @property
    def markdown(self) -> Optional[str]:
        return self._get("text/markdown")

    @property
    def svg(self) -> Optional[str]:
        return self._get("image/svg+xml")

    @property
    def png(self) -> Optional[str]:
        """The PNG image, base64."""
        return self._get("image/png")

    @property
    def jpeg(self) -> Optional[str]:
        """The JPEG image, base64."""
        return self._get("image/jpeg")

    @property
    def json(self) -> Any:
        return self.data.get("application/json")

    def formats(self) -> list[str]:
        return sorted(self.data)


@dataclass(frozen=True)
class ExecutionError:
    """The exception a code run raised (``KeyboardInterrupt`` when interrupted)."""

    name: str
    value: str
    traceback: str


@dataclass(frozen=True)
class Logs:
    """What a code run printed, in the pieces it printed them."""

    stdout: list[str] = field(default_factory=list)
    stderr: list[str] = field(default_factory=list)


@dataclass(frozen=True)
class Execution:
    """What a code run did. A raised exception is in ``error``, not raised."""

    results: list[Result]
    logs: Logs
    error: Optional[ExecutionError]
    execution_count: int
    timed_out: bool = False
    truncated: bool = False

    @property
    def text(self) -> Optional[str]:
        """The last expression's value as text."""
        for result in self.results:
            if result.is_main_result:
                return result.text
        return None

    @staticmethod
    def from_json(data: Mapping[str, Any]) -> Execution:
        error = data.get("error")
        return Execution(
            results=[
                Result(dict(r.get("data") or {}), bool(r.get("is_main_result")))
                for r in data.get("results", [])
            ],
            logs=Logs(
                stdout=[data["stdout"]] if data.get("stdout") else [],
                stderr=[data["stderr"]] if data.get("stderr") else [],
            ),
            error=(
                ExecutionError(str(error["name"]), str(error["value"]), str(error["traceback"]))
                if error
                else None
            ),
            execution_count=int(data.get("execution_count", 0)),
            timed_out=bool(data.get("timed_out", False)),
            truncated=bool(data.get("truncated", False)),
        )
