"""kiln's code interpreter: stateful Python execution for `run_code`, inside the sandbox.

Started by the template's `[start]` command before the template is snapshotted, so every
sandbox made from it has it running, warm, with its default context's imports done. The
host reaches it through the agent (a stream to this unix socket); nothing else talks to it.

Protocol: one JSON request per connection, answered by newline-delimited JSON events.
  {"op": "run", "code": "...", "context": "default", "env": {...}, "timeout_ms": 30000}
      -> {"type": "stdout"|"stderr", "text": ...}*
         {"type": "display", "data": {mime: value}}*          (figures, display())
         {"type": "result", "data": {mime: value}}?           (the last expression's value)
         {"type": "error", "name": ..., "value": ..., "traceback": ...}?
         {"type": "done", "execution_count": n, "timed_out": bool}
  {"op": "create_context"}               -> {"type": "context", "id": ...}
  {"op": "list_contexts"}                -> {"type": "contexts", "ids": [...]}
  {"op": "delete_context", "context": id} -> {"type": "deleted"}
  {"op": "interrupt", "context": id}     -> {"type": "interrupted", "running": bool}
  anything wrong                          -> {"type": "failure", "message": ...}

Each context is a worker process forked from this server with globals of its own; a run
executes in it, so a runaway cell is stopped by SIGINT to that worker (KeyboardInterrupt)
without losing its state. Closing the connection during a run interrupts it.
"""

from __future__ import annotations

import argparse
import ast
import base64
import io
import json
import os
import random
import signal
import socket
import sys
import threading
import time
import traceback
import uuid

#: Largest request the server reads.
MAX_REQUEST = 16 << 20
#: Modules the default context imports before the snapshot, so a first call does not pay.
WARM_IMPORTS = ("numpy", "pandas", "matplotlib", "matplotlib.pyplot")


def send(sock: socket.socket, event: dict) -> None:
    sock.sendall(json.dumps(event).encode() + b"\n")


def send_quietly(sock: socket.socket, event: dict) -> None:
    """Sends to a host that may have gone away."""
    try:
        send(sock, event)
    except OSError:
        pass


# ---------------------------------------------------------------------------- the worker


class _Stream(io.TextIOBase):
    """stdout or stderr of a cell: each write becomes an event at once."""

    def __init__(self, emit, name: str) -> None:
        self._emit = emit
        self._name = name

    def writable(self) -> bool:
        return True

    def write(self, text: str) -> int:
        if text:
            self._emit({"type": self._name, "text": text})
        return len(text)


def _mime_bundle(value) -> dict:
    """What a value offers to show: text always, rich forms where it has them."""
    data = {"text/plain": repr(value)}
    for method, mime in (
        ("_repr_html_", "text/html"),
        ("_repr_markdown_", "text/markdown"),
        ("_repr_svg_", "image/svg+xml"),
        ("_repr_png_", "image/png"),
        ("_repr_jpeg_", "image/jpeg"),
        ("_repr_json_", "application/json"),
        ("_repr_latex_", "text/latex"),
    ):
        fn = getattr(value, method, None)
        if not callable(fn):
            continue
        try:
            out = fn()
        except Exception:  # a broken repr is not the cell's error
            continue
        if out is None:
            continue
        if isinstance(out, tuple):
            out = out[0]
        if isinstance(out, bytes):
            out = base64.b64encode(out).decode()
        data[mime] = out
    return data


def _figures(emit) -> None:
    """Open matplotlib figures become PNG displays, then are closed."""
    pyplot = sys.modules.get("matplotlib.pyplot")
    if pyplot is None:
        return
    for number in pyplot.get_fignums():
        figure = pyplot.figure(number)
        buffer = io.BytesIO()
        figure.savefig(buffer, format="png", bbox_inches="tight")
        emit(
            {
                "type": "display",
                "data": {
                    "image/png": base64.b64encode(buffer.getvalue()).decode(),
                    "text/plain": repr(figure),
                },
            }
        )
    pyplot.close("all")


class Worker:
    """One context: globals of its own, in a process of its own."""

    def __init__(self, conn: socket.socket) -> None:
        self.conn = conn
        self.globals: dict = {"__name__": "__main__", "__builtins__": __builtins__}
        self.count = 0
        self.identity = None
        #: SIGINT interrupts the cell's own code only; between cells it is dropped.
        self.executing = False
        self.lock = threading.Lock()
        signal.signal(signal.SIGINT, self._on_sigint)

    def _on_sigint(self, signum, frame) -> None:
        if self.executing:
            raise KeyboardInterrupt

    def emit(self, event: dict) -> None:
        """Sends one whole line: SIGINT waits while it is written, and threads a cell
        started do not interleave with it."""
        line = json.dumps(event).encode() + b"\n"
        with self.lock:
            held = signal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGINT})
            try:
                self.conn.sendall(line)
            finally:
                signal.pthread_sigmask(signal.SIG_SETMASK, held)

    def reseed(self) -> None:
        """A new sandbox (a restore or a fork of this state) gets new random streams: the
        kernel's pool was reseeded by the agent, Python's and NumPy's generators were not."""
        identity = socket.gethostname()
        if identity == self.identity:
            return
        self.identity = identity
        random.seed(os.urandom(32))
        numpy = sys.modules.get("numpy")
        if numpy is not None:
            numpy.random.seed(int.from_bytes(os.urandom(4), "little"))

    def display(self, *values) -> None:
        for value in values:
            self.emit({"type": "display", "data": _mime_bundle(value)})

    def run(self, request: dict) -> None:
        self.reseed()
        env = {str(k): str(v) for k, v in (request.get("env") or {}).items()}
        saved = {key: os.environ.get(key) for key in env}
        os.environ.update(env)
        self.count += 1
        self.globals.setdefault("display", self.display)
        code = str(request.get("code", ""))
        stdout, stderr = sys.stdout, sys.stderr
        sys.stdout = _Stream(self.emit, "stdout")
        sys.stderr = _Stream(self.emit, "stderr")
        try:
            tree = ast.parse(code, "<cell>", "exec")
            last = None
            if tree.body and isinstance(tree.body[-1], ast.Expr):
                last = ast.Expression(tree.body.pop().value)
            self.executing = True
            try:
                exec(compile(tree, "<cell>", "exec"), self.globals)
                value = eval(compile(last, "<cell>", "eval"), self.globals) if last else None
                _figures(self.emit)
            finally:
                self.executing = False
            if value is not None:
                self.globals["_"] = value
                self.emit({"type": "result", "data": _mime_bundle(value)})
        except BaseException as error:  # the cell's errors, KeyboardInterrupt included
            self.executing = False
            try:
                _figures(self.emit)
            except Exception:
                pass
            lines = traceback.format_exception(type(error), error, error.__traceback__)
            # Drop this file's frames: the traceback starts in the cell.
            shown = [lines[0]] + [line for line in lines[1:] if __file__ not in line]
            self.emit(
                {
                    "type": "error",
                    "name": type(error).__name__,
                    "value": str(error),
                    "traceback": "".join(shown),
                }
            )
        finally:
            sys.stdout, sys.stderr = stdout, stderr
            for key, value in saved.items():
                if value is None:
                    os.environ.pop(key, None)
                else:
                    os.environ[key] = value
        self.emit({"type": "done", "execution_count": self.count})

    def serve(self) -> None:
        reader = self.conn.makefile("rb")
        for line in reader:
            request = json.loads(line)
            if request.get("op") == "exit":
                return
            try:
                self.run(request)
            except KeyboardInterrupt:
                # An interrupt that landed just outside the cell: the run still ends.
                self.executing = False
                self.emit({"type": "done", "execution_count": self.count})


def start_worker(warm: bool) -> tuple[int, socket.socket]:
    """Forks a context's worker; returns its pid and the server's end of its socket."""
    ours, theirs = socket.socketpair()
    pid = os.fork()
    if pid == 0:
        # Only the pair's end stays open: a copy of a host connection held here would keep
        # it open after the server closed it.
        keep = theirs.fileno()
        for name in os.listdir("/proc/self/fd"):
            if int(name) > 2 and int(name) != keep:
                try:
                    os.close(int(name))
                except OSError:
                    pass
        signal.signal(signal.SIGINT, signal.SIG_IGN)  # until the worker's own handler
        if warm:
            for module in WARM_IMPORTS:
                try:
                    __import__(module)
                except Exception:
                    pass
            if "matplotlib" in sys.modules:
                sys.modules["matplotlib"].use("Agg")
        try:
            send(theirs, {"type": "ready"})
            Worker(theirs).serve()
        finally:
            os._exit(0)
    theirs.close()
    return pid, ours


# ---------------------------------------------------------------------------- the server


#: How long a run may take to stop after SIGINT before its worker is killed and replaced.
INTERRUPT_GRACE = 5.0


class Context:
    def __init__(self, warm: bool) -> None:
        self.warm = warm
        self.lock = threading.Lock()
        #: The run in progress (0: none); interrupts name the run they are for.
        self.run_id = 0
        self.runs = 0
        self.timed_out = False
        self._start()

    def _start(self) -> None:
        self.pid, self.sock = start_worker(self.warm)
        self.reader = self.sock.makefile("rb")
        if json.loads(self.reader.readline() or b"{}").get("type") != "ready":
            raise RuntimeError("the context's worker did not start")

    def restart(self) -> None:
        """A new worker in place of one that died, hung or sent garbage (its state is lost)."""
        self.close()
        self._start()

    def interrupt(self, run_id: int = 0) -> bool:
        """Stops the cell the worker runs (`run_id`'s, when given): SIGINT, repeated while the
        run goes on (one that lands before the cell's code starts is dropped by the worker),
        then SIGKILL if it has not stopped within the grace period (the run then reports a
        restarted context)."""
        current = self.run_id
        if not current or (run_id and run_id != current):
            return False
        pid = self.pid

        def stop() -> None:
            deadline = time.monotonic() + INTERRUPT_GRACE
            while self.run_id == current and self.pid == pid:
                if time.monotonic() >= deadline:
                    try:
                        os.kill(pid, signal.SIGKILL)
                    except OSError:
                        pass
                    return
                try:
                    os.kill(pid, signal.SIGINT)
                except OSError:
                    return
                time.sleep(0.2)

        threading.Thread(target=stop, daemon=True).start()
        return True

    def close(self) -> None:
        try:
            os.kill(self.pid, signal.SIGKILL)
            os.waitpid(self.pid, 0)
        except OSError:
            pass
        self.sock.close()


class Server:
    def __init__(self) -> None:
        self.contexts: dict[str, Context] = {"default": Context(warm=True)}
        self.lock = threading.Lock()

    def context(self, name: str) -> Context:
        with self.lock:
            found = self.contexts.get(name)
        if found is None:
            raise LookupError(f"no context {name!r}")
        return found

    def run(self, client: socket.socket, request: dict) -> None:
        context = self.context(str(request.get("context") or "default"))
        if not context.lock.acquire(timeout=0.1):
            raise RuntimeError(
                "this context is running another cell; interrupt it or use another context"
            )
        timer = None
        try:
            context.runs += 1
            run_id = context.run_id = context.runs
            context.timed_out = False
            timeout_ms = request.get("timeout_ms")
            if timeout_ms:

                def expire() -> None:
                    if context.run_id == run_id:
                        context.timed_out = True
                        context.interrupt(run_id)

                timer = threading.Timer(float(timeout_ms) / 1000, expire)
                timer.daemon = True
                timer.start()
            watcher = threading.Thread(
                target=self._watch, args=(client, context, run_id), daemon=True
            )
            watcher.start()
            count = self._relay(client, context, request)
            if count is None:
                # The worker died, was killed for not stopping, or sent garbage.
                context.restart()
                send_quietly(
                    client,
                    {
                        "type": "error",
                        "name": "ContextRestarted",
                        "value": "the run's process ended before the run did (killed after "
                        "not stopping when interrupted, or it exited); its context was "
                        "restarted and its variables are gone",
                        "traceback": "",
                    },
                )
                count = 0
            send_quietly(
                client,
                {"type": "done", "execution_count": count, "timed_out": context.timed_out},
            )
        finally:
            context.run_id = 0
            if timer is not None:
                timer.cancel()
            context.lock.release()

    def _relay(self, client: socket.socket, context: Context, request: dict):
        """Passes the worker's events to the host until the run's end; its execution count,
        or None when the worker is gone or broken."""
        try:
            context.sock.sendall(json.dumps(request).encode() + b"\n")
            for line in context.reader:
                event = json.loads(line)
                if event.get("type") == "done":
                    return int(event.get("execution_count", 0))
                try:
                    client.sendall(line)
                except OSError:
                    pass  # the host went away; the watcher interrupted the cell
        except (OSError, ValueError):
            pass
        return None

    def _watch(self, client: socket.socket, context: Context, run_id: int) -> None:
        """Interrupts the cell when the host closes the connection before it ends."""
        try:
            while context.run_id == run_id:
                if client.recv(4096) == b"":
                    break
        except OSError:
            pass
        context.interrupt(run_id)

    def handle(self, client: socket.socket) -> None:
        with client:
            self._handle(client)
            try:
                client.shutdown(socket.SHUT_RDWR)  # wakes this connection's watcher
            except OSError:
                pass

    def _handle(self, client: socket.socket) -> None:
        try:
            reader = client.makefile("rb")
            line = reader.readline(MAX_REQUEST)
            request = json.loads(line)
            op = request.get("op")
            if op == "run":
                self.run(client, request)
            elif op == "create_context":
                name = uuid.uuid4().hex[:12]
                context = Context(warm=False)
                with self.lock:
                    self.contexts[name] = context
                send(client, {"type": "context", "id": name})
            elif op == "list_contexts":
                with self.lock:
                    send(client, {"type": "contexts", "ids": sorted(self.contexts)})
            elif op == "delete_context":
                name = str(request.get("context"))
                if name == "default":
                    raise ValueError("the default context cannot be deleted")
                with self.lock:
                    context = self.contexts.pop(name, None)
                if context is None:
                    raise LookupError(f"no context {name!r}")
                context.close()
                send(client, {"type": "deleted"})
            elif op == "interrupt":
                running = self.context(str(request.get("context") or "default")).interrupt()
                send(client, {"type": "interrupted", "running": running})
            else:
                raise ValueError(f"unknown op {op!r}")
        except Exception as error:  # reported to the host, the server goes on
            try:
                send(client, {"type": "failure", "message": f"{type(error).__name__}: {error}"})
            except OSError:
                pass

    def serve(self, path: str) -> None:
        try:
            os.unlink(path)
        except FileNotFoundError:
            pass
        listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        listener.bind(path)
        os.chmod(path, 0o600)
        listener.listen(64)
        while True:
            client, _ = listener.accept()
            threading.Thread(target=self.handle, args=(client,), daemon=True).start()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--socket", default="/run/kiln-interpreter.sock")
    args = parser.parse_args()
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGCHLD, signal.SIG_DFL)
    Server().serve(args.socket)


if __name__ == "__main__":
    main()
