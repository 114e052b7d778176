"""A full disk or exhausted memory, as the one-line error a user can act on.

Libraries report these in their own ways: Python raises OSError(ENOSPC) or MemoryError,
safetensors a SafetensorError naming "os error 28", torch.save a RuntimeError whose
*context* is the OSError (when it writes through a Python file object), torch's CPU
allocator a RuntimeError "can't allocate memory", CUDA an OutOfMemoryError. So the whole
chain of causes and contexts is searched, by errno, type and message.
"""

from __future__ import annotations

import errno
import re
from typing import Iterator

from .errors import UserError

_DISK_FULL_ERRNOS = (errno.ENOSPC, errno.EDQUOT)
_DISK_FULL_TEXT = re.compile(r"No space left on device|Disk quota exceeded|os error (28|122)\b")
_OOM_TEXT = re.compile(r"can't allocate memory|out of memory|Cannot allocate memory|Unable to allocate", re.I)
_OOM_BYTES = re.compile(r"tried to allocate (\d+) bytes")


def _chain(exc: BaseException) -> Iterator[BaseException]:
    seen = set()
    while exc is not None and id(exc) not in seen:
        seen.add(id(exc))
        yield exc
        exc = exc.__cause__ or exc.__context__


def disk_full_error(exc: BaseException, where: str, retry: str) -> UserError | None:
    """A UserError if `exc` came from a full disk or quota.

    `where` names what was being written when the error does not; `retry` how to go on.
    """
    for link in _chain(exc):
        if isinstance(link, OSError) and link.errno in _DISK_FULL_ERRNOS:
            return UserError(f"disk full while writing {link.filename or where} ({link.strerror}); "
                             f"free some space, then {retry}")
        if _DISK_FULL_TEXT.search(str(link)):
            return UserError(f"disk full while writing {where}; free some space, then {retry}")
    return None


def out_of_memory_error(exc: BaseException, settings: str) -> UserError | None:
    """A UserError if `exc` is an allocation failure; `settings` names the keys that shrink memory."""
    for link in _chain(exc):
        oom = (isinstance(link, MemoryError) or type(link).__name__ == "OutOfMemoryError"
               or (isinstance(link, RuntimeError) and _OOM_TEXT.search(str(link))))
        if oom:
            size = _OOM_BYTES.search(str(link))
            tried = f" (an allocation of {int(size.group(1)) / 1e9:.1f} GB failed)" if size else ""
            return UserError(f"out of memory{tried}; use smaller settings: {settings}")
    return None


def resource_error(exc: BaseException, where: str, retry: str, settings: str) -> UserError | None:
    """The one-line error for a full disk or exhausted memory, or None for anything else."""
    return disk_full_error(exc, where, retry) or out_of_memory_error(exc, settings)
