"""Clients of kiln's MCP server, over both transports, made with the official MCP Python SDK.

The daemon comes from the environment (scripts/tests/sdk.sh starts one): KILN_URL,
KILN_API_KEY (a tenant's key), KILN_OTHER_API_KEY (another tenant's), KILN_BIN (the `kiln`
binary, run as `kiln mcp` for stdio) and KILN_MCP_ALLOWED_ORIGIN (an origin the daemon allows).
"""

import os
from contextlib import asynccontextmanager
from typing import AsyncIterator

import pytest
from mcp import Client, StdioServerParameters
from mcp.client.streamable_http import streamable_http_client
from mcp.shared._httpx_utils import create_mcp_http_client

URL = os.environ["KILN_URL"]
KEY = os.environ["KILN_API_KEY"]
OTHER_KEY = os.environ["KILN_OTHER_API_KEY"]
KILN_BIN = os.environ["KILN_BIN"]
ALLOWED_ORIGIN = os.environ["KILN_MCP_ALLOWED_ORIGIN"]


@pytest.fixture
def anyio_backend() -> str:
    return "asyncio"


@asynccontextmanager
async def connect(transport: str, key: str = KEY, mode: str = "auto") -> AsyncIterator[Client]:
    """An MCP client of kiln: `http` is the daemon's /mcp, `stdio` a `kiln mcp` process."""
    if transport == "http":
        http = create_mcp_http_client(headers={"Authorization": f"Bearer {key}"})
        server = streamable_http_client(f"{URL}/mcp", http_client=http)
        async with http, Client(server, mode=mode, cache=None) as client:
            yield client
    else:
        params = StdioServerParameters(
            command=KILN_BIN,
            args=["mcp"],
            env={"KILN_URL": URL, "KILN_API_KEY": key, "PATH": os.environ["PATH"]},
        )
        async with Client(params, mode=mode, cache=None) as client:
            yield client
