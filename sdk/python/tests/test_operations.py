"""Every API operation has a method in this SDK, sync and async, unless it is excluded (with
its reason) in sdk/excluded-operations.json; and every operation a method names exists."""

from __future__ import annotations

import inspect
import json
from pathlib import Path
from types import ModuleType
from typing import Any

from kiln import sandbox, sandbox_async

REPO = Path(__file__).resolve().parents[3]


def api_operations() -> set[str]:
    document = json.loads((REPO / "docs" / "openapi.json").read_text())
    return {
        operation["operationId"]
        for methods in document["paths"].values()
        for operation in methods.values()
    }


def excluded() -> dict[str, str]:
    reasons: dict[str, str] = json.loads((REPO / "sdk" / "excluded-operations.json").read_text())
    return reasons


def declared(module: ModuleType) -> dict[str, set[str]]:
    """operationId -> the SDK methods that declare it."""
    found: dict[str, set[str]] = {}

    def visit(name: str, obj: Any) -> None:
        target = getattr(obj, "__func__", obj)
        for operation in getattr(target, "__kiln_operations__", ()):
            found.setdefault(operation, set()).add(name)

    for name, obj in vars(module).items():
        if inspect.isclass(obj) and obj.__module__ == module.__name__:
            for attr, member in vars(obj).items():
                visit(f"{name}.{attr}", member)
        elif inspect.isfunction(obj):
            visit(name, obj)
    return found


def test_every_operation_has_a_method_in_both_clients() -> None:
    wanted = api_operations() - set(excluded())
    for module in (sandbox, sandbox_async):
        missing = wanted - set(declared(module))
        assert not missing, f"{module.__name__} has no method for {sorted(missing)}"


def test_methods_name_real_operations_and_exclusions_are_real_and_unused() -> None:
    known = api_operations()
    for module in (sandbox, sandbox_async):
        unknown = set(declared(module)) - known
        assert not unknown, f"{module.__name__} declares unknown operations {sorted(unknown)}"
    reasons = excluded()
    assert set(reasons) <= known, sorted(set(reasons) - known)
    assert all(len(reason) > 20 for reason in reasons.values())
    used = set(declared(sandbox)) & set(reasons)
    assert not used, f"excluded but implemented: {sorted(used)}"
