"""pyproject.toml, the Comfy Registry's view of the pack: required fields, requirements, version."""
from __future__ import annotations

import re
import tomllib
from pathlib import Path

from pcpp_core.version import __version__

REPO = Path(__file__).resolve().parents[2]
SEMVER = re.compile(r"^\d+\.\d+\.\d+$")
NODE_ID = re.compile(r"^[A-Za-z](?:[A-Za-z0-9]|[-_.](?=[A-Za-z0-9]))*$")  # registry: no leading or doubled specials


def load() -> dict:
    return tomllib.loads((REPO / "pyproject.toml").read_text())


def requirements() -> list[str]:
    lines = (REPO / "requirements.txt").read_text().splitlines()
    return [line.split("#")[0].strip() for line in lines if line.split("#")[0].strip()]


def test_project_has_the_fields_the_registry_requires():
    project = load()["project"]
    assert NODE_ID.match(project["name"]) and len(project["name"]) < 100, project["name"]
    assert "comfyui" not in project["name"].lower(), "the registry asks for node ids without 'ComfyUI'"
    assert SEMVER.match(project["version"]), project["version"]
    assert project["description"].strip()
    assert project["license"] == {"file": "LICENSE"} and (REPO / "LICENSE").read_text().startswith("MIT License")
    repo = project["urls"]["Repository"]
    assert re.match(r"^https://github\.com/[\w.-]+/[\w.-]+$", repo), repo
    assert all(not re.search(r"<|>|example|your", url, re.I) for url in project["urls"].values())


def test_tool_comfy_names_publisher_icon_and_oldest_comfyui():
    comfy = load()["tool"]["comfy"]
    assert re.match(r"^[a-z0-9][a-z0-9-]*$", comfy["PublisherId"]), comfy["PublisherId"]
    assert comfy["DisplayName"].strip()
    icon = comfy["Icon"]
    assert icon.startswith("https://raw.githubusercontent.com/")
    # the icon the URL names is in the repository at that path (after the branch)
    assert (REPO / icon.split("/main/", 1)[1]).is_file(), icon
    assert comfy["requires-comfyui"] == ">=0.8.0"


def test_dependencies_equal_requirements_txt():
    assert load()["project"]["dependencies"] == requirements()


def test_version_equals_the_one_the_pack_logs():
    assert load()["project"]["version"] == __version__
    # the load log line formats that same name (nodes/__init__.py, read as text: importing it needs ComfyUI)
    init = (REPO / "nodes" / "__init__.py").read_text()
    assert "from pcpp_core.version import __version__" in init and "__version__)" in init
