"""`medkd-build --help` is generated from the config: every key is listed, every listed
default is accepted back, and descriptions come from the YAML comments."""

from __future__ import annotations

import re

import pytest
from omegaconf import OmegaConf

from medkd.toolchain.cli import usage
from medkd.toolchain.config import GROUPS, group_options, load_config
from medkd.toolchain.config_help import leaf_items, render_value, yaml_comments

HELP_KEY = re.compile(r"^ {2,4}(?P<key>[a-z_][\w.-]*)=(?P<value>'[^']*'|\S+)")


@pytest.fixture(scope="module")
def help_text() -> str:
    return usage()


def listed_keys(text: str) -> dict[str, str]:
    return {m["key"]: m["value"] for line in text.splitlines() if (m := HELP_KEY.match(line))}


def composed_leaf_keys(group: str, option: str) -> set[str]:
    overrides = [f"{group}={option}"]
    if group == "data" and option in ("folder", "npz", "seg-folder", "seg-npz"):
        overrides.append("data.path=x")  # required value; not part of what is checked
    if group == "teacher" and option == "timm":
        overrides += ["teacher.arch=x", "teacher.checkpoint=x"]
    cfg = OmegaConf.to_container(load_config(overrides))
    return {key for key, _ in leaf_items(cfg) if key.startswith(f"{group}.") and key != f"{group}.name"}


@pytest.mark.parametrize("group", GROUPS)
def test_every_key_of_every_group_option_is_listed(help_text, group):
    listed = listed_keys(help_text)
    for option in group_options(group):
        missing = composed_leaf_keys(group, option) - set(listed)
        assert not missing, f"{group}={option}: keys missing from --help: {sorted(missing)}"


def test_every_top_level_key_is_listed(help_text):
    cfg = OmegaConf.to_container(load_config([]))
    for group in GROUPS:
        cfg.pop(group)
    missing = {key for key, _ in leaf_items(cfg)} - set(listed_keys(help_text))
    assert not missing


def test_every_listed_default_is_accepted_back(help_text):
    """key=DEFAULT exactly as printed composes, with the group option that defines it."""
    section_option = {}
    current = None
    for line in help_text.splitlines():
        header = re.match(r"^  (\w+)=([\w-]+)(:|$)", line)
        if header and header[1] in GROUPS:
            current = (header[1], header[2])
            continue
        match = HELP_KEY.match(line)
        if match and line.startswith("    ") and current:
            section_option[match["key"], current] = match["value"]
        elif match and not line.startswith("    "):
            section_option[match["key"], None] = match["value"]
    assert len(section_option) > 60
    by_option: dict = {}
    for (key, option), value in section_option.items():
        if value != "???":  # a required value has no default to accept
            by_option.setdefault(option, []).append(f"{key}={value}")
    for option, typed in by_option.items():  # one compose per option: every key typed back at once
        overrides = [f"{option[0]}={option[1]}"] if option else []
        if option in (("data", "folder"), ("data", "npz"), ("data", "seg-folder"), ("data", "seg-npz")):
            overrides.append("data.path=x")
        if option == ("teacher", "timm"):
            overrides += ["teacher.arch=x", "teacher.checkpoint=x"]
        cfg, default = load_config(overrides + typed), load_config(overrides)
        for item in typed:
            key = item.split("=", 1)[0]
            assert OmegaConf.select(cfg, key) == OmegaConf.select(default, key), item


def test_descriptions_come_from_the_yaml_comments(help_text):
    assert re.search(r"export\.max_accuracy_drop=0\.5 +int8 is kept only if", help_text)
    assert re.search(r"recipe\.alpha=0\.7 +Loss = alpha", help_text)
    assert "target=jetson-orin: NVIDIA Jetson AGX Orin" in help_text


def test_yaml_comments_reads_blocks_inline_comments_and_nesting(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text(
        "# File header, not a key's doc.\n"
        "\n"
        "# Top doc\n"
        "# continues.\n"
        "top: 1\n"
        "plain: 2\n"
        "outer:\n"
        "  # Inner doc.\n"
        "  inner: 3  # and inline\n"
        "  other: x # inline only\n"
        "  # Mapping doc.\n"
        "  batch: {min: 1, max: 2}\n"
        "after: 4\n"
    )
    assert yaml_comments(path) == {
        "top": "Top doc continues.",
        "outer.inner": "Inner doc. and inline",
        "outer.other": "inline only",
        "outer.batch": "Mapping doc.",
    }


@pytest.mark.parametrize("value, text", [
    (None, "null"), (True, "true"), ([1, 0], "[1,0]"), ("9.0", "'9.0'"), ("minmax", "minmax"),
    ({"min": 1}, "{min:1}"), ("null", "'null'"), ("host CPU", "'host CPU'"),
])
def test_defaults_render_as_they_are_typed(value, text):
    assert render_value(value) == text
