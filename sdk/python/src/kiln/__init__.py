"""kiln's Python SDK: sandboxes in microVMs for untrusted code.

>>> from kiln import Sandbox
>>> with Sandbox.create() as sandbox:
...     print(sandbox.commands.run("echo hello").stdout)
hello

Connection settings come from arguments, then ``KILN_URL`` and ``KILN_API_KEY``, then the
CLI's config file (``kiln keys create --save``).
"""

__version__ = "0.1.0"

from .exceptions import (  # noqa: E402
    AuthenticationError,
    CommandExitError,
    ConflictError,
    FileNotFound,
    ForbiddenError,
    InvalidRequestError,
    KilnError,
    NotFoundError,
    ProcessNotFound,
    SandboxError,
    SandboxNotFound,
    SnapshotNotFound,
    TemplateNotFound,
    Timeout,
    TooLargeError,
    UnavailableError,
    QuotaExceeded,
    InsufficientStorage,
)
from .models import (  # noqa: E402
    BuildEvent,
    CommandResult,
    EntryInfo,
    Execution,
    ExecutionError,
    ForkResult,
    Forward,
    Health,
    NetworkPolicy,
    OutputChunk,
    ProcessInfo,
    Result,
    SandboxEvent,
    SandboxInfo,
    SandboxMetrics,
    SandboxPage,
    SnapshotInfo,
    TemplateInfo,
    WriteInfo,
)
from .sandbox import CommandHandle, Sandbox, Snapshot, Template, health  # noqa: E402
from .sandbox_async import (  # noqa: E402
    AsyncCommandHandle,
    AsyncSandbox,
    AsyncSnapshot,
    AsyncTemplate,
    async_health,
)

__all__ = [
    "AsyncCommandHandle",
    "AsyncSandbox",
    "AsyncSnapshot",
    "AsyncTemplate",
    "AuthenticationError",
    "BuildEvent",
    "CommandExitError",
    "CommandHandle",
    "CommandResult",
    "ConflictError",
    "EntryInfo",
    "Execution",
    "ExecutionError",
    "FileNotFound",
    "ForbiddenError",
    "ForkResult",
    "Health",
    "InvalidRequestError",
    "KilnError",
    "NetworkPolicy",
    "NotFoundError",
    "OutputChunk",
    "ProcessInfo",
    "ProcessNotFound",
    "Result",
    "Sandbox",
    "SandboxError",
    "SandboxEvent",
    "SandboxInfo",
    "SandboxMetrics",
    "SandboxNotFound",
    "SandboxPage",
    "Snapshot",
    "Forward",
    "SnapshotInfo",
    "SnapshotNotFound",
    "Template",
    "TemplateInfo",
    "TemplateNotFound",
    "Timeout",
    "TooLargeError",
    "UnavailableError",
    "QuotaExceeded",
    "InsufficientStorage",
    "WriteInfo",
    "async_health",
    "health",
]
