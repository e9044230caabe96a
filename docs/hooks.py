"""MkDocs hooks (mkdocs.yml: `hooks`): the repository's figures, and `::: cnf.NAME` by public name.

- The figures stay in the repository's figures/ (where the README shows them); the site gets them
  as files of its own, so a page writes `figures/toy_grid.png` as the README does.
- An API page names an object as users import it (`::: cnf.CNF`); the public names load lazily
  (cnf/__init__.py), which griffe, reading the source, cannot follow, so this hook replaces the
  name with the module that defines it. Modules can move without an edit to the docs.
- The docstrings' reStructuredText roles (:class:`~cnf.solvers.Solver`) show as code (`Solver`).
"""

from __future__ import annotations

import importlib
import re
from pathlib import Path

from mkdocs.structure.files import File, Files

ROOT = Path(__file__).resolve().parent.parent
PUBLIC = re.compile(r"^::: cnf\.(\w+)$", re.M)
ROLE = re.compile(r":(?:class|func|meth|mod|data|attr|obj|exc|math):<code>(~?)([^<]*)</code>")


def on_files(files: Files, config) -> Files:
    for path in sorted((ROOT / "figures").glob("*.*")):
        uri = f"figures/{path.name}"
        files.append(File(uri, str(ROOT), config["site_dir"], config["use_directory_urls"]))
    return files


def _defined_in(match: re.Match[str]) -> str:
    cnf, name = importlib.import_module("cnf"), match.group(1)
    module = getattr(getattr(cnf, name, None), "__module__", None) if name in cnf.__all__ else None
    return match.group(0) if module is None else f"::: {module}.{name}"  # else a module, as is


def on_page_markdown(markdown: str, page, config, files) -> str:
    return PUBLIC.sub(_defined_in, markdown)


def _role(match: re.Match[str]) -> str:
    short, target = match.groups()  # `~a.b.C` shows `C`, as Sphinx does
    return f"<code>{target.rsplit('.', 1)[-1] if short else target}</code>"


def on_page_content(html: str, page, config, files) -> str:
    return ROLE.sub(_role, html)
