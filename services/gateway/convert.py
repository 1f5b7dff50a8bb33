"""JSON <-> proto with google.protobuf.json_format: request bodies and query strings parse
into the contracts' request messages, responses print with the proto field names
(snake_case, as the original API spoke), enums by name, int64 as strings."""

from __future__ import annotations

import re
from collections.abc import Mapping
from typing import Any, TypeVar

from google.protobuf import json_format
from google.protobuf.descriptor import FieldDescriptor
from google.protobuf.message import Message

from services.gateway.errors import BackendError

M = TypeVar("M", bound=Message)
_TRUE, _FALSE = {"1", "true", "yes", "on"}, {"0", "false", "no", "off"}


def to_json(msg: Message) -> dict[str, Any]:
    return json_format.MessageToDict(
        msg, preserving_proto_field_name=True, always_print_fields_with_no_presence=True
    )


def parse(data: Any, cls: type[M], field: str = "body") -> M:
    """``data`` (a JSON object) as a ``cls``; unknown fields and wrong types are 400s."""
    if not isinstance(data, dict):
        raise BackendError.invalid(field, f"must be a JSON object ({cls.DESCRIPTOR.name})")
    try:
        return json_format.ParseDict(data, cls())
    except json_format.ParseError as e:
        msg = str(e).split("\n")[0]
        # json_format names the innermost field it failed on ("Failed to parse x field").
        names = re.findall(r"Failed to parse (\w+) field", msg)
        where = ".".join([field, *names]) if field != "query" or not names else names[-1]
        raise BackendError.invalid(where, msg) from None


def _scalar(f: FieldDescriptor, raw: str, name: str) -> Any:
    if f.type == FieldDescriptor.TYPE_BOOL:
        low = raw.strip().lower()
        if low not in _TRUE | _FALSE:
            raise BackendError.invalid(name, "must be true or false")
        return low in _TRUE
    return raw  # ParseDict accepts numbers and enum names as strings


def from_query(params: Mapping[str, list[str]], cls: type[M], **path: str) -> M:
    """A request message from query parameters (repeated fields: repeat the parameter or
    separate with commas) and path parameters; a parameter naming no field is a 400."""
    desc = cls.DESCRIPTOR
    data: dict[str, Any] = dict(path)
    for name, values in params.items():
        f = desc.fields_by_name.get(name) or desc.fields_by_camelcase_name.get(name)
        if f is None or f.message_type is not None:
            raise BackendError.invalid(name, f"not a query parameter of {desc.name}")
        if f.is_repeated:
            items = [v for raw in values for v in raw.split(",") if v]
            data[f.name] = [_scalar(f, v, name) for v in items]
        else:
            data[f.name] = _scalar(f, values[-1], name)
    return parse(data, cls, "query")
