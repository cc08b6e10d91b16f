"""kiln's MCP tools through the official MCP Python SDK, over streamable HTTP (the daemon's
/mcp) and stdio (`kiln mcp`), against real sandboxes."""

import base64
from typing import Any

import httpx2
import pytest
from mcp.shared.exceptions import MCPError
from mcp_types import CallToolResult, EmbeddedResource, ImageContent, TextContent

from conftest import ALLOWED_ORIGIN, KEY, OTHER_KEY, URL, connect

pytestmark = pytest.mark.anyio

TOOLS = {
    "create_sandbox",
    "list_sandboxes",
    "destroy_sandbox",
    "run_code",
    "run_command",
    "read_file",
    "write_file",
    "list_files",
    "fork_sandbox",
    "create_snapshot",
    "list_templates",
}


def leaves(error: BaseException) -> list[BaseException]:
    """The exceptions inside (nested) exception groups."""
    if isinstance(error, BaseExceptionGroup):
        return [leaf for inner in error.exceptions for leaf in leaves(inner)]
    return [error]


def texts(result: CallToolResult) -> str:
    return "\n".join(c.text for c in result.content if isinstance(c, TextContent))


def ok(result: CallToolResult) -> CallToolResult:
    assert not result.is_error, texts(result)
    return result


def failed(result: CallToolResult) -> str:
    assert result.is_error, result
    return texts(result)


async def create(client: Any, **arguments: Any) -> str:
    result = ok(await client.call_tool("create_sandbox", {"timeout_secs": 600, **arguments}))
    sandbox_id = result.structured_content["id"]
    assert sandbox_id in texts(result)
    return str(sandbox_id)


@pytest.mark.parametrize("transport", ["http", "stdio"])
async def test_tools_are_listed_with_their_schemas(transport: str) -> None:
    async with connect(transport) as client:
        assert client.server_info is not None and client.server_info.name == "kiln"
        tools = {tool.name: tool for tool in (await client.list_tools()).tools}
        assert set(tools) == TOOLS
        run_code = tools["run_code"]
        assert set(run_code.input_schema["required"]) == {"sandbox_id", "code"}
        assert run_code.description and "state persists" in run_code.description
        assert tools["destroy_sandbox"].annotations is not None
        assert tools["destroy_sandbox"].annotations.destructive_hint is True
        assert tools["list_files"].annotations is not None
        assert tools["list_files"].annotations.read_only_hint is True


@pytest.mark.parametrize("transport", ["http", "stdio"])
async def test_commands_and_files_in_a_sandbox(transport: str) -> None:
    async with connect(transport) as client:
        sandbox = await create(client, template="base", metadata={"suite": "mcp"})
        try:
            ran = ok(
                await client.call_tool(
                    "run_command",
                    {"sandbox_id": sandbox, "command": "echo out; echo err >&2; exit 3"},
                )
            )
            assert ran.structured_content["exit_code"] == 3
            assert "exit code 3" in texts(ran) and "out" in texts(ran) and "err" in texts(ran)

            wrote = ok(
                await client.call_tool(
                    "write_file",
                    {"sandbox_id": sandbox, "path": "/tmp/mcp/notes.txt", "content": "héllo\n"},
                )
            )
            assert wrote.structured_content["bytes"] == len("héllo\n".encode())
            binary = bytes(range(256))
            ok(
                await client.call_tool(
                    "write_file",
                    {
                        "sandbox_id": sandbox,
                        "path": "/tmp/mcp/blob.bin",
                        "content": base64.b64encode(binary).decode(),
                        "base64": True,
                    },
                )
            )

            read = ok(
                await client.call_tool(
                    "read_file", {"sandbox_id": sandbox, "path": "/tmp/mcp/notes.txt"}
                )
            )
            resource = read.content[0]
            assert isinstance(resource, EmbeddedResource)
            assert getattr(resource.resource, "text") == "héllo\n"
            read = ok(
                await client.call_tool(
                    "read_file", {"sandbox_id": sandbox, "path": "/tmp/mcp/blob.bin"}
                )
            )
            resource = read.content[0]
            assert isinstance(resource, EmbeddedResource)
            assert base64.b64decode(getattr(resource.resource, "blob")) == binary

            listed = ok(
                await client.call_tool("list_files", {"sandbox_id": sandbox, "path": "/tmp/mcp"})
            )
            names = {entry["path"] for entry in listed.structured_content["entries"]}
            assert names == {"/tmp/mcp/notes.txt", "/tmp/mcp/blob.bin"}

            # Failures are tool results the model can read, and change nothing.
            missing = failed(
                await client.call_tool(
                    "read_file", {"sandbox_id": sandbox, "path": "/tmp/mcp/absent"}
                )
            )
            assert "not_found" in missing or "No such file" in missing
            assert "absolute" in failed(
                await client.call_tool("list_files", {"sandbox_id": sandbox, "path": "tmp"})
            )
            assert "not_found" in failed(
                await client.call_tool(
                    "run_command", {"sandbox_id": "sb-doesnotexist", "command": "true"}
                )
            )
            # An id is one path segment: it cannot reach another route (here: the key list).
            traversal = failed(await client.call_tool("destroy_sandbox", {"sandbox_id": "../keys"}))
            assert "not_found" in traversal
            # Parameters are checked against the schema before anything runs.
            assert "command" in failed(
                await client.call_tool("run_command", {"sandbox_id": sandbox})
            )

            listed = ok(await client.call_tool("list_sandboxes", {}))
            assert sandbox in {s["id"] for s in listed.structured_content["sandboxes"]}
        finally:
            ok(await client.call_tool("destroy_sandbox", {"sandbox_id": sandbox}))
        listed = ok(await client.call_tool("list_sandboxes", {}))
        assert sandbox not in {s["id"] for s in listed.structured_content["sandboxes"]}


async def test_code_fork_and_snapshot() -> None:
    async with connect("http") as client:
        templates = ok(await client.call_tool("list_templates", {}))
        assert "python" in texts(templates)
        sandbox = await create(client, template="python")
        made = [sandbox]
        try:
            ok(await client.call_tool("run_code", {"sandbox_id": sandbox, "code": "x = 6 * 7"}))
            result = ok(
                await client.call_tool(
                    "run_code", {"sandbox_id": sandbox, "code": "print('side'); x"}
                )
            )
            assert "result: 42" in texts(result) and "side" in texts(result)
            figure = ok(
                await client.call_tool(
                    "run_code",
                    {
                        "sandbox_id": sandbox,
                        "code": "import matplotlib.pyplot as plt\nplt.plot([1, 2, 3])\nplt.show()",
                    },
                )
            )
            images = [c for c in figure.content if isinstance(c, ImageContent)]
            assert images and images[0].mime_type == "image/png"
            assert base64.b64decode(images[0].data).startswith(b"\x89PNG")
            raised = ok(
                await client.call_tool("run_code", {"sandbox_id": sandbox, "code": "1 / 0"})
            )
            assert "ZeroDivisionError" in texts(raised)

            ok(
                await client.call_tool(
                    "write_file", {"sandbox_id": sandbox, "path": "/root/mark", "content": "m"}
                )
            )
            forked = ok(await client.call_tool("fork_sandbox", {"sandbox_id": sandbox}))
            child = forked.structured_content["sandboxes"][0]["id"]
            made.append(child)
            # The child continues from the fork: the interpreter's state and the file.
            result = ok(await client.call_tool("run_code", {"sandbox_id": child, "code": "x + 1"}))
            assert "result: 43" in texts(result)

            snapshot = ok(
                await client.call_tool(
                    "create_snapshot", {"sandbox_id": sandbox, "name": "mcp-suite"}
                )
            )
            snapshot_id = snapshot.structured_content["id"]
            restored = await create(client, snapshot=snapshot_id)
            made.append(restored)
            ran = ok(
                await client.call_tool(
                    "run_command", {"sandbox_id": restored, "command": "cat /root/mark"}
                )
            )
            assert ran.structured_content["stdout"] == "m"
        finally:
            for sandbox_id in made:
                await client.call_tool("destroy_sandbox", {"sandbox_id": sandbox_id})
    async with httpx2.AsyncClient() as http:
        headers = {"Authorization": f"Bearer {KEY}"}
        deleted = await http.delete(f"{URL}/v1/snapshots/{snapshot_id}", headers=headers)
        assert deleted.status_code == 204


@pytest.mark.parametrize("transport", ["http", "stdio"])
async def test_a_tenant_sees_only_its_own_sandboxes(transport: str) -> None:
    async with connect("http") as owner:
        sandbox = await create(owner, template="base")
        try:
            async with connect(transport, key=OTHER_KEY) as other:
                listed = ok(await other.call_tool("list_sandboxes", {}))
                assert sandbox not in {s["id"] for s in listed.structured_content["sandboxes"]}
                refused = failed(
                    await other.call_tool("run_command", {"sandbox_id": sandbox, "command": "true"})
                )
                assert "not_found" in refused
            if transport == "http":
                # Refused before MCP starts (HTTP 401), so the client cannot connect.
                with pytest.raises(BaseException) as refused_at_connect:
                    async with connect(transport, key="kiln_not-a-key"):
                        pass
                # (The raw 401 is checked in test_http_needs_a_key_and_an_allowed_origin.)
                assert any(isinstance(e, MCPError) for e in leaves(refused_at_connect.value))
            else:
                # `kiln mcp` starts, and each tool says what is wrong.
                async with connect(transport, key="kiln_not-a-key") as stranger:
                    refused = failed(await stranger.call_tool("list_sandboxes", {}))
                    assert "unauthenticated" in refused and "KILN_API_KEY" in refused
        finally:
            ok(await owner.call_tool("destroy_sandbox", {"sandbox_id": sandbox}))


async def test_the_legacy_handshake_works_too() -> None:
    async with connect("http", mode="legacy") as client:
        assert client.protocol_version < "2026-07-28"
        assert set(t.name for t in (await client.list_tools()).tools) == TOOLS


INITIALIZE = {
    "jsonrpc": "2.0",
    "id": 1,
    "method": "initialize",
    "params": {
        "protocolVersion": "2025-06-18",
        "capabilities": {},
        "clientInfo": {"name": "raw", "version": "1"},
    },
}
ACCEPT = {"Accept": "application/json, text/event-stream"}


async def test_http_needs_a_key_and_an_allowed_origin() -> None:
    async with httpx2.AsyncClient() as http:
        anonymous = await http.post(f"{URL}/mcp", json=INITIALIZE, headers=ACCEPT)
        assert anonymous.status_code == 401
        assert anonymous.headers["www-authenticate"] == "Bearer"
        wrong = await http.post(
            f"{URL}/mcp",
            json=INITIALIZE,
            headers={**ACCEPT, "Authorization": "Bearer kiln_wrong"},
        )
        assert wrong.status_code == 401
        keyed = {**ACCEPT, "Authorization": f"Bearer {KEY}"}
        # A web page's request (DNS rebinding, a hostile site) carries its Origin.
        hostile = await http.post(
            f"{URL}/mcp", json=INITIALIZE, headers={**keyed, "Origin": "http://evil.example"}
        )
        assert hostile.status_code == 403
        allowed = await http.post(
            f"{URL}/mcp", json=INITIALIZE, headers={**keyed, "Origin": ALLOWED_ORIGIN}
        )
        assert allowed.status_code == 200, allowed.text
        assert allowed.json()["result"]["serverInfo"]["name"] == "kiln"
        plain = await http.post(f"{URL}/mcp", json=INITIALIZE, headers=keyed)
        assert plain.status_code == 200
        # Malformed JSON-RPC is a clear error, not a crash.
        garbage = await http.post(
            f"{URL}/mcp",
            content=b"{not json",
            headers={**keyed, "Content-Type": "application/json"},
        )
        assert 400 <= garbage.status_code < 500
        # The daemon still serves.
        again = await http.post(f"{URL}/mcp", json=INITIALIZE, headers=keyed)
        assert again.status_code == 200
