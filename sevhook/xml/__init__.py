"""Domain XML -> validated, immutable models (no I/O beyond reading the document).

Public API: load_domain, validate_file, DomainDocument, Problem, DomainXmlError; the models live in
sevhook.xml.models. The API is loaded on first use, so that importing the models (as the QEMU
stand-in and the command-line translation do) does not import lxml."""

from __future__ import annotations

import importlib
from typing import Any

_API = {
    "DomainDocument": "sevhook.xml.domain",
    "load_domain": "sevhook.xml.domain",
    "validate_file": "sevhook.xml.domain",
    "DomainXmlError": "sevhook.xml.problems",
    "Problem": "sevhook.xml.problems",
}

__all__ = sorted(_API)  # noqa: PLE0605  (the lazy table above is the one list of names)


def __getattr__(name: str) -> Any:
    if name not in _API:
        raise AttributeError(f"module 'sevhook.xml' has no attribute {name!r}")
    return getattr(importlib.import_module(_API[name]), name)
