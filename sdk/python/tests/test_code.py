"""Stateful code execution (``run_code``) in the python template's interpreter."""

from __future__ import annotations

import base64
import threading
import time

import pytest

import kiln
from kiln import Sandbox

pytestmark = pytest.mark.daemon


def test_run_code_keeps_state_and_returns_rich_results(daemon: tuple[str, str]) -> None:
    with Sandbox.create("python", metadata={"suite": "python-sdk-code"}) as sandbox:
        first = sandbox.run_code("import math\nx = 6 * 7\nprint('side effect')\nx")
        assert first.text == "42" and first.error is None
        assert first.logs.stdout == ["side effect\n"] and first.execution_count >= 1
        assert sandbox.run_code("x + 1").text == "43"

        failed = sandbox.run_code("def f():\n    return 1 / 0\nf()")
        assert failed.error is not None and failed.error.name == "ZeroDivisionError"
        assert "<cell>" in failed.error.traceback and "interpreter.py" not in failed.error.traceback

        frame = sandbox.run_code("import pandas as pd\npd.DataFrame({'a': [1, 2]})")
        assert frame.results[0].html is not None and "<table" in frame.results[0].html
        figure = sandbox.run_code("import matplotlib.pyplot as plt\nplt.plot([1, 2, 3])\nNone")
        pngs = [r.png for r in figure.results if r.png]
        assert pngs and base64.b64decode(pngs[0]).startswith(b"\x89PNG")

        seen: list[str] = []
        results: list[kiln.Result] = []
        streamed = sandbox.run_code(
            "import time\nfor i in range(3):\n    print(i)\n    time.sleep(0.2)\n'end'",
            on_stdout=seen.append,
            on_result=results.append,
        )
        assert "".join(seen) == "0\n1\n2\n" and streamed.text == "'end'"
        assert [r.text for r in results] == ["'end'"]

        env = sandbox.run_code("import os\nos.environ['GREETING']", envs={"GREETING": "hi"})
        assert env.text == "'hi'"

        # A runaway run is interrupted; the context keeps its state.
        started = time.monotonic()
        runaway = sandbox.run_code("while True:\n    pass", timeout=1)
        assert runaway.timed_out and runaway.error is not None
        assert runaway.error.name == "KeyboardInterrupt" and time.monotonic() - started < 20
        assert sandbox.run_code("x").text == "42"

        # An interrupt from elsewhere.
        outcome: list[kiln.Execution] = []
        worker = threading.Thread(
            target=lambda: outcome.append(sandbox.run_code("import time\ntime.sleep(120)"))
        )
        worker.start()
        deadline = time.monotonic() + 30
        while not sandbox.interrupt_code() and time.monotonic() < deadline:
            time.sleep(0.1)
        worker.join(30)
        assert outcome and outcome[0].error is not None
        assert outcome[0].error.name == "KeyboardInterrupt"
        assert not sandbox.interrupt_code()

        # Contexts: globals of their own.
        context = sandbox.create_code_context()
        missing = sandbox.run_code("x", context=context)
        assert missing.error is not None and missing.error.name == "NameError"
        assert sandbox.run_code("y = 1\ny", context=context).text == "1"
        assert set(sandbox.list_code_contexts()) >= {"default", context}
        assert sandbox.delete_code_context(context)
        assert not sandbox.delete_code_context(context)
        with pytest.raises(kiln.NotFoundError):
            sandbox.run_code("1", context=context)
        with pytest.raises(kiln.InvalidRequestError, match="language"):
            sandbox.run_code("1", language="cobol")

        # Forks continue the interpreter's state with random streams of their own.
        sandbox.run_code("import random")
        children = sandbox.fork(2)
        try:
            draws = {child.run_code("random.random()").text for child in children}
            assert len(draws) == 2
            assert all(child.run_code("x").text == "42" for child in children)
        finally:
            for child in children:
                child.kill()


def test_run_code_needs_an_interpreter(sandbox: Sandbox) -> None:
    with pytest.raises(kiln.ConflictError, match="code interpreter"):
        sandbox.run_code("1 + 1")
