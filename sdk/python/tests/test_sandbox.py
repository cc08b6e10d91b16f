"""The sync client against a real daemon with real sandboxes."""

from __future__ import annotations

import io
import os
import time

import pytest

import kiln
from kiln import Sandbox, Snapshot, Template

from .conftest import TEMPLATE

pytestmark = pytest.mark.daemon


def test_commands_run_to_completion(sandbox: Sandbox) -> None:
    result = sandbox.commands.run("echo hello; echo oops >&2")
    assert (result.exit_code, result.stdout, result.stderr) == (0, "hello\n", "oops\n")
    argv = sandbox.commands.run(["printf", "%s|", "a b", "$HOME"])
    assert argv.stdout == "a b|$HOME|"
    env = sandbox.commands.run(
        "echo $GREETING $PWD $(id -un)", envs={"GREETING": "hi"}, cwd="/tmp", user="nobody"
    )
    assert env.stdout == "hi /tmp nobody\n"
    assert sandbox.commands.run("cat", stdin="from stdin").stdout == "from stdin"


def test_failures_raise_errors_that_say_what_happened(sandbox: Sandbox) -> None:
    with pytest.raises(kiln.CommandExitError) as failed:
        sandbox.commands.run("echo partial; echo bad thing >&2; exit 3")
    assert failed.value.exit_code == 3
    assert failed.value.stdout == "partial\n"
    assert "bad thing" in str(failed.value)
    started = time.monotonic()
    with pytest.raises(kiln.Timeout, match="timeout"):
        sandbox.commands.run("sleep 30", timeout=1)
    assert time.monotonic() - started < 20
    with pytest.raises(kiln.InvalidRequestError):
        sandbox.commands.run("")


def test_output_streams_to_callbacks_as_it_comes(sandbox: Sandbox) -> None:
    pieces: list[tuple[str, float]] = []
    errors: list[str] = []
    result = sandbox.commands.run(
        "for i in 1 2 3; do echo $i; sleep 0.3; done; echo done >&2",
        on_stdout=lambda text: pieces.append((text, time.monotonic())),
        on_stderr=errors.append,
    )
    assert "".join(text for text, _ in pieces) == "1\n2\n3\n" == result.stdout
    assert "".join(errors) == "done\n"
    # The first line arrived well before the last: streamed, not buffered to the end.
    assert len(pieces) >= 2 and pieces[-1][1] - pieces[0][1] > 0.3


def test_background_commands_stdin_list_connect_kill(sandbox: Sandbox) -> None:
    handle = sandbox.commands.run("cat; echo end", background=True, stdin=True, tag="cat")
    assert handle.pid > 0
    listed = {p.pid: p for p in sandbox.commands.list()}
    assert listed[handle.pid].running and listed[handle.pid].tag == "cat"
    handle.send_stdin("line one\n")
    sandbox.commands.send_stdin(handle.pid, b"\x00\xffbytes\n")
    handle.close_stdin()
    result = handle.wait()
    assert result.stdout.startswith("line one\n") and result.stdout.endswith("bytes\nend\n")

    sleeper = sandbox.commands.run("echo up; sleep 300", background=True, tag="sleeper")
    again = sandbox.commands.connect("sleeper")
    assert again.pid == sleeper.pid
    chunks = iter(again)
    assert next(chunks).text == "up\n"
    assert sleeper.kill()
    with pytest.raises(kiln.CommandExitError) as killed:
        sleeper.wait()
    assert killed.value.signal == 9
    assert not sandbox.commands.kill(999_999)
    with pytest.raises(kiln.ProcessNotFound):
        sandbox.commands.send_stdin(999_999, "x")
    with pytest.raises(kiln.InvalidRequestError, match="stdin"):
        sandbox.commands.send_stdin(handle.pid, "after close")
    with pytest.raises(ValueError):
        sandbox.commands.run("cat", stdin=True)  # type: ignore[call-overload]


def test_pty_sizes_input_and_output(sandbox: Sandbox) -> None:
    terminal = sandbox.pty.create(
        rows=24, cols=80, cmd='stty size; read line; stty size; echo "got $line"'
    )
    seen: list[str] = []
    output = iter(terminal)
    while "24 80" not in "".join(seen):
        seen.append(next(output).text)
    sandbox.pty.resize(terminal.pid, 40, 100)
    sandbox.pty.send_stdin(terminal.pid, "typed\n")
    result = terminal.wait(on_pty=seen.append)
    text = "".join(seen)
    assert "40 100" in text and "got typed" in text, text
    assert result.exit_code == 0
    with pytest.raises(kiln.InvalidRequestError, match="terminal"):
        handle = sandbox.commands.run("sleep 5", background=True)
        try:
            sandbox.pty.resize(handle.pid, 10, 10)
        finally:
            handle.kill()


def test_files(sandbox: Sandbox) -> None:
    files = sandbox.files
    assert files.write("/root/sdk/a.txt", "héllo\n").bytes == len("héllo\n".encode())
    assert files.read("/root/sdk/a.txt") == "héllo\n"
    blob = os.urandom(3 * 1024 * 1024 + 17)
    assert files.write("/root/sdk/blob.bin", io.BytesIO(blob)).bytes == len(blob)
    assert files.read("/root/sdk/blob.bin", format="bytes") == blob
    assert b"".join(files.read("/root/sdk/blob.bin", format="stream")) == blob
    files.write("/root/sdk/small.bin", b"\x00\x01")
    entries = {e.name: e for e in files.list("/root/sdk")}
    assert entries["blob.bin"].size == len(blob) and entries["blob.bin"].kind == "file"
    assert files.stat("/root/sdk").kind == "dir"
    files.make_dir("/root/sdk/d/e")
    assert files.exists("/root/sdk/d/e") and not files.exists("/root/sdk/nope")
    files.rename("/root/sdk/a.txt", "/root/sdk/d/b.txt")
    assert files.read("/root/sdk/d/b.txt") == "héllo\n"
    with pytest.raises(kiln.FileNotFound):
        files.read("/root/sdk/a.txt")
    with pytest.raises(kiln.ConflictError):
        files.remove("/root/sdk/d")  # not empty
    files.remove("/root/sdk/d", recursive=True)
    assert not files.exists("/root/sdk/d")
    # What a command writes, the files API reads, and the other way round.
    sandbox.commands.run("echo from-shell > /root/sdk/shell.txt")
    assert files.read("/root/sdk/shell.txt") == "from-shell\n"


def test_lifecycle_connect_list_timeout_and_errors(
    sandbox: Sandbox, daemon: tuple[str, str]
) -> None:
    url, key = daemon
    info = sandbox.get_info()
    assert info.state == "running" and info.template == TEMPLATE
    assert info.metadata == {"suite": "python-sdk"}
    same = Sandbox.connect(sandbox.sandbox_id)
    try:
        assert same.commands.run("hostname").stdout.strip() == sandbox.sandbox_id
    finally:
        same.close()  # the sandbox runs on: only `with` or kill() destroys it
    page = Sandbox.list(metadata={"suite": "python-sdk"}, state="running")
    assert sandbox.sandbox_id in [s.sandbox_id for s in page.sandboxes]
    first = Sandbox.list(limit=1)
    assert len(first.sandboxes) == 1
    before = sandbox.get_info().expires_at_ms or 0
    sandbox.set_timeout(1200)
    assert (sandbox.get_info().expires_at_ms or 0) > before
    sandbox.keepalive()
    assert sandbox.is_running()
    assert isinstance(sandbox.logs(lines=5), str)
    usage = sandbox.get_metrics()
    assert usage.sandbox_id == sandbox.sandbox_id and usage.state == "running"
    assert (usage.cpu_seconds or 0) > 0 and (usage.memory_bytes or 0) > 0
    assert (usage.memory_limit_bytes or 0) >= (usage.memory_bytes or 0)
    assert (usage.disk_bytes or 0) > 0
    # This suite's daemon runs without sandbox networking, and so without TCP forwarding.
    assert usage.network_rx_bytes is None
    with pytest.raises(kiln.ConflictError, match="forwarding is off"):
        sandbox.forward_port(5432)
    assert sandbox.list_forwards() == []
    with pytest.raises(kiln.NotFoundError):
        sandbox.close_forward(5432)
    sandbox.commands.run(
        "sleep 600 & sleep 600 & touch /tmp/sleepers; wait", background=True, tag="sleepers"
    )
    sandbox.commands.run("while [ ! -e /tmp/sleepers ]; do sleep 0.05; done")
    assert sandbox.kill_all_processes() >= 3  # the shell and its two sleeps
    assert sandbox.commands.run("echo alive").stdout.strip() == "alive"
    with pytest.raises(kiln.SandboxNotFound) as missing:
        Sandbox.connect("sb-000000000000")
    # The daemon's request id, to find the call in its log.
    request_id = missing.value.request_id or ""
    assert request_id.startswith("req_") and request_id in str(missing.value)
    with pytest.raises(kiln.AuthenticationError):
        Sandbox.connect(sandbox.sandbox_id, api_key="kiln_wrong")
    with pytest.raises(kiln.TemplateNotFound):
        Sandbox.create("no-such-template")
    with pytest.raises(kiln.UnavailableError, match="reach"):
        Sandbox.list(url="http://127.0.0.1:9")
    health = kiln.health(url)
    assert health.status == "ok" and health.accel in ("kvm", "tcg")
    assert TEMPLATE in [t.name for t in Template.list()]
    assert Template.get(TEMPLATE).ready
    assert Template.build(name=TEMPLATE).name == TEMPLATE
    assert not Template.delete("no-such-template")
    assert key


def test_pause_resume_fork_snapshot(daemon: tuple[str, str]) -> None:
    with Sandbox.create(TEMPLATE, metadata={"suite": "python-sdk-state"}) as parent:
        parent.commands.run("echo kept > /root/kept; echo in-memory > /dev/shm/mem")
        assert parent.pause().state == "paused"
        assert parent.resume().state == "running"
        assert parent.commands.run("cat /root/kept /dev/shm/mem").stdout == "kept\nin-memory\n"

        parent.pause()
        # A call on a paused sandbox resumes it (auto_resume is on by default).
        assert parent.files.read("/dev/shm/mem") == "in-memory\n"

        children = parent.fork(2, metadata={"child": "yes"})
        try:
            assert len({c.sandbox_id for c in children} | {parent.sandbox_id}) == 3
            for child in children:
                info = child.get_info()
                assert info.parent_id == parent.sandbox_id and info.metadata["child"] == "yes"
                assert child.commands.run("cat /dev/shm/mem; hostname").stdout == (
                    f"in-memory\n{child.sandbox_id}\n"
                )
            children[0].files.write("/root/kept", "changed")
            assert parent.files.read("/root/kept") == "kept\n"
        finally:
            for child in children:
                child.kill()
                child.close()  # a child's connections are its own: the parent's stay open

        snapshot = parent.create_snapshot("sdk-py-snap")
        assert snapshot.sandbox_id == parent.sandbox_id and snapshot.size_bytes > 0
        assert Snapshot.get("sdk-py-snap").snapshot_id == snapshot.snapshot_id
        assert "sdk-py-snap" in [s.name for s in Snapshot.list()]
        with Sandbox.create(snapshot="sdk-py-snap") as restored:
            assert (
                restored.commands.run("cat /root/kept /dev/shm/mem").stdout == "kept\nin-memory\n"
            )
            with pytest.raises(kiln.ConflictError, match=restored.sandbox_id):
                Snapshot.delete("sdk-py-snap")
    assert Snapshot.delete("sdk-py-snap")
    assert not Snapshot.delete("sdk-py-snap")
    with pytest.raises(kiln.SnapshotNotFound):
        Snapshot.get("sdk-py-snap")
    with pytest.raises(kiln.SandboxNotFound):
        Sandbox.connect(parent.sandbox_id)
