"""Temporary: build_parser moved to cnf.cli.app (removed once the docs tests import it there)."""

from cnf.cli.app import build_parser

__all__ = ["build_parser"]
