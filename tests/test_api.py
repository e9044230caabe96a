"""The public API: every exported name imports and is documented."""

import importlib
import pkgutil

import cnf


def test_every_public_name_imports_and_has_a_docstring() -> None:
    for name in cnf.__all__:
        obj = getattr(cnf, name)
        if callable(obj):
            assert obj.__doc__, f"cnf.{name} has no docstring"


def test_every_module_imports() -> None:
    for info in pkgutil.walk_packages(cnf.__path__, "cnf."):
        if info.name != "cnf.__main__":  # running it is the CLI
            importlib.import_module(info.name)
