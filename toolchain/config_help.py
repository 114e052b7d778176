"""`medkd-build --help`'s key listing, generated from the YAML files in `toolchain/conf`.

Every key with its default comes from the composed config, and its description from the
comment above it (or after it) in the YAML, so the help cannot drift from what the
config accepts: adding a key with a comment is all it takes to document it.
"""

from __future__ import annotations

import re
import textwrap
from pathlib import Path

from omegaconf import OmegaConf

_KEY_LINE = re.compile(r"^(?P<indent> *)(?P<key>[A-Za-z_][\w-]*):(?P<rest>.*)$")
WIDTH = 100
KEY_COLUMN = 34


def yaml_comments(path: Path) -> dict[str, str]:
    """Dotted key -> the comment block right above it plus any comment after its value."""
    docs: dict[str, str] = {}
    parents: list[tuple[int, str]] = []  # (indent, key) of the enclosing mappings
    pending: list[str] = []
    for line in path.read_text().splitlines():
        stripped = line.strip()
        if not stripped:
            pending = []  # a blank line ends a comment block (file headers are not key docs)
            continue
        if stripped.startswith("#"):
            pending.append(stripped.lstrip("#").strip())
            continue
        match = _KEY_LINE.match(line)
        if not match:
            pending = []
            continue
        indent = len(match["indent"])
        while parents and parents[-1][0] >= indent:
            parents.pop()
        dotted = ".".join([key for _, key in parents] + [match["key"]])
        _value, _, inline = match["rest"].partition(" #")
        text = " ".join(pending + ([inline.strip()] if inline.strip() else []))
        if text:
            docs[dotted] = text
        parents.append((indent, match["key"]))
        pending = []
    return docs


def leaf_items(node, prefix: str = "") -> list[tuple[str, object]]:
    """(dotted key, default) for every leaf of a plain dict/list config."""
    if isinstance(node, dict):
        items = []
        for key, value in node.items():
            items += leaf_items(value, f"{prefix}.{key}" if prefix else str(key))
        return items
    return [(prefix, node)]


def render_value(value) -> str:
    """A default as the user would type it on the command line."""
    if value is None:
        return "null"
    if isinstance(value, bool):
        return str(value).lower()
    if isinstance(value, list):
        return "[" + ",".join(render_value(v) for v in value) + "]"
    if isinstance(value, dict):
        return "{" + ",".join(f"{k}:{render_value(v)}" for k, v in value.items()) + "}"
    if isinstance(value, str) and (_looks_non_string(value) or re.search(r"[\s,=\[\]{}:'\"]", value)):
        return f"'{value}'"  # typed back as a string: compute_capability '9.0', descriptions with spaces
    return str(value)


def _looks_non_string(text: str) -> bool:
    if text in ("???", ""):
        return text == ""
    try:
        float(text)
    except ValueError:
        return text.lower() in ("null", "true", "false")
    return True


def key_lines(items: list[tuple[str, object]], docs: dict[str, str], indent: str = "  ") -> list[str]:
    lines, shown = [], set()
    for key, value in items:
        head = f"{indent}{key}={render_value(value)}"
        doc = docs.get(key, "")
        parent = key.rpartition(".")[0]
        if not doc and parent in docs and parent not in shown:
            doc = docs[parent]  # e.g. `batch: {min: 1, ...}`: the comment is on the mapping
            shown.add(parent)
        if not doc:
            lines.append(head)
            continue
        pad = max(KEY_COLUMN, len(head) + 2)
        wrapped = textwrap.wrap(doc, WIDTH - pad) or [""]
        lines.append(head.ljust(pad) + wrapped[0])
        lines += [" " * pad + more for more in wrapped[1:]]
    return lines


def main_keys(conf_dir: Path, groups: tuple[str, ...]) -> list[str]:
    """Every key of config.yaml itself (not the groups), with default and description."""
    raw = OmegaConf.to_container(OmegaConf.load(conf_dir / "config.yaml"))
    raw.pop("defaults", None)
    for group in groups:
        raw.pop(group, None)
    return key_lines(leaf_items(raw), yaml_comments(conf_dir / "config.yaml"))


def group_keys(conf_dir: Path, group: str, option: str) -> list[str]:
    """The keys one option of a group sets (as GROUP.KEY=default), with descriptions."""
    path = conf_dir / group / f"{option}.yaml"
    raw = OmegaConf.to_container(OmegaConf.load(path))
    raw.pop("defaults", None)  # which options of other groups this one picks: not keys
    if is_global_package(path):  # keys already written in full (recipe.mode, transfer.path)
        raw.get(group, {}).pop("name", None)
        docs, items = yaml_comments(path), leaf_items(raw)
    else:
        raw.pop("name", None)  # set by the group choice itself
        docs = {f"{group}.{k}": v for k, v in yaml_comments(path).items()}
        items = leaf_items(raw, group)
    return key_lines(items, docs, indent="    ") if items else ["    (no keys)"]


PACKAGE_GLOBAL = "# @package _global_"


def is_global_package(path: Path) -> bool:
    """A group option whose file sets keys outside its group (Hydra's package header)."""
    return path.read_text().startswith(PACKAGE_GLOBAL)


def file_description(path: Path) -> str:
    """The comment block that opens a YAML file (its one-paragraph description)."""
    lines = []
    for line in path.read_text().splitlines():
        if not line.startswith("#"):
            break
        if line.strip() != PACKAGE_GLOBAL:
            lines.append(line.lstrip("#").strip())
    return " ".join(lines)
