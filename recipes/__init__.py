"""One recipe per method; the CLI's `recipe=NAME` picks one from RECIPES."""

from __future__ import annotations

from medkd.toolchain.errors import ConfigError

from .base import UNLABELLED, Batch, Recipe, labelled_cross_entropy
from .kd import KDRecipe
from .lora import LoRARecipe
from .lorkd import LoRKDRecipe
from .rd import RDRecipe
from .scratch import ScratchRecipe

RECIPES: dict[str, type[Recipe]] = {
    cls.name: cls for cls in (KDRecipe, LoRARecipe, LoRKDRecipe, RDRecipe, ScratchRecipe)
}


def build_recipe(cfg, student, teacher_dim: int | None, tasks=None, teacher=None) -> Recipe:
    """cfg is the `recipe` config section; teacher_dim is None when no teacher is loaded;
    tasks is TaskData.tasks (None for single-task data), which multi-task recipes need;
    teacher is the frozen teacher module, which recipes that needs_teacher_module get."""
    if cfg.name not in RECIPES:
        raise ConfigError(f"unknown recipe '{cfg.name}'; choose one of: {', '.join(sorted(RECIPES))}")
    recipe_cls = RECIPES[cfg.name]
    if recipe_cls.needs_teacher and teacher_dim is None:
        raise ConfigError(f"recipe '{cfg.name}' needs a teacher")
    if recipe_cls.needs_teacher_module:
        if teacher is None:
            raise ConfigError(f"recipe '{cfg.name}' needs the teacher module")
        return recipe_cls(cfg, student, teacher)
    if recipe_cls.needs_task_ids:
        return recipe_cls(cfg, student, teacher_dim, tasks)
    return recipe_cls(cfg, student, teacher_dim)


__all__ = ["UNLABELLED", "Batch", "Recipe", "RECIPES", "build_recipe", "labelled_cross_entropy"]
