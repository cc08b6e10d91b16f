"""The async client against a real daemon: the same operations with ``await``."""

from __future__ import annotations

import anyio
import pytest

import kiln
from kiln import AsyncSandbox, AsyncSnapshot, AsyncTemplate

from .conftest import TEMPLATE

pytestmark = [pytest.mark.daemon, pytest.mark.anyio]


async def test_async_sandbox_end_to_end(daemon: tuple[str, str]) -> None:
    url, _ = daemon
    events: list[kiln.SandboxEvent] = []

    watched: list[str] = []

    async def watch(stop: anyio.Event) -> None:
        async for event in AsyncSandbox.events():
            events.append(event)
            if stop.is_set() and event.type == "destroyed" and event.sandbox_id in watched:
                return

    async with anyio.create_task_group() as tasks:
        stop = anyio.Event()
        tasks.start_soon(watch, stop)
        await anyio.sleep(0.5)  # the subscription is open before the create
        async with await AsyncSandbox.create(
            TEMPLATE, metadata={"suite": "python-sdk-async"}
        ) as sandbox:
            sandbox_id = sandbox.sandbox_id
            watched.append(sandbox_id)
            result = await sandbox.commands.run("echo async; echo err >&2")
            assert (result.stdout, result.stderr) == ("async\n", "err\n")
            streamed: list[str] = []
            await sandbox.commands.run("echo a; sleep 0.2; echo b", on_stdout=streamed.append)
            assert "".join(streamed) == "a\nb\n"
            with pytest.raises(kiln.CommandExitError) as failed:
                await sandbox.commands.run("exit 4")
            assert failed.value.exit_code == 4

            handle = await sandbox.commands.run("cat", background=True, stdin=True)
            await handle.send_stdin("piped")
            await handle.close_stdin()
            assert (await handle.wait()).stdout == "piped"
            listed = await sandbox.commands.list()
            assert handle.pid in [p.pid for p in listed]

            terminal = await sandbox.pty.create(cmd='read line; echo "[$line]"')
            await sandbox.pty.send_stdin(terminal.pid, "hi\n")
            seen: list[str] = []
            await terminal.wait(on_pty=seen.append)
            assert "[hi]" in "".join(seen)

            await sandbox.files.write("/root/async.txt", "content")
            assert await sandbox.files.read("/root/async.txt") == "content"
            pieces = [p async for p in await sandbox.files.read("/root/async.txt", format="stream")]
            assert b"".join(pieces) == b"content"
            assert await sandbox.files.exists("/root/async.txt")
            assert [e.name for e in await sandbox.files.list("/root") if e.name == "async.txt"]

            info = await sandbox.get_info()
            assert info.state == "running"
            page = await AsyncSandbox.list(metadata={"suite": "python-sdk-async"})
            assert [s.sandbox_id for s in page.sandboxes] == [sandbox_id]
            await sandbox.set_timeout(600)
            await sandbox.keepalive()
            with pytest.raises(kiln.ConflictError, match="code interpreter"):
                await sandbox.run_code("1")
            children = await sandbox.fork(1)
            assert await children[0].commands.run("cat /root/async.txt") is not None
            assert await children[0].kill()
            stop.set()
        with anyio.fail_after(60):
            while not any(e.type == "destroyed" and e.sandbox_id == sandbox_id for e in events):
                await anyio.sleep(0.1)
        await anyio.sleep(1)  # time for a duplicate to arrive, if there were one
        tasks.cancel_scope.cancel()
    types = {(e.type, e.sandbox_id) for e in events}
    assert ("created", sandbox_id) in types and ("destroyed", sandbox_id) in types, types
    destroyed = [e for e in events if e.type == "destroyed" and e.sandbox_id == sandbox_id]
    assert len(destroyed) == 1, destroyed
    # Events name their kind under `type`, as exec stream items do.
    assert all(e.raw.get("type") == e.type for e in events), events
    with pytest.raises(kiln.SandboxNotFound):
        await AsyncSandbox.connect(sandbox_id)
    assert (await kiln.async_health(url)).status == "ok"
    assert TEMPLATE in [t.name for t in await AsyncTemplate.list()]
    assert (await AsyncTemplate.get(TEMPLATE)).ready
    assert await AsyncSnapshot.list() is not None


async def test_async_run_code(daemon: tuple[str, str]) -> None:
    async with await AsyncSandbox.create("python", metadata={"suite": "python-sdk-async"}) as box:
        assert (await box.run_code("a = 20\na + 22")).text == "42"
        seen: list[str] = []
        done = await box.run_code("print(a)", on_stdout=seen.append)
        assert "".join(seen) == "20\n" and done.error is None
        context = await box.create_code_context()
        assert context in await box.list_code_contexts()
        assert not await box.interrupt_code(context)
        assert await box.delete_code_context(context)
