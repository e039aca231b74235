"""The wire's value types: bounded integers and plain-text strings.

Each bound and pattern here is checked by pydantic and published, the same, in the OpenAPI
schema, so a request the schema calls valid is accepted and one it calls invalid is refused with
422 (``tests/test_coordinator_schema.py`` fuzzes exactly that).

[Note: plain text]
Text that reaches logs, the store or a dashboard (worker ids, hosts, devices, phases, extra
fields) holds no character of Unicode's control (Cc: C0, DEL, C1), format (Cf: every bidi
override, isolate and mark, zero-width characters, the BOM, tag characters), line- or
paragraph-separator (Zl, Zp) categories: nothing that breaks a log line or reorders what an
operator reads. Lone surrogates are refused by pydantic itself (not valid UTF-8). Worker ids also
hold no ``/``: an id is a path segment of ``/workers/{id}/heartbeat``.

Integers stay within 2**53 (every JSON reader holds them exactly; SQLite's INTEGER, int64, is
far above) and strict: ``"6000"`` or ``true`` is not a port (``6000.0`` is: JSON Schema calls it
an integer).
"""

from __future__ import annotations

import math
import re
from typing import Annotated, Any

from pydantic import (
    BeforeValidator,
    Field,
    PlainValidator,
    StrictFloat,
    StrictInt,
    StringConstraints,
    WithJsonSchema,
)
from pydantic_core import PydanticCustomError

MAX_JSON_INT = 2**53  # the largest integer every JSON reader holds exactly
MAX_STEP = MAX_JSON_INT
MAX_GENERATION = MAX_JSON_INT - 1  # generation numbers never go above (refused, never wrapped)
MAX_WORKERS = 100_000  # the most a barrier may ask for
MAX_CPU_CORES = 1 << 20
MAX_RAM_GB = 1e9
MAX_BANDWIDTH_MBPS = 1e9
MAX_NUMBER = 1e300  # metrics beyond +-this are refused (an int that large is no float at all)

# Cc, Cf, Zl and Zp as of Unicode 14 (Python 3.11's unicodedata), as ranges; \U escapes read
# the same in pydantic's Rust regex and in Python's re, which generates the fuzzer's strings.
_NOT_TEXT = ("\\x00-\\x1f\\x7f-\\x9f\\u00ad\\u0600-\\u0605\\u061c\\u06dd\\u070f\\u0890-\\u0891"
             "\\u08e2\\u180e\\u200b-\\u200f\\u2028-\\u202e\\u2060-\\u2064\\u2066-\\u206f"
             "\\ufeff\\ufff9-\\ufffb\\U000110bd\\U000110cd\\U00013430-\\U00013438"
             "\\U0001bca0-\\U0001bca3\\U0001d173-\\U0001d17a\\U000e0001\\U000e0020-\\U000e007f")


def text_pattern(max_length: int, *, min_length: int = 1, also_not: str = "") -> str:
    """``min_length``..``max_length`` plain-text characters (see the note), none of
    ``also_not``."""
    return f"^[^{_NOT_TEXT}{also_not}]{{{min_length},{max_length}}}$"


WORKER_ID_PATTERN = text_pattern(128, also_not="/")
TEXT_PATTERN = text_pattern(256, min_length=0)
NAME_PATTERN = text_pattern(64)  # names of fields
SITE_PATTERN = "^[A-Za-z0-9][A-Za-z0-9._-]{0,63}$"  # a site (island): a short plain name
DEFAULT_SITE = "default"

_OCTET = r"(?:25[0-5]|2[0-4][0-9]|1[0-9]{2}|[1-9]?[0-9])"
_IPV4 = rf"{_OCTET}(?:\.{_OCTET}){{3}}"
_H = "[0-9A-Fa-f]{1,4}"
_IPV6 = "|".join((  # RFC 4291 text forms, IPv4-suffixed ones included; no zone index
    rf"(?:{_H}:){{7}}{_H}",
    rf"(?:{_H}:){{1,7}}:",
    rf"(?:{_H}:){{1,6}}:{_H}",
    rf"(?:{_H}:){{1,5}}(?::{_H}){{1,2}}",
    rf"(?:{_H}:){{1,4}}(?::{_H}){{1,3}}",
    rf"(?:{_H}:){{1,3}}(?::{_H}){{1,4}}",
    rf"(?:{_H}:){{1,2}}(?::{_H}){{1,5}}",
    rf"{_H}:(?::{_H}){{1,6}}",
    rf":(?:(?::{_H}){{1,7}}|:)",
    rf"(?:{_H}:){{6}}{_IPV4}",
    rf"::(?:[fF]{{4}}(?::0{{1,4}})?:)?{_IPV4}",
    rf"(?:{_H}:){{1,5}}:{_IPV4}",
))
_LABEL = "[A-Za-z0-9](?:[A-Za-z0-9-]{0,61}[A-Za-z0-9])?"
_TOP_LABEL = "[A-Za-z](?:[A-Za-z0-9-]{0,61}[A-Za-z0-9])?"  # never all digits: "999.1.1.1" is no name
_DNS_NAME = rf"(?:{_LABEL}\.)*{_TOP_LABEL}\.?"
HOST_PATTERN = f"^(?:{_IPV4}|{_IPV6}|{_DNS_NAME})$"

WorkerId = Annotated[str, StringConstraints(pattern=WORKER_ID_PATTERN, max_length=128)]
Host = Annotated[str, StringConstraints(pattern=HOST_PATTERN, max_length=253),
                 Field(description="an IPv4 or IPv6 address, or a DNS name")]
ShortText = Annotated[str, StringConstraints(pattern=TEXT_PATTERN, max_length=256)]
Site = Annotated[str, StringConstraints(pattern=SITE_PATTERN, max_length=64),
                 Field(description="the worker's site (island): letters, digits, '.', '_', '-'")]


def _integral(value: object) -> object:
    """A JSON integer written with a fraction (``6000.0``: an integer, to JSON Schema) becomes
    an int; anything else goes to the strict check as it came (``"6000"``, ``true``: refused)."""
    return int(value) if isinstance(value, float) and value.is_integer() else value


def json_int(ge: int, le: int) -> Any:
    """An integer in JSON's sense within [ge, le]: never a string or a boolean."""
    return Annotated[StrictInt, Field(ge=ge, le=le), BeforeValidator(_integral)]


Port = json_int(1, 65535)
Step = json_int(0, MAX_STEP)
CpuCores = json_int(0, MAX_CPU_CORES)
Generation = Annotated[int, Field(ge=0, le=MAX_GENERATION)]
GenerationNumber = json_int(0, MAX_GENERATION)  # strict, for request bodies


def finite_or_none(value: object) -> object:
    """NaN and infinities become None: JSON cannot carry them and a NaN loss must not 500."""
    return None if isinstance(value, float) and not math.isfinite(value) else value


Number = Annotated[StrictFloat, Field(ge=-MAX_NUMBER, le=MAX_NUMBER)]
# A reported measurement: a number (never a boolean or a numeric string); NaN or inf -> None.
Metric = Annotated[Number | None, BeforeValidator(finite_or_none)]
Rate = Annotated[Annotated[StrictFloat, Field(ge=0, le=MAX_NUMBER)] | None,
                 BeforeValidator(finite_or_none)]

_TEXT = re.compile(TEXT_PATTERN)
_NUMBER_SCHEMA = {"type": "number", "minimum": -MAX_NUMBER, "maximum": MAX_NUMBER}


def _number(value: object) -> int | float | None:
    """A JSON number as an int or float; NaN/inf -> None; an int beyond 2**53 -> a float (so
    SQLite never sees an integer it cannot hold)."""
    if isinstance(value, bool) or not isinstance(value, int | float):
        raise PydanticCustomError("number_type", "must be a number, got {kind}",
                                  {"kind": type(value).__name__})
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if abs(value) > MAX_NUMBER:
        raise PydanticCustomError("number_range", "must be within +-{limit}", {"limit": MAX_NUMBER})
    return float(value) if isinstance(value, int) and abs(value) > MAX_JSON_INT else value


def _scalar(value: object) -> str | int | float | bool | None:
    """A short plain-text string, a boolean, null or a number (as ``_number``)."""
    if value is None or isinstance(value, bool):
        return value
    if isinstance(value, str):
        if not _TEXT.fullmatch(value):
            raise PydanticCustomError("text", "must be at most 256 plain-text characters "
                                              "(no control or format characters)")
        return value
    try:
        return _number(value)
    except PydanticCustomError:
        raise PydanticCustomError("scalar_type", "must be a number, boolean, null or short "
                                                 "string, got {kind}",
                                  {"kind": type(value).__name__}) from None


# Extra fields: a measurement (telemetry) or any short scalar (registration, heartbeat).
ExtraNumber = Annotated[int | float | None, PlainValidator(_number), WithJsonSchema(_NUMBER_SCHEMA)]
ExtraScalar = Annotated[str | int | float | bool | None, PlainValidator(_scalar), WithJsonSchema(
    {"anyOf": [{"type": "string", "maxLength": 256, "pattern": TEXT_PATTERN}, _NUMBER_SCHEMA,
               {"type": "boolean"}, {"type": "null"}]})]

# What each pattern means, for error messages (the patterns themselves are unreadable).
PATTERN_MEANING = {
    WORKER_ID_PATTERN: "should be 1-128 plain-text characters without '/' (no control, format "
                       "or bidi characters)",
    HOST_PATTERN: "should be an IPv4 or IPv6 address or a DNS name",
    TEXT_PATTERN: "should be at most 256 plain-text characters (no control, format or bidi "
                  "characters)",
    NAME_PATTERN: "should be 1-64 plain-text characters",
    SITE_PATTERN: "should be 1-64 characters of letters, digits, '.', '_' or '-', starting "
                  "with a letter or digit",
}

MAX_FIELDS = 40  # properties in one request body, declared and extra together
