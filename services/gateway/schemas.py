"""OpenAPI schemas generated from the proto descriptors (as json_format prints them), so
/docs shows the contracts' own shapes for the /v1 resources instead of a bare object."""

from __future__ import annotations

from typing import Any

from google.protobuf.descriptor import Descriptor, FieldDescriptor

F = FieldDescriptor
_WKT: dict[str, dict[str, Any]] = {
    "google.protobuf.Timestamp": {"type": "string", "format": "date-time"},
    "google.protobuf.Duration": {"type": "string", "example": "1.5s"},
    "google.protobuf.Struct": {"type": "object", "additionalProperties": True},
    "google.protobuf.Value": {},
    "google.protobuf.ListValue": {"type": "array", "items": {}},
}
_INT64 = {F.TYPE_INT64, F.TYPE_UINT64, F.TYPE_SINT64, F.TYPE_FIXED64, F.TYPE_SFIXED64}
_INT32 = {F.TYPE_INT32, F.TYPE_UINT32, F.TYPE_SINT32, F.TYPE_FIXED32, F.TYPE_SFIXED32}


def _name(desc: Descriptor) -> str:
    return desc.full_name.replace("mlx_unified.v1.", "").replace(".", "_")


def ref(desc: Descriptor, defs: dict[str, Any]) -> dict[str, Any]:
    """A $ref to ``desc``'s schema, adding it (and what it uses) to ``defs``."""
    if desc.full_name in _WKT:
        return dict(_WKT[desc.full_name])
    name = _name(desc)
    if name not in defs:
        defs[name] = {}  # placeholder: recursive messages refer to themselves
        props = {f.name: field_schema(f, defs) for f in desc.fields}
        defs[name] = {"type": "object", "title": desc.name, "properties": props}
    return {"$ref": f"#/components/schemas/{name}"}


def _scalar(f: FieldDescriptor, defs: dict[str, Any]) -> dict[str, Any]:
    if f.message_type is not None:
        return ref(f.message_type, defs)
    if f.enum_type is not None:
        return {"type": "string", "enum": [v.name for v in f.enum_type.values]}
    if f.type == F.TYPE_BOOL:
        return {"type": "boolean"}
    if f.type in (F.TYPE_DOUBLE, F.TYPE_FLOAT):
        return {"type": "number"}
    if f.type in _INT64:
        return {"type": "string", "format": "int64"}
    if f.type in _INT32:
        return {"type": "integer"}
    if f.type == F.TYPE_BYTES:
        return {"type": "string", "format": "byte"}
    return {"type": "string"}


def field_schema(f: FieldDescriptor, defs: dict[str, Any]) -> dict[str, Any]:
    mt = f.message_type
    if mt is not None and mt.GetOptions().map_entry:
        return {"type": "object", "additionalProperties": _scalar(mt.fields_by_name["value"], defs)}
    one = _scalar(f, defs)
    return {"type": "array", "items": one} if f.is_repeated else one
