"""Device profiles (YAML) shipped with the kit: defaults an agent config builds on."""

from __future__ import annotations

from importlib import resources
from pathlib import Path


def profile_names() -> list[str]:
    return sorted(p.name[:-5] for p in resources.files(__name__).iterdir() if p.name.endswith(".yaml"))


def profile_path(name: str) -> Path:
    """Path of a bundled profile by name, or `name` itself if it is a YAML file."""
    candidate = Path(name)
    if candidate.suffix in (".yaml", ".yml") and candidate.is_file():
        return candidate
    path = resources.files(__name__) / f"{name}.yaml"
    if not path.is_file():
        raise FileNotFoundError(f"unknown device profile {name!r} (bundled: {', '.join(profile_names())})")
    return Path(str(path))
