"""The UI's merge history: one row per merge started (recipe, the inputs' fingerprints, output,
times, status, the error line), in a SQLite file in the first models directory."""

from __future__ import annotations

import json
import sqlite3
import threading
import time
from pathlib import Path
from typing import Any

from weightmix.errors import WeightmixError

FILE_NAME = ".weightmix-history.sqlite"
SCHEMA = """
CREATE TABLE IF NOT EXISTS merges (
    id INTEGER PRIMARY KEY AUTOINCREMENT,
    queued REAL NOT NULL,
    started REAL,
    finished REAL,
    status TEXT NOT NULL,
    recipe TEXT NOT NULL,
    output TEXT NOT NULL,
    inputs TEXT NOT NULL DEFAULT '[]',
    message TEXT NOT NULL DEFAULT ''
)
"""
COLUMNS = ("id", "queued", "started", "finished", "status", "recipe", "output", "inputs",
           "message")  # fmt: skip


class History:
    """The merges table; safe to use from the server's threads (one connection, a lock)."""

    def __init__(self, folder: Path) -> None:
        self.path = folder / FILE_NAME
        self.lock = threading.Lock()
        try:
            self.connection = sqlite3.connect(self.path, check_same_thread=False, timeout=10)
            with self.lock, self.connection:
                self.connection.execute(SCHEMA)
                columns = {row[1] for row in self.connection.execute("PRAGMA table_info(merges)")}
        except sqlite3.Error as error:
            raise WeightmixError(
                f"merge history {self.path}: {error}: the first models directory must be"
                " writable and this file a weightmix history (move it away to start a new one)"
            ) from None
        if not set(COLUMNS) <= columns:
            self.connection.close()
            raise WeightmixError(
                f"merge history {self.path}: not a weightmix history (its 'merges' table has"
                " other columns): move it away to start a new one"
            )

    def add(self, recipe: str, output: str) -> int:
        with self.lock, self.connection:
            cursor = self.connection.execute(
                "INSERT INTO merges (queued, status, recipe, output) VALUES (?, 'queued', ?, ?)",
                (time.time(), recipe, output),
            )
        return int(cursor.lastrowid or 0)

    def update(self, merge_id: int, **fields: Any) -> None:
        names = [name for name in fields if name in COLUMNS and name != "id"]
        values = [json.dumps(fields[n]) if n == "inputs" else fields[n] for n in names]
        with self.lock, self.connection:
            self.connection.execute(
                f"UPDATE merges SET {', '.join(f'{n} = ?' for n in names)} WHERE id = ?",
                (*values, merge_id),
            )

    def interrupted(self) -> None:
        """Mark merges a previous server left queued or running (it stopped): interrupted."""
        try:
            with self.lock, self.connection:
                self.connection.execute(
                    "UPDATE merges SET status = 'interrupted', message = 'the UI stopped before"
                    " it finished' WHERE status IN ('queued', 'running')"
                )
        except sqlite3.Error as error:
            raise WeightmixError(
                f"merge history {self.path}: {error}: the first models directory must be writable"
            ) from None

    def get(self, merge_id: int) -> dict[str, Any] | None:
        rows = self._select("WHERE id = ?", (merge_id,))
        return rows[0] if rows else None

    def recent(self, limit: int = 100) -> list[dict[str, Any]]:
        return self._select("ORDER BY id DESC LIMIT ?", (limit,))

    def _select(self, clause: str, args: tuple) -> list[dict[str, Any]]:
        with self.lock:
            rows = self.connection.execute(
                f"SELECT {', '.join(COLUMNS)} FROM merges {clause}", args
            ).fetchall()
        found = [dict(zip(COLUMNS, row)) for row in rows]
        for row in found:
            row["inputs"] = json.loads(row["inputs"] or "[]")
        return found

    def close(self) -> None:
        with self.lock:
            self.connection.close()
