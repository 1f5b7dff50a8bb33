"""The model registry's state: named models, numbered versions and aliases (SQLite).

It shares the orchestrator's database (database.py) and its rules: every change is one
``BEGIN IMMEDIATE`` transaction, tables are created by the schema's ``IF NOT EXISTS``
statements (an older database gains them on open). Version numbers run 1, 2, 3... per
name and are never reused (``models.next_version``), so ``name@3`` always means the same
checkpoint or nothing. A version that a live (PENDING/RUNNING) run uses cannot be
deleted: "uses" means its checkpoint path appears in that run's pipeline (resolution
writes the path into the stored spec, see model_refs.py).
"""

from __future__ import annotations

import json
import re
import sqlite3
import time
from typing import Any

from google.protobuf import json_format

from mlx_unified.v1 import common_pb2 as cpb
from mlx_unified.v1 import registry_pb2 as rpb
from orchestrator.database import Database
from orchestrator.records import RS, decode_page_token, encode_page_token, ts
from services.runtime.errors import FailedPrecondition, InvalidArgument, NotFound, shown

__all__ = ["NAME", "ModelRegistry", "builtin_names", "check_alias", "check_name"]

NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,127}$")


def builtin_names() -> frozenset[str]:
    """Model names the services build themselves: a registry name never shadows them."""
    from services.runtime.model_build import registered_models

    return frozenset(registered_models())


def check_name(name: str, field: str) -> None:
    if not name:
        raise InvalidArgument.one(field, "is required")
    if not NAME.match(name):
        raise InvalidArgument.one(
            field, f"{shown(name)}: 1-128 letters, digits, '.', '_' or '-' (no '@', ':' or '/')"
        )
    if name in builtin_names():
        raise InvalidArgument.one(field, f"{name!r} is a built-in model name; choose another")


def check_alias(alias: str, field: str) -> None:
    if not alias:
        raise InvalidArgument.one(field, "is required")
    if not NAME.match(alias) or alias.isdigit():
        raise InvalidArgument.one(
            field, f"{shown(alias)}: 1-128 letters, digits, '.', '_' or '-', not all digits"
        )


def _dump(msg: Any) -> str:
    return json_format.MessageToJson(msg, preserving_proto_field_name=True)


class ModelRegistry:
    """Queries over the models, model_versions and model_aliases tables (thread-safe)."""

    def __init__(self, db: Database) -> None:
        self._db = db

    # ---- writes ------------------------------------------------------------------------

    def add_version(
        self,
        db: sqlite3.Connection,
        name: str,
        ckpt: cpb.Checkpoint,
        *,
        base_model: str = "",
        lineage: rpb.ModelLineage | None = None,
        description: str = "",
    ) -> int:
        """Insert the next version of ``name`` inside the open transaction ``db``."""
        now = time.time()
        db.execute(
            "INSERT INTO models (name, next_version, create_time) VALUES (?, 1, ?) "
            "ON CONFLICT(name) DO NOTHING",
            (name, now),
        )
        (version,) = db.execute("SELECT next_version FROM models WHERE name=?", (name,)).fetchone()
        db.execute("UPDATE models SET next_version=? WHERE name=?", (version + 1, name))
        db.execute(
            "INSERT INTO model_versions VALUES (?,?,?,?,?,?,?,?)",
            (name, version, _dump(ckpt), ckpt.path, base_model,
             _dump(lineage) if lineage is not None else None, description, now),
        )  # fmt: skip
        return version

    def register(
        self,
        name: str,
        ckpt: cpb.Checkpoint,
        *,
        base_model: str = "",
        lineage: rpb.ModelLineage | None = None,
        description: str = "",
    ) -> rpb.ModelVersion:
        check_name(name, "name")
        with self._db.tx() as db:
            version = self.add_version(
                db, name, ckpt, base_model=base_model, lineage=lineage, description=description
            )
        return self.get_version(name, version)

    def set_alias(self, name: str, alias: str, version: int) -> rpb.ModelVersion:
        check_alias(alias, "alias")
        with self._db.tx() as db:
            if not db.execute(
                "SELECT 1 FROM model_versions WHERE name=? AND version=?", (name, version)
            ).fetchone():
                raise NotFound(f"model {name!r} has no version {version}")
            db.execute(
                "INSERT INTO model_aliases VALUES (?,?,?) "
                "ON CONFLICT(name, alias) DO UPDATE SET version=excluded.version",
                (name, alias, version),
            )
        return self.get_version(name, version)

    def delete_alias(self, name: str, alias: str) -> None:
        with self._db.tx() as db:
            cur = db.execute("DELETE FROM model_aliases WHERE name=? AND alias=?", (name, alias))
            if cur.rowcount == 0:
                raise NotFound(f"model {name!r} has no alias {alias!r}")

    def delete_version(self, name: str, version: int) -> None:
        with self._db.tx() as db:
            row = db.execute(
                "SELECT path FROM model_versions WHERE name=? AND version=?", (name, version)
            ).fetchone()
            if row is None:
                raise NotFound(f"model {name!r} has no version {version}")
            # Same transaction: no run can be created in between (writes are serialised).
            live = db.execute(
                "SELECT r.run_id FROM runs r JOIN pipelines p ON p.pipeline_id = r.pipeline_id "
                "WHERE r.state IN (?,?) AND (instr(p.spec, ?) > 0 OR instr(p.resolved, ?) > 0) "
                "ORDER BY r.create_time",
                (RS.RUN_STATE_PENDING, RS.RUN_STATE_RUNNING, json.dumps(row[0])[1:-1],
                 json.dumps(row[0])[1:-1]),
            ).fetchall()  # fmt: skip
            if live:
                runs = ", ".join(r[0] for r in live)
                raise FailedPrecondition(
                    f"{name}@{version} is used by live run(s) {runs}: cancel them or wait"
                )
            db.execute("DELETE FROM model_aliases WHERE name=? AND version=?", (name, version))
            db.execute("DELETE FROM model_versions WHERE name=? AND version=?", (name, version))

    # ---- reads -------------------------------------------------------------------------

    def exists(self, name: str) -> bool:
        return self._db.one("SELECT 1 AS x FROM models WHERE name=?", name) is not None

    def _aliases(self, name: str) -> dict[str, int]:
        rows = self._db.all(
            "SELECT alias, version FROM model_aliases WHERE name=? ORDER BY alias", name
        )
        return {r["alias"]: r["version"] for r in rows}

    def _version(self, row: dict[str, Any], aliases: dict[str, int]) -> rpb.ModelVersion:
        v = rpb.ModelVersion(
            name=row["name"],
            version=row["version"],
            base_model=row["base_model"],
            description=row["description"],
            create_time=ts(row["create_time"]),
            aliases=[a for a, n in aliases.items() if n == row["version"]],
        )
        json_format.Parse(row["checkpoint"], v.checkpoint)
        if row["lineage"]:
            json_format.Parse(row["lineage"], v.lineage)
        return v

    def get_version(self, name: str, version: int = 0, alias: str = "") -> rpb.ModelVersion:
        """By number, by alias, or (neither) the latest; NotFound when there is none."""
        if not self.exists(name):
            raise NotFound(f"model {name!r} is not registered")
        aliases = self._aliases(name)
        if alias:
            if alias not in aliases:
                known = ", ".join(sorted(aliases)) or "none"
                raise NotFound(f"model {name!r} has no alias {alias!r} (aliases: {known})")
            version = aliases[alias]
        if version:
            row = self._db.one(
                "SELECT * FROM model_versions WHERE name=? AND version=?", name, version
            )
        else:
            row = self._db.one(
                "SELECT * FROM model_versions WHERE name=? ORDER BY version DESC LIMIT 1", name
            )
        if row is None:
            what = f"version {version}" if version else "versions"
            raise NotFound(f"model {name!r} has no {what}")
        return self._version(row, aliases)

    def _model(self, row: dict[str, Any], with_versions: bool) -> rpb.RegisteredModel:
        name = row["name"]
        aliases = self._aliases(name)
        rows = self._db.all("SELECT * FROM model_versions WHERE name=? ORDER BY version", name)
        m = rpb.RegisteredModel(
            name=name,
            aliases=aliases,
            latest_version=rows[-1]["version"] if rows else 0,
            create_time=ts(row["create_time"]),
        )
        if with_versions:
            m.versions.extend(self._version(r, aliases) for r in rows)
        return m

    def get_model(self, name: str) -> rpb.RegisteredModel:
        row = self._db.one("SELECT * FROM models WHERE name=?", name)
        if row is None:
            raise NotFound(f"model {name!r} is not registered")
        return self._model(row, with_versions=True)

    def list_models(
        self, page_size: int = 0, page_token: str = ""
    ) -> tuple[list[rpb.RegisteredModel], str]:
        if page_size < 0:
            raise InvalidArgument.one("page_size", "must be >= 0")
        size = min(page_size or 50, 500)
        cond, params = "", []
        if page_token:
            tf, key = decode_page_token(page_token)
            cond = "WHERE create_time < ? OR (create_time = ? AND name < ?)"
            params = [tf, tf, key]
        rows = self._db.all(
            f"SELECT * FROM models {cond} ORDER BY create_time DESC, name DESC LIMIT ?",
            *params,
            size + 1,
        )
        nxt = ""
        if len(rows) > size:
            rows = rows[:size]
            nxt = encode_page_token(rows[-1]["create_time"], rows[-1]["name"])
        return [self._model(r, with_versions=False) for r in rows], nxt
