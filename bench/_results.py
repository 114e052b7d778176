"""What the bench scripts' results files record about how they were made (shared helper)."""

from __future__ import annotations

import shlex


def command_history(previous: dict, script: str, argv: list[str]) -> str:
    """The commands behind a results file, in the order they ran, joined by ' && ': those in
    `previous` (the file a --resume adds to; {} for a fresh one) and then this one."""
    earlier = [c for c in previous.get("command", "").split(" && ") if c]
    return " && ".join(earlier + [shlex.join(["python", script, *argv])])
