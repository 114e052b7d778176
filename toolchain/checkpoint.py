"""Per-epoch training checkpoints: written atomically, loaded safely, checked on resume."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import torch

from .atomic import atomic_save
from .errors import UserError

CHECKPOINT_NAME = "checkpoint.pt"
FORMAT_VERSION = 1


def config_fingerprint(sections: dict) -> str:
    """A short digest of the config sections that must not change across a resume."""
    blob = json.dumps(sections, sort_keys=True, default=str).encode()
    return hashlib.sha256(blob).hexdigest()[:16]


def save_checkpoint(run_dir: Path, state: dict) -> Path:
    """Save `state` (tensors, numbers, strings, lists, dicts only) as run_dir/checkpoint.pt."""
    payload = {"format_version": FORMAT_VERSION, **state}

    def write(tmp: Path) -> None:
        # Through a Python file object, so a full disk surfaces as OSError(ENOSPC) in the
        # error's context instead of only torch's bare "unexpected pos" RuntimeError.
        with tmp.open("wb") as handle:
            torch.save(payload, handle)

    return atomic_save(run_dir / CHECKPOINT_NAME, write)


def load_checkpoint(path: Path, expected_fingerprint: str) -> dict:
    """Load a checkpoint with weights_only=True; any damage or mismatch is a UserError."""
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # torch raises many types for truncated/garbage files
        raise UserError(
            f"checkpoint {path} is corrupt or unreadable ({type(exc).__name__}); "
            "delete it or rerun with overwrite=true to start over"
        ) from None
    if not isinstance(state, dict) or state.get("format_version") != FORMAT_VERSION:
        raise UserError(f"checkpoint {path} is not a medkd v{FORMAT_VERSION} checkpoint")
    if state.get("config_fingerprint") != expected_fingerprint:
        raise UserError(
            f"checkpoint {path} was written with a different training config; "
            "resume with the same recipe/data/student/teacher/train settings, or use overwrite=true"
        )
    return state
