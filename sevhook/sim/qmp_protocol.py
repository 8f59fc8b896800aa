"""QEMU's QMP wire protocol, as QEMU 7.2 speaks it: the stream splitter (JSON values delimited by their
own braces, not by newlines), the input checks with QEMU's exact messages and error classes, argument
checking per command, and replies/events serialised the way QEMU writes them (", " and ": ",
CRLF, "id" before "error" but after "return")."""

from __future__ import annotations

import json
import time
from collections.abc import Iterator
from dataclasses import dataclass

GENERIC_ERROR = "GenericError"
COMMAND_NOT_FOUND = "CommandNotFound"
MAX_MESSAGE = 64 * 1024 * 1024  # QEMU's json-streamer refuses larger inputs as well


class QmpError(Exception):
    """A QMP error reply: error class and description."""

    def __init__(self, error_class: str, desc: str) -> None:
        super().__init__(desc)
        self.error_class = error_class
        self.desc = desc


def encode(message: dict, pretty: bool = False) -> bytes:
    if pretty:
        return (json.dumps(message, indent=4) + "\r\n").encode()
    return (json.dumps(message, separators=(", ", ": ")) + "\r\n").encode()


def reply(result: object, msg_id: object = None) -> dict:
    response: dict = {"return": result}
    if msg_id is not None:
        response["id"] = msg_id
    return response


def error_reply(error: QmpError, msg_id: object = None) -> dict:
    response: dict = {}
    if msg_id is not None:
        response["id"] = msg_id
    response["error"] = {"class": error.error_class, "desc": error.desc}
    return response


def event(name: str, data: dict | None = None) -> dict:
    now = time.time()
    message: dict = {"timestamp": {"seconds": int(now), "microseconds": int((now % 1) * 1_000_000)}, "event": name}
    if data is not None:
        message["data"] = data
    return message


@dataclass
class Parsed:
    """One complete input: its value, or the parse error QEMU would report for it."""

    value: object = None
    error: QmpError | None = None
    raw: bytes = b""


class StreamSplitter:
    """Splits a byte stream into JSON values the way QEMU's streamer does: an object or array ends when
    its brackets balance (strings respected); a bare token at top level ends at whitespace or a bracket."""

    def __init__(self) -> None:
        self._buffer = bytearray()

    def feed(self, data: bytes) -> Iterator[Parsed]:
        if not self._buffer:
            whole = self._whole_object(data)
            if whole is not None:
                yield whole
                return
        self._buffer += data
        while True:
            item = self._next()
            if item is None:
                return
            yield item

    @staticmethod
    def _whole_object(data: bytes) -> Parsed | None:
        """The usual case, one complete object per read (`{...}` and a line end), parsed at C speed: when
        ASCII data parses as exactly one JSON object, the bracket scan would end at its last byte too."""
        text = data.strip(b" \t\r\n")
        if not (text.startswith(b"{") and text.endswith(b"}") and text.isascii()):
            return None
        try:
            value = json.loads(text)
        except (json.JSONDecodeError, UnicodeDecodeError, RecursionError):
            return None
        return Parsed(value=value, raw=text) if isinstance(value, dict) else None

    def _next(self) -> Parsed | None:
        buf = self._buffer
        start = 0
        while start < len(buf) and buf[start] in b" \t\r\n":
            start += 1
        if start == len(buf):
            buf.clear()
            return None
        if buf[start] in b"{[":
            end = self._balanced_end(start)
            if end is None:
                if len(buf) > MAX_MESSAGE:
                    buf.clear()
                    return Parsed(error=QmpError(GENERIC_ERROR, "JSON parse error, JSON token size limit exceeded"))
                return None
        elif buf[start] in b"}]":
            end = start + 1  # a stray closing bracket is an error of its own
        else:
            end = start
            while end < len(buf) and buf[end] not in b" \t\r\n{}[]":
                end += 1
            if end == len(buf):
                return None  # the token may continue
        text = bytes(buf[start:end])
        del buf[:end]
        try:
            return Parsed(value=json.loads(text), raw=text)
        except (json.JSONDecodeError, UnicodeDecodeError, RecursionError):
            token = text.decode(errors="replace")
            if token[:1] not in "{[" and token[:1].isalpha():
                return Parsed(error=QmpError(GENERIC_ERROR, f"JSON parse error, invalid keyword '{token}'"), raw=text)
            return Parsed(error=QmpError(GENERIC_ERROR, "JSON parse error, invalid input"), raw=text)

    def _balanced_end(self, start: int) -> int | None:
        depth = 0
        in_string = False
        escaped = False
        buf = self._buffer
        for index in range(start, len(buf)):
            char = buf[index]
            if in_string:
                if escaped:
                    escaped = False
                elif char == 0x5C:  # backslash
                    escaped = True
                elif char == 0x22:
                    in_string = False
            elif char == 0x22:
                in_string = True
            elif char in b"{[":
                depth += 1
            elif char in b"}]":
                depth -= 1
                if depth == 0:
                    return index + 1
        return None


@dataclass(frozen=True)
class Request:
    command: str
    arguments: dict
    msg_id: object


def check_request(value: object) -> Request:
    """QEMU's checks on one input, in its order, with its messages."""
    if not isinstance(value, dict):
        raise QmpError(GENERIC_ERROR, "QMP input must be a JSON object")
    msg_id = value.get("id")
    for key in value:
        if key not in ("execute", "arguments", "id"):
            raise _with_id(QmpError(GENERIC_ERROR, f"QMP input member '{key}' is unexpected"), msg_id)
    if "execute" not in value:
        raise _with_id(QmpError(GENERIC_ERROR, "QMP input lacks member 'execute'"), msg_id)
    if not isinstance(value["execute"], str):
        raise _with_id(QmpError(GENERIC_ERROR, "QMP input member 'execute' must be a string"), msg_id)
    arguments = value.get("arguments", {})
    if not isinstance(arguments, dict):
        raise _with_id(QmpError(GENERIC_ERROR, "QMP input member 'arguments' must be an object"), msg_id)
    return Request(value["execute"], arguments, msg_id)


class RequestError(QmpError):
    """A QmpError that belongs to a request with this id."""

    def __init__(self, error: QmpError, msg_id: object) -> None:
        super().__init__(error.error_class, error.desc)
        self.msg_id = msg_id


def _with_id(error: QmpError, msg_id: object) -> QmpError:
    return RequestError(error, msg_id) if msg_id is not None else error


# argument schemas of the commands the stand-in answers itself: name -> {arg: (type, required)}
ArgSpec = dict[str, tuple[str, bool]]
SCHEMAS: dict[str, ArgSpec] = {
    "qmp_capabilities": {"enable": ("array", False)},
    "query-version": {},
    "query-status": {},
    "query-name": {},
    "query-uuid": {},
    "query-kvm": {},
    "query-cpus-fast": {},
    "query-commands": {},
    "query-target": {},
    "stop": {},
    "cont": {},
    "quit": {},
    "system_reset": {},
    "system_powerdown": {},
    "query-sev": {},
    "query-sev-launch-measure": {},
    "query-sev-capabilities": {},
    "sev-inject-launch-secret": {"packet-header": ("str", True), "secret": ("str", True), "gpa": ("uint64", False)},
    "query-sev-attestation-report": {"mnonce": ("str", True)},
}


def check_arguments(command: str, arguments: dict, schema: ArgSpec) -> None:
    """QEMU's visitor errors: missing, unexpected, wrong type."""
    for name, (kind, required) in schema.items():
        if name not in arguments:
            if required:
                raise QmpError(GENERIC_ERROR, f"Parameter '{name}' is missing")
            continue
        value = arguments[name]
        if kind == "str" and not isinstance(value, str):
            raise QmpError(GENERIC_ERROR, f"Invalid parameter type for '{name}', expected: string")
        if kind == "uint64" and (isinstance(value, bool) or not isinstance(value, int) or not 0 <= value < 1 << 64):
            if isinstance(value, int) and not isinstance(value, bool) and -(1 << 63) <= value < 0:
                continue  # QEMU's visitor accepts a negative int64 for a uint64 and wraps it
            raise QmpError(GENERIC_ERROR, f"Parameter '{name}' expects uint64")
        if kind == "array" and not isinstance(value, list):
            raise QmpError(GENERIC_ERROR, f"Invalid parameter type for '{name}', expected: array")
    for name in arguments:
        if name not in schema:
            raise QmpError(GENERIC_ERROR, f"Parameter '{name}' is unexpected")
