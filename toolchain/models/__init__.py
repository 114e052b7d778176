"""Teachers and students, looked up by name in a timm-style registry.

    @register_teacher("litemedsam")
    def build_litemedsam(cfg: dict) -> FrozenTeacher: ...

    @register_student("resnet18")
    def build_resnet18(cfg: dict, num_classes, in_chans, image_size) -> Student: ...

`build_teacher(cfg)` / `build_student(cfg, ...)` dispatch on `cfg.name`; an unknown
name is a UserError that lists the valid ones.
"""

from __future__ import annotations

from typing import Callable, TypeVar

from ..errors import ConfigError, UserError

_TEACHERS: dict[str, Callable] = {}
_STUDENTS: dict[str, Callable] = {}

F = TypeVar("F", bound=Callable)


def _register(table: dict[str, Callable], kind: str, name: str) -> Callable[[F], F]:
    def decorator(fn: F) -> F:
        if name in table and table[name] is not fn:
            raise ValueError(f"{kind} '{name}' is already registered")
        table[name] = fn
        return fn

    return decorator


def register_teacher(name: str) -> Callable[[F], F]:
    """Decorator: register `fn(cfg: dict) -> FrozenTeacher` under `name`."""
    return _register(_TEACHERS, "teacher", name)


def register_student(name: str) -> Callable[[F], F]:
    """Decorator: register `fn(cfg: dict, num_classes, in_chans, image_size) -> Student`."""
    return _register(_STUDENTS, "student", name)


def available_teachers() -> list[str]:
    return sorted(_TEACHERS)


def available_students() -> list[str]:
    return sorted(_STUDENTS)


def _lookup(table: dict[str, Callable], kind: str, name) -> Callable:
    if name not in table:
        raise UserError(f"unknown {kind} '{name}'; choose one of: {', '.join(sorted(table))} ({kind}=NAME)")
    return table[name]


def get_teacher_builder(name) -> Callable:
    if name not in _TEACHERS:
        from .vlm import available_vlms

        if name in available_vlms():  # the image recipes do not take a VLM's image tower
            raise ConfigError(f"teacher={name} is a vision-language model, used by recipe=ogkd only; this recipe "
                            f"needs an image teacher: {', '.join(sorted(_TEACHERS))} (teacher=NAME)")
    return _lookup(_TEACHERS, "teacher", name)


def get_student_builder(name) -> Callable:
    return _lookup(_STUDENTS, "student", name)


# Imported last: these modules register their builders with the functions above.
from .students import Student, build_student, count_parameters  # noqa: E402
from .teachers import FrozenTeacher, build_teacher  # noqa: E402

__all__ = [
    "FrozenTeacher",
    "Student",
    "available_students",
    "available_teachers",
    "build_student",
    "build_teacher",
    "count_parameters",
    "register_student",
    "register_teacher",
]
