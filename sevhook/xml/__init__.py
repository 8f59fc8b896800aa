"""Domain XML -> validated, immutable models (no I/O beyond reading the document).

Public API: load_domain, validate_file, DomainDocument, Problem, DomainXmlError; the models live in
sevhook.xml.models."""

from sevhook.xml.domain import DomainDocument, load_domain, validate_file
from sevhook.xml.problems import DomainXmlError, Problem

__all__ = ["DomainDocument", "DomainXmlError", "Problem", "load_domain", "validate_file"]
