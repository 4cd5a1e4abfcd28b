"""docs/design.md: its map of rooms names every module of the package."""

from __future__ import annotations

import re
from pathlib import Path
from typing import Final

import pytest

ROOT: Final = Path(__file__).resolve().parents[2]
DESIGN_MD: Final = ROOT / "docs" / "design.md"
PACKAGE: Final = ROOT / "server" / "eventwire"

#: Files of the package that are no room of their own.
NOT_ROOMS: Final = frozenset({"__init__", "__main__"})


def mapped_rooms(markdown: str) -> set[str]:
    """The rooms the map (the fenced block that starts ``eventwire/``) names, dotted.

    A line indented two spaces names a top-level room (``core/`` a package,
    ``gateway`` a module); one indented four names a module of the package
    above it. The rest of a line is what the room owns.
    """
    found = re.search(r"^```\neventwire/\n(.*?)^```$", markdown, re.MULTILINE | re.DOTALL)
    if found is None:
        raise AssertionError("design.md has no map of rooms (a block starting 'eventwire/')")
    rooms: set[str] = set()
    package = ""
    for line in found.group(1).splitlines():
        m = re.match(r"^( {2}| {4})([a-z_]+)(/?)(?:\s|$)", line)
        if m is None:
            raise AssertionError(f"design.md map: cannot read {line!r}")
        indent, name, slash = m.groups()
        if len(indent) == 2:
            package = name if slash else ""
            rooms.add(name)
        else:
            assert package, f"design.md map: {name!r} is under no package"
            rooms.add(f"{package}.{name}")
    return rooms


def package_rooms(package: Path) -> set[str]:
    """The rooms of the package on disk: its packages, modules and ``static/``, dotted."""
    rooms: set[str] = set()
    for path in package.iterdir():
        if path.is_dir() and (path / "__init__.py").exists():
            rooms.add(path.name)
            rooms.update(
                f"{path.name}.{m.stem}" for m in path.glob("*.py") if m.stem not in NOT_ROOMS
            )
        elif path.is_dir() and path.name == "static":
            rooms.add(path.name)
        elif path.suffix == ".py" and path.stem not in NOT_ROOMS:
            rooms.add(path.stem)
    return rooms


def test_the_map_names_every_room() -> None:
    """Every package and module under server/eventwire is in design.md's map."""
    missing = package_rooms(PACKAGE) - mapped_rooms(DESIGN_MD.read_text())
    assert not missing, f"design.md's map of rooms lacks {sorted(missing)}"


def test_a_room_missing_from_the_map_is_found(tmp_path: Path) -> None:
    """A module the map does not name is reported."""
    (tmp_path / "core").mkdir()
    (tmp_path / "core" / "__init__.py").write_text("")
    (tmp_path / "core" / "protocol.py").write_text("")
    (tmp_path / "core" / "utils.py").write_text("")
    (tmp_path / "gateway.py").write_text("")
    markdown = "```\neventwire/\n  core/    sync\n    protocol  wire\n  gateway  listener\n```\n"
    assert package_rooms(tmp_path) - mapped_rooms(markdown) == {"core.utils"}


def test_an_unreadable_map_fails() -> None:
    """A map line that is not a room is an error, not a silent skip."""
    with pytest.raises(AssertionError, match="cannot read"):
        mapped_rooms("```\neventwire/\n  Core!  what\n```\n")
