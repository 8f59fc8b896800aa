"""A problem found in a domain XML document: where it is, how bad it is, and what to change."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

from sevhook.errors import FormatError

Level = Literal["error", "warning"]
ERROR: Level = "error"
WARNING: Level = "warning"


@dataclass(frozen=True)
class Problem:
    """One finding. `error`: the XML cannot work as written; `warning`: it works but is unsafe or will not attest."""

    level: Level
    file: str
    line: int
    message: str

    def __str__(self) -> str:
        return f"{self.file}:{self.line}: {self.level}: {self.message}"

    def to_json(self) -> dict[str, object]:
        return {"level": self.level, "line": self.line, "message": self.message}


class DomainXmlError(FormatError):
    """A document that cannot be read as domain XML at all (not XML, too large, wrong root, DTD...),
    or that was required to be valid and is not. `problems` holds every finding, errors first."""

    def __init__(self, problems: list[Problem]) -> None:
        super().__init__("\n".join(str(p) for p in problems))
        self.problems = problems
