"""The RELAX NG schemas of schemas/, each parsed once per process, and validation of one element
against its standalone schema. RELAX NG (libxml2) is the hot path; the XSD twins are loaded with
xmlschema only by the functions here that tests and tools call, and imported lazily."""

from __future__ import annotations

import copy
from functools import cache
from pathlib import Path
from typing import TYPE_CHECKING, Literal

from lxml import etree

from sevhook._paths import SCHEMA_DIR
from sevhook.xml.parsing import safe_parser

if TYPE_CHECKING:
    import xmlschema

SchemaName = Literal["launchsecurity", "sevhook-metadata"]


def schema_path(name: SchemaName, kind: Literal["rng", "xsd"]) -> Path:
    return SCHEMA_DIR / f"{name}.{kind}"


@cache
def relaxng(name: SchemaName) -> etree.RelaxNG:
    """The compiled RELAX NG schema, parsed once (module-level cache)."""
    return etree.RelaxNG(etree.parse(str(schema_path(name, "rng")), safe_parser()))


@cache
def xsd(name: SchemaName) -> xmlschema.XMLSchema11:
    """The XSD 1.1 twin, for tests and tools (xmlschema is imported only here)."""
    import xmlschema  # noqa: PLC0415  (a heavy import, for tests and tools only)

    return xmlschema.XMLSchema11(str(schema_path(name, "xsd")))


def standalone(element: etree._Element) -> etree._ElementTree:
    """A copy of `element` as the root of its own document (line numbers are kept), so it can be
    validated against a standalone schema whatever surrounds it in the domain. Comments and processing
    instructions are dropped (their neighbouring text joined): schemas ignore them, but xmlschema would
    count them as child elements."""
    tree = etree.ElementTree(copy.deepcopy(element))
    etree.strip_tags(tree, etree.Comment, etree.ProcessingInstruction)
    return tree


def rng_errors(name: SchemaName, element: etree._Element) -> list[tuple[int, str]]:
    """(line, libxml2 message) for every RELAX NG error; empty when the element is valid."""
    schema = relaxng(name)
    if schema.validate(standalone(element)):
        return []
    return [(entry.line or element.sourceline or 1, entry.message) for entry in schema.error_log]


def rng_valid(name: SchemaName, element: etree._Element) -> bool:
    return bool(relaxng(name).validate(standalone(element)))


def xsd_valid(name: SchemaName, element: etree._Element) -> bool:
    return bool(xsd(name).is_valid(standalone(element)))
