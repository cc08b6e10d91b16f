"""Unit tests without a daemon: error mapping, streamed events, request bodies, config."""

from __future__ import annotations

from pathlib import Path

import pytest

import kiln
from kiln import _config, _ops
from kiln.exceptions import error_from_response


@pytest.mark.parametrize(
    ("status", "body", "cls"),
    [
        (
            401,
            b'{"code":"unauthenticated","message":"missing or invalid API key"}',
            kiln.AuthenticationError,
        ),
        (403, b'{"code":"forbidden","message":"admin only"}', kiln.ForbiddenError),
        (404, b'{"code":"not_found","message":"sandbox `sb-1` not found"}', kiln.SandboxNotFound),
        (404, b'{"code":"not_found","message":"template `py` not found"}', kiln.TemplateNotFound),
        (404, b'{"code":"not_found","message":"snapshot `s` not found"}', kiln.SnapshotNotFound),
        (
            404,
            b'{"code":"not_found","message":"path `/x: No such file` not found"}',
            kiln.FileNotFound,
        ),
        (404, b'{"code":"not_found","message":"process `7` not found"}', kiln.ProcessNotFound),
        (404, b'{"code":"not_found","message":"route not found"}', kiln.NotFoundError),
        (400, b'{"code":"invalid_request","message":"ttl_secs: bad"}', kiln.InvalidRequestError),
        (409, b'{"code":"conflict","message":"in use"}', kiln.ConflictError),
        (413, b'{"code":"too_large","message":"big"}', kiln.TooLargeError),
        (422, b'{"code":"guest_error","message":"in the sandbox: x"}', kiln.SandboxError),
        (503, b'{"code":"unavailable","message":"busy"}', kiln.UnavailableError),
        (429, b'{"code":"quota_exceeded","message":"at most 2"}', kiln.QuotaExceeded),
        (507, b'{"code":"insufficient_storage","message":"reserve"}', kiln.InsufficientStorage),
        (504, b'{"code":"timeout","message":"slow"}', kiln.Timeout),
        (502, b"<html>bad gateway</html>", kiln.KilnError),
    ],
)
def test_errors_map_to_classes_by_meaning(status: int, body: bytes, cls: type) -> None:
    error = error_from_response(status, body, {"x-request-id": "req-1"})
    assert type(error) is cls
    assert error.status == status
    assert error.request_id == "req-1"
    assert error.message
    assert "req-1" in str(error)


def test_timeout_is_also_the_builtin_timeout_error() -> None:
    assert isinstance(kiln.Timeout("x"), TimeoutError)


def test_request_id_in_the_body_wins_and_empty_bodies_say_so() -> None:
    error = error_from_response(500, b'{"code":"internal","message":"m","request_id":"r2"}', {})
    assert error.request_id == "r2"
    assert "empty body" in error_from_response(500, b"", {}).message


def test_collector_streams_and_builds_the_result() -> None:
    seen: list[str] = []
    collector = _ops.EventCollector(on_stdout=seen.append)
    collector.feed({"type": "start", "pid": 7})
    collector.feed({"type": "stdout", "data": "a\n"})
    collector.feed({"type": "stderr", "data_b64": "/w=="})  # not UTF-8
    collector.feed({"type": "stdout", "data": "b"})
    assert collector.result is None
    collector.feed({"type": "exit", "exit_code": 3, "signal": None, "timed_out": False})
    result = collector.finish()
    assert collector.pid == 7 and seen == ["a\n", "b"]
    assert result.stdout == "a\nb" and result.stderr == "\ufffd" and result.exit_code == 3
    with pytest.raises(kiln.CommandExitError) as raised:
        _ops.checked(result)
    assert raised.value.exit_code == 3 and raised.value.stdout == "a\nb"


def test_collector_errors_and_truncated_streams() -> None:
    with pytest.raises(kiln.KilnError, match="broke: gone"):
        _ops.EventCollector().feed({"type": "error", "code": "unavailable", "message": "gone"})
    with pytest.raises(kiln.KilnError, match="ended before its exit"):
        _ops.EventCollector().finish()
    timed_out = kiln.CommandResult(exit_code=None, signal=9, stdout="", stderr="", timed_out=True)
    with pytest.raises(kiln.Timeout, match="timeout"):
        _ops.checked(timed_out)


def test_exec_body_names_the_api_fields() -> None:
    body = _ops.exec_body(
        ["echo", "x"],
        envs={"A": "1"},
        cwd="/tmp",
        user="nobody",
        timeout=2.5,
        stdin=True,
        background=True,
        tag="t",
        pty=(24, 80),
    )
    assert body == {
        "command": ["echo", "x"],
        "env": {"A": "1"},
        "cwd": "/tmp",
        "user": "nobody",
        "timeout_ms": 2500,
        "open_stdin": True,
        "background": True,
        "tag": "t",
        "pty": {"rows": 24, "cols": 80},
    }
    assert _ops.exec_body("true")["timeout_ms"] == 60_000
    assert "timeout_ms" not in _ops.exec_body("true", timeout=0)
    assert _ops.exec_body("cat", stdin="hi")["stdin"] == "hi"
    assert _ops.request_timeout_for({"timeout_ms": 1000}) == 31.0
    assert _ops.request_timeout_for({}) is None


def test_port_hosts_come_from_the_sandbox_url() -> None:
    info = kiln.SandboxInfo.from_json(
        {"id": "sb-1", "ports": {"public": False, "url": "http://{port}-sb-1.localhost:7070/"}}
    )
    assert _ops.host_for_port(info, 8000) == "8000-sb-1.localhost:7070"
    assert _ops.port_url(info, 3000) == "http://3000-sb-1.localhost:7070/"
    with pytest.raises(ValueError):
        _ops.host_for_port(info, 0)
    with pytest.raises(kiln.KilnError, match="networking"):
        _ops.host_for_port(kiln.SandboxInfo.from_json({"id": "sb-2"}), 80)


def test_config_precedence(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    (tmp_path / "kiln").mkdir()
    (tmp_path / "kiln" / "cli.toml").write_text('url = "http://file:1"\napi_key = "file-key"\n')
    monkeypatch.setenv("XDG_CONFIG_HOME", str(tmp_path))
    monkeypatch.delenv("KILN_URL", raising=False)
    monkeypatch.delenv("KILN_API_KEY", raising=False)
    assert _config.resolve() == _config.ConnectionConfig("http://file:1", "file-key", 300.0)
    monkeypatch.setenv("KILN_URL", "http://env:2/")
    monkeypatch.setenv("KILN_API_KEY", "env-key")
    assert _config.resolve().url == "http://env:2"
    assert _config.resolve("http://arg:3", "arg-key", 5).api_key == "arg-key"
    monkeypatch.delenv("KILN_API_KEY")
    (tmp_path / "kiln" / "cli.toml").write_text("")
    with pytest.raises(kiln.AuthenticationError, match="KILN_API_KEY"):
        _config.resolve()
    (tmp_path / "kiln" / "cli.toml").write_text("url = [")
    with pytest.raises(kiln.InvalidRequestError, match="cli.toml"):
        _config.resolve()


def test_network_policies_carry_their_limits_both_ways() -> None:
    limited = kiln.NetworkPolicy(
        internet=False, allow_out=["example.test"], bandwidth_mbit=8, max_connections=64
    )
    body = limited.to_json()
    assert body == {
        "internet": False,
        "allow_out": ["example.test"],
        "deny_out": [],
        "bandwidth_mbit": 8,
        "max_connections": 64,
    }
    assert kiln.NetworkPolicy.from_json(body) == limited
    # No limit is no field, and a policy without them reads back without them.
    assert "bandwidth_mbit" not in kiln.NetworkPolicy().to_json()
    assert kiln.NetworkPolicy.from_json({"internet": True}).max_connections is None
