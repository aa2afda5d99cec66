"""The folders say which side of the NBD/HTTP line a module is on."""

import ast
import pathlib

import pytest

PACKAGE = pathlib.Path(__file__).parent.parent / "ovirt_imageio"


def imported(path):
    """The ovirt_imageio modules a file imports, as dotted names."""
    tree = ast.parse(path.read_text())
    package = ".".join(
        path.relative_to(PACKAGE.parent).with_suffix("").parts[:-1])
    names = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            names.update(a.name for a in node.names)
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")
                base = base[:len(base) - node.level + 1]
                module = ".".join(
                    base + ([node.module] if node.module else []))
            else:
                module = node.module
            names.add(module)
            names.update(f"{module}.{a.name}" for a in node.names)
    return {n for n in names if n.startswith("ovirt_imageio")}


def modules(folder):
    return sorted((PACKAGE / folder).glob("*.py"))


@pytest.mark.parametrize("path", modules("nbd"), ids=lambda p: p.name)
def test_nbd_knows_no_http(path):
    assert not any(n.startswith("ovirt_imageio.http") for n in imported(path))


def test_tickets_know_neither():
    names = imported(PACKAGE / "tickets.py")
    assert not any(n.startswith(("ovirt_imageio.http", "ovirt_imageio.nbd"))
                   for n in names)


def test_checker_sees_imports():
    # The walk itself must work, or the tests above pass vacuously.
    names = imported(PACKAGE / "http" / "services.py")
    assert "ovirt_imageio.nbd.backend" in names
    assert "ovirt_imageio.http.server" in names
