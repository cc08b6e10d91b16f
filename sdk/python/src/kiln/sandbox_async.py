"""The asynchronous client: ``AsyncSandbox`` and what hangs off it, ``AsyncSnapshot`` and
``AsyncTemplate``; the same surface as ``kiln.Sandbox`` with ``await`` (asyncio or trio)."""

from __future__ import annotations

from types import TracebackType
from typing import (
    IO,
    Any,
    AsyncGenerator,
    AsyncIterator,
    Callable,
    List,
    Literal,
    Mapping,
    Optional,
    Union,
    overload,
)

from . import _ops
from ._config import resolve
from ._ops import Cmd, OutputCallback
from ._transport import Call, Reply, AsyncTransport, operations
from .exceptions import KilnError, NotFoundError
from .models import (
    BuildEvent,
    Execution,
    ExecutionError,
    Result,
    CommandResult,
    EntryInfo,
    ForkResult,
    Forward,
    Health,
    NetworkPolicy,
    OutputChunk,
    ProcessInfo,
    SandboxEvent,
    SandboxInfo,
    SandboxMetrics,
    SandboxPage,
    SnapshotInfo,
    TemplateInfo,
    WriteInfo,
)

_UPLOAD_CHUNK = 1 << 20


def _transport(
    url: Optional[str], api_key: Optional[str], request_timeout: Optional[float]
) -> AsyncTransport:
    return AsyncTransport(resolve(url, api_key, request_timeout))


async def _once(call: Call, url: Optional[str], api_key: Optional[str]) -> Reply:
    """One call on a connection of its own (the operations not bound to a sandbox)."""
    transport = _transport(url, api_key, None)
    try:
        return await transport.request(call)
    finally:
        await transport.close()


class AsyncCommandHandle:
    """A command running in a sandbox: wait for it, read its output as it comes, write its
    stdin, kill it. Leaving it alone does not stop a background command."""

    def __init__(
        self,
        transport: AsyncTransport,
        sandbox_id: str,
        pid: int,
    ) -> None:
        self._transport = transport
        self._sandbox_id = sandbox_id
        self.pid = pid
        self._events: Optional[AsyncGenerator[dict[str, Any], None]] = None
        self._collector = _ops.EventCollector()

    def _stream(self) -> AsyncGenerator[dict[str, Any], None]:
        if self._events is None:
            self._events = self._transport.stream_lines(
                _ops.attach_call(self._sandbox_id, self.pid)
            )
        return self._events

    @operations("attach_process")
    async def __aiter__(self) -> AsyncIterator[OutputChunk]:
        """Output as it arrives (the output kept from before is replayed first), until the
        command exits; then :meth:`wait` returns at once. Stopping early closes the stream:
        the next iteration or wait attaches again and replays from the start."""
        events = self._stream()
        try:
            async for raw in events:
                chunk = self._collector.feed(raw)
                if chunk is not None:
                    yield chunk
                if self._collector.result is not None:
                    return
        finally:
            if self._collector.result is None:
                self._events = None
                self._collector = self._collector.restarted()
            await events.aclose()

    @operations("attach_process")
    async def wait(
        self,
        on_stdout: Optional[OutputCallback] = None,
        on_stderr: Optional[OutputCallback] = None,
        on_pty: Optional[OutputCallback] = None,
    ) -> CommandResult:
        """Waits for the exit; raises ``CommandExitError`` for a non-zero exit code and
        ``Timeout`` when the command's timeout killed it."""
        if on_stdout or on_pty:
            self._collector.on_stdout = on_stdout or on_pty
        if on_stderr:
            self._collector.on_stderr = on_stderr
        async for _ in self:
            pass
        return _ops.checked(self._collector.finish())

    @operations("signal_process")
    async def kill(self, signal: int = 9) -> bool:
        """Sends ``signal`` (default SIGKILL) to its process group; False if it is gone."""
        return await AsyncCommands(self._transport, self._sandbox_id).kill(self.pid, signal)

    @operations("write_process_stdin")
    async def send_stdin(self, data: Union[str, bytes]) -> None:
        """Writes to its stdin (started with ``stdin=True``) or terminal."""
        await self._transport.request(_ops.stdin_call(self._sandbox_id, self.pid, data, False))

    @operations("write_process_stdin")
    async def close_stdin(self) -> None:
        """Closes its stdin (on a terminal: sends end-of-file)."""
        await self._transport.request(_ops.stdin_call(self._sandbox_id, self.pid, b"", True))


class AsyncCommands:
    """Run commands in a sandbox: ``sandbox.commands``."""

    def __init__(self, transport: AsyncTransport, sandbox_id: str) -> None:
        self._transport = transport
        self._sandbox_id = sandbox_id

    @overload
    async def run(
        self,
        cmd: Cmd,
        *,
        background: Literal[False] = False,
        envs: Optional[Mapping[str, str]] = None,
        cwd: Optional[str] = None,
        user: Optional[str] = None,
        timeout: Optional[float] = None,
        on_stdout: Optional[OutputCallback] = None,
        on_stderr: Optional[OutputCallback] = None,
        stdin: Optional[str] = None,
        tag: Optional[str] = None,
    ) -> CommandResult: ...

    @overload
    async def run(
        self,
        cmd: Cmd,
        *,
        background: Literal[True],
        envs: Optional[Mapping[str, str]] = None,
        cwd: Optional[str] = None,
        user: Optional[str] = None,
        timeout: Optional[float] = None,
        on_stdout: Optional[OutputCallback] = None,
        on_stderr: Optional[OutputCallback] = None,
        stdin: Union[str, bool, None] = None,
        tag: Optional[str] = None,
    ) -> AsyncCommandHandle: ...

    @operations("exec_command", "exec_stream")
    async def run(
        self,
        cmd: Cmd,
        *,
        background: bool = False,
        envs: Optional[Mapping[str, str]] = None,
        cwd: Optional[str] = None,
        user: Optional[str] = None,
        timeout: Optional[float] = None,
        on_stdout: Optional[OutputCallback] = None,
        on_stderr: Optional[OutputCallback] = None,
        stdin: Union[str, bool, None] = None,
        tag: Optional[str] = None,
    ) -> Union[CommandResult, AsyncCommandHandle]:
        """Runs ``cmd`` (a shell line, or an argv list run directly).

        To completion by default: returns the result, raises ``CommandExitError`` on a
        non-zero exit and ``Timeout`` when ``timeout`` (seconds, default 60, 0 for none)
        killed it; ``on_stdout``/``on_stderr`` get output as it comes. With
        ``background=True`` returns a :class:`AsyncCommandHandle` at once; ``stdin=True`` keeps
        its stdin open for ``send_stdin``. A string ``stdin`` is written and closed.
        """
        if stdin is True and not background:
            raise ValueError("stdin=True needs background=True (write it with send_stdin)")
        body = _ops.exec_body(
            cmd,
            background=background,
            envs=envs,
            cwd=cwd,
            user=user,
            timeout=timeout,
            stdin=stdin,
            tag=tag,
        )
        path = _ops.sandbox_path(self._sandbox_id, "/exec")
        wait = _ops.request_timeout_for(body)
        if background:
            started = (
                await self._transport.request(Call("exec_command", "POST", path, json=body))
            ).json()
            handle = AsyncCommandHandle(self._transport, self._sandbox_id, int(started["pid"]))
            handle._collector.on_stdout = on_stdout
            handle._collector.on_stderr = on_stderr
            return handle
        if on_stdout is None and on_stderr is None:
            reply = await self._transport.request(
                Call("exec_command", "POST", path, json=body, timeout=wait or 86400.0)
            )
            return _ops.checked(CommandResult.from_json(reply.json()))
        collector = _ops.EventCollector(on_stdout, on_stderr)
        stream = self._transport.stream_lines(
            Call("exec_stream", "POST", path + "/stream", json=body, timeout=wait or 86400.0)
        )
        async for raw in stream:
            collector.feed(raw)
            if collector.result is not None:
                break
        return _ops.checked(collector.finish())

    @operations("list_processes")
    async def list(self) -> List[ProcessInfo]:
        """AsyncCommands started through the API: running, and recently finished."""
        reply = await self._transport.request(
            Call("list_processes", "GET", _ops.sandbox_path(self._sandbox_id, "/processes"))
        )
        return [ProcessInfo.from_json(p) for p in reply.json()]

    async def connect(self, pid: Union[int, str]) -> AsyncCommandHandle:
        """A handle on a running command, by pid or tag (its output is replayed on wait)."""
        if isinstance(pid, str) and not pid.isdigit():
            for process in await self.list():
                if process.tag == pid:
                    return AsyncCommandHandle(self._transport, self._sandbox_id, process.pid)
            raise KilnError(f"no process tagged {pid!r}")
        return AsyncCommandHandle(self._transport, self._sandbox_id, int(pid))

    @operations("signal_process")
    async def kill(self, pid: Union[int, str], signal: int = 9) -> bool:
        """Sends ``signal`` (default SIGKILL) to a command's process group, by pid or tag;
        False if there is no such command."""
        reply = await self._transport.request(
            Call(
                "signal_process",
                "POST",
                _ops.process_path(self._sandbox_id, pid, "/signal"),
                json={"signal": signal},
                allow=(404,),
            )
        )
        return reply.status != 404

    @operations("write_process_stdin")
    async def send_stdin(self, pid: Union[int, str], data: Union[str, bytes]) -> None:
        """Writes to a command's stdin (started with ``stdin=True``)."""
        await self._transport.request(_ops.stdin_call(self._sandbox_id, pid, data, False))

    @operations("write_process_stdin")
    async def close_stdin(self, pid: Union[int, str]) -> None:
        """Closes a command's stdin."""
        await self._transport.request(_ops.stdin_call(self._sandbox_id, pid, b"", True))


class AsyncPty:
    """Interactive terminals: ``sandbox.pty``."""

    #: The shell a terminal runs when no command is given.
    DEFAULT_SHELL = "if command -v bash >/dev/null; then exec bash -il; else exec sh -il; fi"

    def __init__(self, transport: AsyncTransport, sandbox_id: str) -> None:
        self._transport = transport
        self._sandbox_id = sandbox_id

    @operations("exec_command")
    async def create(
        self,
        rows: int = 24,
        cols: int = 80,
        *,
        cmd: Optional[Cmd] = None,
        envs: Optional[Mapping[str, str]] = None,
        cwd: Optional[str] = None,
        user: Optional[str] = None,
        timeout: float = 0,
    ) -> AsyncCommandHandle:
        """Starts a shell (or ``cmd``) in a terminal of ``rows`` x ``cols``; read it with
        ``handle.wait(on_pty=...)`` or by iterating the handle."""
        body = _ops.exec_body(
            cmd or self.DEFAULT_SHELL,
            background=True,
            envs={"TERM": "xterm-256color", **(envs or {})},
            cwd=cwd,
            user=user,
            timeout=timeout,
            pty=(rows, cols),
        )
        started = (
            await self._transport.request(
                Call(
                    "exec_command", "POST", _ops.sandbox_path(self._sandbox_id, "/exec"), json=body
                )
            )
        ).json()
        return AsyncCommandHandle(self._transport, self._sandbox_id, int(started["pid"]))

    @operations("write_process_stdin")
    async def send_stdin(self, pid: int, data: Union[str, bytes]) -> None:
        """Types into the terminal."""
        await self._transport.request(_ops.stdin_call(self._sandbox_id, pid, data, False))

    @operations("resize_process_terminal")
    async def resize(self, pid: int, rows: int, cols: int) -> None:
        """Changes the terminal's size (the program gets SIGWINCH)."""
        await self._transport.request(
            Call(
                "resize_process_terminal",
                "POST",
                _ops.process_path(self._sandbox_id, pid, "/resize"),
                json={"rows": rows, "cols": cols},
            )
        )

    @operations("signal_process")
    async def kill(self, pid: int) -> bool:
        """Ends the terminal's program; False if it is gone."""
        return await AsyncCommands(self._transport, self._sandbox_id).kill(pid)


class AsyncFiles:
    """The sandbox's file system: ``sandbox.files``. Paths are absolute, or relative to the
    template's working directory."""

    def __init__(self, transport: AsyncTransport, sandbox_id: str) -> None:
        self._transport = transport
        self._sandbox_id = sandbox_id

    def _content(self) -> str:
        return _ops.sandbox_path(self._sandbox_id, "/files/content")

    @overload
    async def read(self, path: str, format: Literal["text"] = "text") -> str: ...
    @overload
    async def read(self, path: str, format: Literal["bytes"]) -> bytes: ...
    @overload
    async def read(self, path: str, format: Literal["stream"]) -> AsyncIterator[bytes]: ...

    @operations("read_file")
    async def read(
        self, path: str, format: Literal["text", "bytes", "stream"] = "text"
    ) -> Union[str, bytes, AsyncIterator[bytes]]:
        """A file's contents as text (UTF-8), bytes, or an iterator of pieces."""
        call = Call("read_file", "GET", self._content(), params={"path": path})
        if format == "stream":
            return self._transport.stream_bytes(call)
        data = (await self._transport.request(call)).body
        return data.decode("utf-8") if format == "text" else data

    @operations("write_file")
    async def write(self, path: str, data: Union[str, bytes, IO[bytes]]) -> WriteInfo:
        """Writes a whole file (made with its parents; replaced atomically: an interrupted
        upload changes nothing). ``data`` may be text, bytes or a binary file object."""
        call = Call("write_file", "PUT", self._content(), params={"path": path})
        if isinstance(data, (str, bytes)):
            call.content = data.encode() if isinstance(data, str) else data
            reply = await self._transport.request(call)
        else:
            source = data

            async def chunks() -> AsyncIterator[bytes]:
                while piece := source.read(_UPLOAD_CHUNK):
                    yield piece

            reply = await self._transport.upload(call, chunks())
        written = reply.json()
        return WriteInfo(path=str(written["path"]), bytes=int(written["bytes"]))

    @operations("list_files")
    async def list(self, path: str, depth: int = 1) -> List[EntryInfo]:
        """A directory's entries, ``depth`` levels deep."""
        reply = await self._transport.request(
            Call(
                "list_files",
                "GET",
                _ops.sandbox_path(self._sandbox_id, "/files"),
                params={"path": path, "depth": depth},
            )
        )
        return [EntryInfo.from_json(e) for e in reply.json()["entries"]]

    @operations("stat_file")
    async def stat(self, path: str) -> EntryInfo:
        """One file's or directory's kind, size, mode and modification time."""
        reply = await self._transport.request(
            Call(
                "stat_file",
                "GET",
                _ops.sandbox_path(self._sandbox_id, "/files/stat"),
                params={"path": path},
            )
        )
        return EntryInfo.from_json(reply.json())

    get_info = stat

    @operations("stat_file")
    async def exists(self, path: str) -> bool:
        """Whether the path exists."""
        try:
            await self.stat(path)
        except NotFoundError:
            return False
        return True

    @operations("make_dir")
    async def make_dir(self, path: str) -> None:
        """Makes a directory and its missing parents."""
        await self._transport.request(
            Call(
                "make_dir",
                "POST",
                _ops.sandbox_path(self._sandbox_id, "/files/mkdir"),
                json={"path": path},
            )
        )

    @operations("remove_file")
    async def remove(self, path: str, recursive: bool = False) -> None:
        """Removes a file, or a directory (its contents too with ``recursive``)."""
        await self._transport.request(
            Call(
                "remove_file",
                "DELETE",
                _ops.sandbox_path(self._sandbox_id, "/files"),
                params={"path": path, "recursive": recursive},
            )
        )

    @operations("rename_file")
    async def rename(self, old_path: str, new_path: str) -> None:
        """Renames (moves) a file or directory."""
        await self._transport.request(
            Call(
                "rename_file",
                "POST",
                _ops.sandbox_path(self._sandbox_id, "/files/rename"),
                json={"from": old_path, "to": new_path},
            )
        )


class AsyncSandbox:
    """A sandbox: a microVM of its own. Make one with :meth:`create` (use it as a context
    manager to destroy it on exit) or reach an existing one with :meth:`connect`."""

    def __init__(self, info: SandboxInfo, transport: AsyncTransport) -> None:
        self._info = info
        self._transport = transport
        self.commands = AsyncCommands(transport, info.sandbox_id)
        self.files = AsyncFiles(transport, info.sandbox_id)
        self.pty = AsyncPty(transport, info.sandbox_id)

    @property
    def sandbox_id(self) -> str:
        return self._info.sandbox_id

    @property
    def info(self) -> SandboxInfo:
        """What the daemon said last (``get_info()`` asks again)."""
        return self._info

    def __repr__(self) -> str:
        return f"AsyncSandbox({self.sandbox_id!r}, template={self._info.template!r})"

    async def __aenter__(self) -> AsyncSandbox:
        return self

    async def __aexit__(
        self,
        exc_type: Optional[type[BaseException]],
        exc: Optional[BaseException],
        tb: Optional[TracebackType],
    ) -> None:
        try:
            await self.kill()
        finally:
            await self.close()

    async def close(self) -> None:
        """Closes this client's connections (the sandbox keeps running)."""
        await self._transport.close()

    @classmethod
    @operations("create_sandbox")
    async def create(
        cls,
        template: Optional[str] = None,
        *,
        timeout: Optional[int] = None,
        metadata: Optional[Mapping[str, str]] = None,
        envs: Optional[Mapping[str, str]] = None,
        cpus: Optional[float] = None,
        memory_mib: Optional[int] = None,
        disk_mib: Optional[int] = None,
        network: Optional[NetworkPolicy] = None,
        public_ports: Optional[bool] = None,
        auto_resume: Optional[bool] = None,
        on_expiry: Optional[Literal["destroy", "pause"]] = None,
        snapshot: Optional[str] = None,
        url: Optional[str] = None,
        api_key: Optional[str] = None,
        request_timeout: Optional[float] = None,
    ) -> AsyncSandbox:
        """Creates a sandbox from ``template`` (the daemon's default, ``python``, if None) or
        from ``snapshot``. ``timeout`` is its time to live in seconds (the daemon's default
        if None); ``envs`` apply to every command. The first create of a template that is
        not built yet builds it, which takes minutes."""
        transport = _transport(url, api_key, request_timeout)
        try:
            call = _ops.create_call(
                template=template,
                timeout=timeout,
                metadata=metadata,
                envs=envs,
                cpus=cpus,
                memory_mib=memory_mib,
                disk_mib=disk_mib,
                network=network,
                public_ports=public_ports,
                auto_resume=auto_resume,
                on_expiry=on_expiry,
                snapshot=snapshot,
                request_timeout=request_timeout,
            )
            info = SandboxInfo.from_json((await transport.request(call)).json())
        except BaseException:
            await transport.close()
            raise
        return cls(info, transport)

    @classmethod
    @operations("get_sandbox")
    async def connect(
        cls,
        sandbox_id: str,
        *,
        url: Optional[str] = None,
        api_key: Optional[str] = None,
        request_timeout: Optional[float] = None,
    ) -> AsyncSandbox:
        """An existing sandbox, by id (a paused one resumes on its first call unless its
        ``auto_resume`` is off)."""
        transport = _transport(url, api_key, request_timeout)
        try:
            reply = await transport.request(
                Call("get_sandbox", "GET", _ops.sandbox_path(sandbox_id))
            )
        except BaseException:
            await transport.close()
            raise
        return cls(SandboxInfo.from_json(reply.json()), transport)

    @staticmethod
    @operations("list_sandboxes")
    async def list(
        *,
        state: Optional[str] = None,
        metadata: Optional[Mapping[str, str]] = None,
        limit: Optional[int] = None,
        cursor: Optional[str] = None,
        url: Optional[str] = None,
        api_key: Optional[str] = None,
    ) -> SandboxPage:
        """One page of this tenant's sandboxes, filtered by state and metadata."""
        data = (await _once(_ops.list_call(state, metadata, limit, cursor), url, api_key)).json()
        return SandboxPage(
            sandboxes=[SandboxInfo.from_json(s) for s in data["sandboxes"]],
            next_cursor=data.get("next_cursor"),
        )

    @staticmethod
    @operations("events")
    async def events(
        *, url: Optional[str] = None, api_key: Optional[str] = None
    ) -> AsyncIterator[SandboxEvent]:
        """Lifecycle events of this tenant's sandboxes from now on, as they happen
        (``lagged`` means some were missed: list again)."""
        transport = _transport(url, api_key, None)
        try:
            async for raw in transport.stream_lines(
                Call("events", "GET", "/v1/events", timeout=86400.0)
            ):
                yield SandboxEvent.from_json(raw)
        finally:
            await transport.close()

    @operations("get_sandbox")
    async def get_info(self) -> SandboxInfo:
        """Asks the daemon for the sandbox's current state."""
        reply = await self._transport.request(
            Call("get_sandbox", "GET", _ops.sandbox_path(self.sandbox_id))
        )
        self._info = SandboxInfo.from_json(reply.json())
        return self._info

    @operations("get_sandbox")
    async def is_running(self) -> bool:
        """Whether it exists and runs."""
        try:
            return (await self.get_info()).state == "running"
        except NotFoundError:
            return False

    @operations("delete_sandbox")
    async def kill(self) -> bool:
        """Destroys the sandbox; False if it was already gone."""
        reply = await self._transport.request(
            Call("delete_sandbox", "DELETE", _ops.sandbox_path(self.sandbox_id), allow=(404,))
        )
        return reply.status != 404

    @operations("update_sandbox")
    async def set_timeout(self, timeout: int) -> None:
        """Sets its time to live to ``timeout`` seconds from now."""
        data = (
            await self._transport.request(_ops.update_call(self.sandbox_id, timeout=timeout))
        ).json()
        self._info = SandboxInfo.from_json(data)

    @operations("update_sandbox")
    async def update(
        self,
        *,
        timeout: Optional[int] = None,
        network: Optional[NetworkPolicy] = None,
        auto_resume: Optional[bool] = None,
        on_expiry: Optional[Literal["destroy", "pause"]] = None,
    ) -> SandboxInfo:
        """Changes its time to live, egress policy (at once: denied connections are cut) or
        pause settings; what is not given stays."""
        call = _ops.update_call(
            self.sandbox_id,
            timeout=timeout,
            network=network,
            auto_resume=auto_resume,
            on_expiry=on_expiry,
        )
        self._info = SandboxInfo.from_json((await self._transport.request(call)).json())
        return self._info

    @operations("keepalive")
    async def keepalive(self) -> None:
        """Restarts its time to live from now."""
        await self._transport.request(
            Call("keepalive", "POST", _ops.sandbox_path(self.sandbox_id, "/keepalive"))
        )

    @operations("pause_sandbox")
    async def pause(self) -> SandboxInfo:
        """Pauses it: memory and state go to disk, it holds no RAM or CPU until resumed (by
        :meth:`resume`, or by its next call when ``auto_resume`` is on)."""
        reply = await self._transport.request(
            Call("pause_sandbox", "POST", _ops.sandbox_path(self.sandbox_id, "/pause"))
        )
        self._info = SandboxInfo.from_json(reply.json())
        return self._info

    @operations("resume_sandbox")
    async def resume(self) -> SandboxInfo:
        """Resumes a paused sandbox: same processes, memory and files."""
        reply = await self._transport.request(
            Call("resume_sandbox", "POST", _ops.sandbox_path(self.sandbox_id, "/resume"))
        )
        self._info = SandboxInfo.from_json(reply.json())
        return self._info

    @operations("fork_sandbox")
    async def fork(
        self,
        count: int = 1,
        *,
        metadata: Optional[Mapping[str, str]] = None,
        timeout: Optional[int] = None,
    ) -> List[AsyncSandbox]:
        """Makes ``count`` (1 to 32) children that continue from this moment: its processes,
        memory and files, each with its own id, network namespace and reseeded RNG."""
        forked = await self.fork_info(count, metadata=metadata, timeout=timeout)
        # Each child has connections of its own: closing one leaves the others working.
        return [
            AsyncSandbox(info, AsyncTransport(self._transport.config)) for info in forked.sandboxes
        ]

    @operations("fork_sandbox")
    async def fork_info(
        self,
        count: int = 1,
        *,
        metadata: Optional[Mapping[str, str]] = None,
        timeout: Optional[int] = None,
    ) -> ForkResult:
        """Like :meth:`fork`, returning the children's descriptions and the fork's cost."""
        reply = await self._transport.request(
            _ops.fork_call(self.sandbox_id, count, metadata, timeout)
        )
        return ForkResult.from_json(reply.json())

    @operations("create_snapshot")
    async def create_snapshot(self, name: str) -> SnapshotInfo:
        """Keeps its memory, device state and disk under ``name`` (it stops briefly and runs
        on); ``Sandbox.create(snapshot=name)`` continues from there, also after a restart."""
        reply = await self._transport.request(
            Call(
                "create_snapshot",
                "POST",
                _ops.sandbox_path(self.sandbox_id, "/snapshots"),
                json={"name": name},
            )
        )
        return SnapshotInfo.from_json(reply.json())

    @operations("kill_all_processes")
    async def kill_all_processes(self) -> int:
        """Kills every process in the sandbox but its agent (what was started, what that
        started, a fork bomb too) and returns how many; the sandbox stays usable."""
        reply = await self._transport.request(
            Call(
                "kill_all_processes",
                "POST",
                _ops.sandbox_path(self.sandbox_id, "/processes/kill"),
            )
        )
        return int(reply.json()["killed"])

    @operations("get_sandbox_metrics")
    async def get_metrics(self) -> SandboxMetrics:
        """What it uses now (CPU time, memory, disk, network bytes), measured on the host; a
        paused sandbox is not resumed."""
        reply = await self._transport.request(
            Call(
                "get_sandbox_metrics",
                "GET",
                _ops.sandbox_path(self.sandbox_id, "/metrics"),
            )
        )
        return SandboxMetrics.from_json(reply.json())

    @operations("open_forward")
    async def forward_port(self, port: int) -> Forward:
        """Forwards a port of the daemon's host to ``port`` of the sandbox, for what is not
        HTTP (a database, SSH); connect to the answer's ``address``. Open to anyone who
        reaches it; a port forwarded already keeps its forward. The operator turns
        forwarding on (``kiln serve --tcp-forward-ports``)."""
        reply = await self._transport.request(
            Call(
                "open_forward",
                "POST",
                _ops.sandbox_path(self.sandbox_id, "/forwards"),
                json={"port": port},
            )
        )
        return Forward.from_json(reply.json())

    @operations("list_forwards")
    async def list_forwards(self) -> List[Forward]:
        """Its plain TCP forwards, by port."""
        reply = await self._transport.request(
            Call("list_forwards", "GET", _ops.sandbox_path(self.sandbox_id, "/forwards"))
        )
        return [Forward.from_json(f) for f in reply.json()["forwards"]]

    @operations("close_forward")
    async def close_forward(self, port: int) -> None:
        """Closes the forward of ``port`` and the connections it carries."""
        await self._transport.request(
            Call(
                "close_forward",
                "DELETE",
                _ops.sandbox_path(self.sandbox_id, f"/forwards/{port}"),
            )
        )

    @operations("console_log")
    async def logs(self, lines: Optional[int] = None) -> str:
        """The end of its console log (the guest kernel's and init's output)."""
        reply = await self._transport.request(
            Call(
                "console_log",
                "GET",
                _ops.sandbox_path(self.sandbox_id, "/logs"),
                params={"lines": lines},
            )
        )
        return reply.body.decode("utf-8", "replace")

    @operations("run_code", "run_code_stream")
    async def run_code(
        self,
        code: str,
        *,
        language: str = "python",
        context: Optional[str] = None,
        envs: Optional[Mapping[str, str]] = None,
        timeout: Optional[float] = None,
        on_stdout: Optional[OutputCallback] = None,
        on_stderr: Optional[OutputCallback] = None,
        on_result: Optional[Callable[[Result], None]] = None,
        on_error: Optional[Callable[[ExecutionError], None]] = None,
    ) -> Execution:
        """Runs ``code`` in the sandbox's code interpreter (the ``python`` template has one):
        variables and imports persist between runs of a ``context`` (``default`` unless
        given; :meth:`create_code_context` makes more). Returns what it printed, the value of
        its last expression and what it displayed (figures as PNG), and the exception it
        raised in ``error`` (not raised here). ``timeout`` (seconds) interrupts a runaway
        run, keeping the context; callbacks get output and results as they come."""
        body = _ops.run_code_body(code, language, context, envs, timeout)
        if not any((on_stdout, on_stderr, on_result, on_error)):
            reply = await self._transport.request(_ops.code_call(self.sandbox_id, body, False))
            return Execution.from_json(reply.json())
        collector = _ops.CodeCollector(on_stdout, on_stderr, on_result, on_error)
        events = self._transport.stream_lines(_ops.code_call(self.sandbox_id, body, True))
        async for raw in events:
            collector.feed(raw)
            if collector.execution is not None:
                break
        return collector.finish()

    @operations("create_code_context")
    async def create_code_context(self) -> str:
        """A new code context (globals of its own); returns its id."""
        call = _ops.code_context_call("create_code_context", self.sandbox_id)
        return str((await self._transport.request(call)).json()["id"])

    @operations("list_code_contexts")
    async def list_code_contexts(self) -> List[str]:
        """The ids of the sandbox's code contexts (``default`` among them)."""
        call = _ops.code_context_call("list_code_contexts", self.sandbox_id)
        return [str(c) for c in (await self._transport.request(call)).json()["contexts"]]

    @operations("delete_code_context")
    async def delete_code_context(self, context: str) -> bool:
        """Deletes a code context and its state; False if there was none."""
        call = _ops.code_context_call("delete_code_context", self.sandbox_id, context)
        return _ops.deleted_context(await self._transport.request(call))

    @operations("interrupt_code")
    async def interrupt_code(self, context: str = "default") -> bool:
        """Interrupts the run going on in ``context`` (it ends with a ``KeyboardInterrupt``
        error; the context keeps its state); False if none was running."""
        call = _ops.code_context_call("interrupt_code", self.sandbox_id, context)
        return bool((await self._transport.request(call)).json()["running"])

    def get_host(self, port: int) -> str:
        """The host name that serves ``port`` of the sandbox: ``<port>-<id>.<domain>``."""
        return _ops.host_for_port(self._info, port)

    def get_port_url(self, port: int) -> str:
        """The URL of ``port`` by host name (send ``info.access_token`` as
        ``X-Kiln-Access-Token`` unless ports are public)."""
        return _ops.port_url(self._info, port)


class AsyncSnapshot:
    """Snapshots of this tenant: ``AsyncSnapshot.list()``, ``get``, ``delete``."""

    @staticmethod
    @operations("list_snapshots")
    async def list(
        *, url: Optional[str] = None, api_key: Optional[str] = None
    ) -> List[SnapshotInfo]:
        data = (await _once(Call("list_snapshots", "GET", "/v1/snapshots"), url, api_key)).json()
        return [SnapshotInfo.from_json(s) for s in data["snapshots"]]

    @staticmethod
    @operations("get_snapshot")
    async def get(
        snapshot: str, *, url: Optional[str] = None, api_key: Optional[str] = None
    ) -> SnapshotInfo:
        """A snapshot by id or name."""
        reply = await _once(Call("get_snapshot", "GET", _ops.snapshot_path(snapshot)), url, api_key)
        return SnapshotInfo.from_json(reply.json())

    @staticmethod
    @operations("delete_snapshot")
    async def delete(
        snapshot: str, *, url: Optional[str] = None, api_key: Optional[str] = None
    ) -> bool:
        """Deletes a snapshot; False if there was none. ``ConflictError`` while sandboxes
        made from it exist (the message lists them)."""
        reply = await _once(
            Call("delete_snapshot", "DELETE", _ops.snapshot_path(snapshot), allow=(404,)),
            url,
            api_key,
        )
        return reply.status != 404


class AsyncTemplate:
    """Templates sandboxes are made from: the daemon's (``base``, ``python``) and this
    tenant's own."""

    @staticmethod
    @operations("list_templates")
    async def list(
        *, url: Optional[str] = None, api_key: Optional[str] = None
    ) -> List[TemplateInfo]:
        data = (await _once(Call("list_templates", "GET", "/v1/templates"), url, api_key)).json()
        return [TemplateInfo.from_json(t) for t in data["templates"]]

    @staticmethod
    @operations("get_template")
    async def get(
        name: str, *, url: Optional[str] = None, api_key: Optional[str] = None
    ) -> TemplateInfo:
        reply = await _once(Call("get_template", "GET", _ops.template_path(name)), url, api_key)
        return TemplateInfo.from_json(reply.json())

    @staticmethod
    @operations("build_template")
    async def build(
        *,
        spec: Optional[str] = None,
        name: Optional[str] = None,
        on_event: Optional[Callable[[BuildEvent], None]] = None,
        url: Optional[str] = None,
        api_key: Optional[str] = None,
    ) -> TemplateInfo:
        """Builds a template of this tenant from ``spec`` (TOML, as in
        ``templates/*/template.toml``), or builds an existing one by ``name`` now; progress
        goes to ``on_event``."""
        transport = _transport(url, api_key, None)
        try:
            async for raw in transport.stream_lines(_ops.build_call(spec, name)):
                event = BuildEvent.from_json(raw)
                if on_event is not None:
                    on_event(event)
                ready = _ops.build_outcome(event)
                if ready is not None:
                    return ready
        finally:
            await transport.close()
        raise KilnError("the template build stream ended without a result")

    @staticmethod
    @operations("delete_template")
    async def delete(
        name: str, *, url: Optional[str] = None, api_key: Optional[str] = None
    ) -> bool:
        """Deletes one of this tenant's templates; False if there was none."""
        reply = await _once(
            Call("delete_template", "DELETE", _ops.template_path(name), allow=(404,)), url, api_key
        )
        return reply.status != 404


@operations("health")
async def async_health(url: Optional[str] = None) -> Health:
    """The daemon's health (no key needed)."""
    transport = AsyncTransport(resolve(url, None, 10.0, require_key=False))
    try:
        data = (await transport.request(Call("health", "GET", "/v1/health"))).json()
    finally:
        await transport.close()
    return Health(
        status=str(data["status"]), version=str(data["version"]), accel=str(data["accel"])
    )
