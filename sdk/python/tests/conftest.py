"""Fixtures: a real daemon's address and key (scripts/tests/sdk.sh starts one), and a
sandbox shared by a module's tests."""

from __future__ import annotations

import os
from typing import Iterator

import pytest

from kiln import Sandbox

#: The template the suite's sandboxes are made from.
TEMPLATE = os.environ.get("KILN_TEST_TEMPLATE", "base")


@pytest.fixture(scope="session")
def daemon() -> tuple[str, str]:
    url, key = os.environ.get("KILN_URL"), os.environ.get("KILN_API_KEY")
    if not url or not key:
        pytest.fail(
            "KILN_URL and KILN_API_KEY are not set: run `bash scripts/tests/sdk.sh python`, "
            "which starts a daemon for these tests"
        )
    return url, key


@pytest.fixture(scope="module")
def sandbox(daemon: tuple[str, str]) -> Iterator[Sandbox]:
    with Sandbox.create(TEMPLATE, timeout=900, metadata={"suite": "python-sdk"}) as sandbox:
        yield sandbox


@pytest.fixture
def anyio_backend() -> str:
    return "asyncio"
