"""The install paths agree on the torch pin: pyproject.toml, which the Makefile reads, and the
Docker image, which installs torch before the project so that pip takes no CUDA build."""

from __future__ import annotations

import re
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def test_the_docker_image_installs_the_pinned_torch():
    (pin,) = re.findall(r'"torch==([^"]+)"', (ROOT / "pyproject.toml").read_text(encoding="utf-8"))
    dockerfile = (ROOT / "docker" / "Dockerfile").read_text(encoding="utf-8")
    assert re.search(r"^ARG TORCH_VERSION=(\S+)$", dockerfile, re.M).group(1) == pin


SECTIONS = ("io", "data", "preprocess", "intensity", "views", "classify", "segment", "predict")


def _documented_keys() -> set[str]:
    """Every `section.key` (optionally `: value`) named in the READMEs."""
    docs = [ROOT / "README.md", ROOT / "data_manifests" / "README.md", ROOT / "docker" / "README.md"]
    pattern = rf"`((?:{'|'.join(SECTIONS)})\.[a-z_]+)(?::[^`]*)?`"
    return {key for doc in docs for key in re.findall(pattern, doc.read_text(encoding="utf-8"))}


def test_every_config_key_the_readmes_name_exists():
    from pipeline.config import Config

    keys = _documented_keys()
    assert len(keys) > 20  # the pattern finds them
    missing = []
    for key in sorted(keys):
        section, name = key.split(".")
        model = Config.model_fields["preprocess"].annotation if section in ("intensity", "views") else Config
        model = model.model_fields[section].annotation
        if name not in model.model_fields:
            missing.append(key)
    assert not missing
