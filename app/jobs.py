"""The app's job store: one SQLite file (``<runs dir>/jobs.sqlite``) that outlives the web server.

A job is one train / fuse / sample / compare run: its kind, config (JSON), state, progress (JSON), loss
points, timestamps and run folder. The web server only writes requests here (new job, reorder,
cancel, resume, commands for a running training); the worker process (``app/worker.py``)
claims queued jobs one at a time per device and reports progress back. Closing the browser or
restarting the server therefore loses nothing: the page reads everything from this file.

States: ``queued`` -> ``running`` -> ``done`` | ``failed`` | ``stopped`` (by the user; resumable)
| ``interrupted`` (the app died or was shut down mid-job; resumable); ``queued`` -> ``cancelled``.
Every connection is short-lived (one per call, WAL mode), so threads and processes share it safely.
"""

from __future__ import annotations

import json
import os
import sqlite3
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

__all__ = ["Job", "JobStore", "KINDS", "RESUMABLE", "RESUMES", "STATES", "TRAIN_COMMANDS", "pid_alive"]

KINDS = ("train", "fuse", "sample", "compare")
RESUMES = ("train", "compare")  # kinds that continue where they stopped (compare: finished runs are kept)
STATES = ("queued", "running", "done", "failed", "stopped", "interrupted", "cancelled")
FINISHED = ("done", "failed", "stopped", "interrupted")  # how a running job ends (JobStore.finish)
RESUMABLE = ("stopped", "interrupted", "failed")  # a training / compare job in these states can resume
TRAIN_COMMANDS = ("stop", "checkpoint", "validate")  # see mixofshow.train.loop.train(commands=)

_SCHEMA = """
CREATE TABLE IF NOT EXISTS jobs (
    id INTEGER PRIMARY KEY AUTOINCREMENT,
    kind TEXT NOT NULL,
    name TEXT NOT NULL,
    config TEXT NOT NULL,
    state TEXT NOT NULL,
    progress TEXT NOT NULL DEFAULT '{}',
    position REAL NOT NULL,
    device TEXT NOT NULL,
    run_dir TEXT NOT NULL,
    resume INTEGER NOT NULL DEFAULT 0,
    error TEXT,
    worker_pid INTEGER,
    created REAL NOT NULL,
    started REAL,
    finished REAL
);
CREATE TABLE IF NOT EXISTS commands (
    id INTEGER PRIMARY KEY AUTOINCREMENT,
    job_id INTEGER NOT NULL,
    command TEXT NOT NULL,
    created REAL NOT NULL,
    taken REAL
);
CREATE TABLE IF NOT EXISTS losses (
    job_id INTEGER NOT NULL,
    step INTEGER NOT NULL,
    loss REAL NOT NULL,
    PRIMARY KEY (job_id, step)
);
"""


@dataclass
class Job:
    id: int
    kind: str
    name: str
    config: dict[str, Any]
    state: str
    progress: dict[str, Any]
    position: float
    device: str
    run_dir: str
    resume: bool
    error: str | None
    worker_pid: int | None
    created: float
    started: float | None
    finished: float | None

    @property
    def label(self) -> str:
        return f"#{self.id} {self.kind} {self.name} ({self.state})"


def _job(row: sqlite3.Row) -> Job:
    d = dict(row)
    d["config"] = json.loads(d["config"])
    d["progress"] = json.loads(d["progress"] or "{}")
    d["resume"] = bool(d["resume"])
    return Job(**d)


def pid_alive(pid: int | None) -> bool:
    if not pid:
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    try:  # a zombie (exited, not yet reaped) is not alive
        return Path(f"/proc/{pid}/stat").read_text().split()[2] != "Z"
    except (OSError, IndexError):
        return True


class JobStore:
    """All reads and writes of ``jobs.sqlite``; safe to use from several threads and processes."""

    def __init__(self, path: str | os.PathLike) -> None:
        self.path = Path(path)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        db = sqlite3.connect(self.path, timeout=30, isolation_level=None)
        try:
            db.execute("PRAGMA journal_mode=WAL")
            db.executescript(_SCHEMA)
        finally:
            db.close()

    @contextmanager
    def _connect(self) -> Iterator[sqlite3.Connection]:
        db = sqlite3.connect(self.path, timeout=30, isolation_level=None)
        db.row_factory = sqlite3.Row
        try:
            db.execute("BEGIN IMMEDIATE")
            yield db
            db.execute("COMMIT")
        except BaseException:
            if db.in_transaction:
                db.execute("ROLLBACK")
            raise
        finally:
            db.close()

    # -- the server's side -----------------------------------------------------------------
    def submit(self, kind: str, name: str, config: dict[str, Any], run_dir: str, device: str) -> Job:
        if kind not in KINDS:
            raise ValueError(f"unknown job kind {kind!r}; expected one of {KINDS}")
        now = time.time()
        with self._connect() as db:
            top = db.execute("SELECT COALESCE(MAX(position), 0) FROM jobs").fetchone()[0]
            cur = db.execute(
                "INSERT INTO jobs (kind, name, config, state, position, device, run_dir, created) "
                "VALUES (?, ?, ?, 'queued', ?, ?, ?, ?)",
                (kind, name, json.dumps(config), top + 1, device, str(run_dir), now),
            )
            job_id = cur.lastrowid
        return self.get(job_id)

    def get(self, job_id: int) -> Job:
        with self._connect() as db:
            row = db.execute("SELECT * FROM jobs WHERE id = ?", (int(job_id),)).fetchone()
        if row is None:
            raise ValueError(f"no job #{job_id}")
        return _job(row)

    def jobs(self, kind: str | None = None) -> list[Job]:
        """All jobs, queued ones first in queue order, then the rest newest first."""
        where, args = ("WHERE kind = ?", (kind,)) if kind else ("", ())
        with self._connect() as db:
            rows = db.execute(
                f"SELECT * FROM jobs {where} ORDER BY state != 'running', state != 'queued', "
                "CASE WHEN state = 'queued' THEN position ELSE -id END",
                args,
            ).fetchall()
        return [_job(r) for r in rows]

    def move(self, job_id: int, delta: int) -> None:
        """Move a queued job ``delta`` places (negative: earlier) in the queue."""
        with self._connect() as db:
            queued = [r["id"] for r in db.execute(
                "SELECT id FROM jobs WHERE state = 'queued' ORDER BY position").fetchall()]
            if job_id not in queued:
                raise ValueError(f"job #{job_id} is not waiting in the queue")
            i = queued.index(job_id)
            queued.insert(max(0, min(len(queued) - 1, i + delta)), queued.pop(i))
            for pos, jid in enumerate(queued, start=1):
                db.execute("UPDATE jobs SET position = ? WHERE id = ?", (pos, jid))

    def cancel(self, job_id: int) -> str:
        """Cancel a queued job, or ask a running one to stop (training: after a checkpoint)."""
        job = self.get(job_id)
        if job.state == "queued":
            with self._connect() as db:
                db.execute("UPDATE jobs SET state = 'cancelled', finished = ? WHERE id = ? AND state = 'queued'",
                           (time.time(), job_id))
            return "cancelled"
        if job.state == "running":
            self.send(job_id, "stop")
            return "stopping"
        raise ValueError(f"job #{job_id} is {job.state}; only queued or running jobs can be cancelled")

    def resume(self, job_id: int) -> Job:
        """Queue a stopped / interrupted / failed training or compare job again, continuing where it stopped."""
        job = self.get(job_id)
        if job.kind not in RESUMES and job.state != "interrupted":
            raise ValueError(f"job #{job_id} is a {job.kind} job; only training and compare jobs resume "
                             "(submit it again instead)")
        if job.state not in RESUMABLE:
            raise ValueError(f"job #{job_id} is {job.state}; only {', '.join(RESUMABLE)} jobs can resume")
        with self._connect() as db:
            top = db.execute("SELECT COALESCE(MAX(position), 0) FROM jobs").fetchone()[0]
            db.execute(
                "UPDATE jobs SET state = 'queued', resume = 1, error = NULL, position = ?, finished = NULL "
                "WHERE id = ?", (top + 1, job_id))
            db.execute("UPDATE commands SET taken = ? WHERE job_id = ? AND taken IS NULL", (time.time(), job_id))
        return self.get(job_id)

    def delete(self, job_id: int) -> Job:
        """Forget a job that is not running (its row, requests and losses); returns it as it was.
        A queued job is deleted as it waits; a running one must be stopped first."""
        with self._connect() as db:
            row = db.execute("SELECT * FROM jobs WHERE id = ?", (int(job_id),)).fetchone()
            if row is None:
                raise ValueError(f"no job #{job_id}")
            if row["state"] == "running":
                raise ValueError(f"job #{job_id} is running; stop it first (Cancel / stop), then delete it")
            for table in ("commands", "losses"):
                db.execute(f"DELETE FROM {table} WHERE job_id = ?", (int(job_id),))
            db.execute("DELETE FROM jobs WHERE id = ?", (int(job_id),))
        return _job(row)

    def send(self, job_id: int, command: str) -> None:
        """A request for a running training job: ``stop``, ``checkpoint`` or ``validate``."""
        if command not in TRAIN_COMMANDS:
            raise ValueError(f"unknown command {command!r}; expected one of {TRAIN_COMMANDS}")
        job = self.get(job_id)
        if job.state != "running":
            raise ValueError(f"job #{job_id} is {job.state}, not running")
        if job.kind != "train" and command != "stop":
            raise ValueError(f"job #{job_id} is a {job.kind} job; {command!r} applies to training only")
        with self._connect() as db:
            db.execute("INSERT INTO commands (job_id, command, created) VALUES (?, ?, ?)",
                       (job_id, command, time.time()))

    def losses(self, job_id: int) -> list[tuple[int, float]]:
        with self._connect() as db:
            rows = db.execute("SELECT step, loss FROM losses WHERE job_id = ? ORDER BY step", (job_id,)).fetchall()
        return [(r["step"], r["loss"]) for r in rows]

    def recover(self, wait: float = 30.0) -> list[int]:
        """At server start: mark jobs whose worker is gone as interrupted; returns their ids.

        A worker of a previous server that is still finishing (it checkpoints when its parent dies)
        is given ``wait`` seconds to exit first.
        """
        deadline = time.time() + wait
        while time.time() < deadline:
            running = [j for j in self.jobs() if j.state == "running"]
            if not any(pid_alive(j.worker_pid) for j in running):
                break
            time.sleep(0.2)
        marked = []
        with self._connect() as db:
            for row in db.execute("SELECT id, worker_pid FROM jobs WHERE state = 'running'").fetchall():
                if not pid_alive(row["worker_pid"]):
                    db.execute("UPDATE jobs SET state = 'interrupted', finished = ?, error = ? WHERE id = ?",
                               (time.time(), "the app stopped while this job ran", row["id"]))
                    marked.append(row["id"])
        return marked

    # -- the worker's side -----------------------------------------------------------------
    def claim(self, device: str, pid: int) -> Job | None:
        """Atomically take the first queued job for ``device``, if the device is free."""
        with self._connect() as db:
            busy = db.execute("SELECT 1 FROM jobs WHERE state = 'running' AND device = ?", (device,)).fetchone()
            if busy:
                return None
            row = db.execute("SELECT id FROM jobs WHERE state = 'queued' AND device = ? ORDER BY position LIMIT 1",
                             (device,)).fetchone()
            if row is None:
                return None
            db.execute("UPDATE jobs SET state = 'running', started = ?, worker_pid = ?, progress = '{}' "
                       "WHERE id = ?", (time.time(), pid, row["id"]))
        return self.get(row["id"])

    def take_commands(self, job_id: int) -> list[str]:
        with self._connect() as db:
            rows = db.execute("SELECT id, command FROM commands WHERE job_id = ? AND taken IS NULL ORDER BY id",
                              (job_id,)).fetchall()
            for r in rows:
                db.execute("UPDATE commands SET taken = ? WHERE id = ?", (time.time(), r["id"]))
        return [r["command"] for r in rows]

    def report(self, job_id: int, progress: dict[str, Any], losses: list[tuple[int, float]] = ()) -> None:
        with self._connect() as db:
            db.execute("UPDATE jobs SET progress = ? WHERE id = ?", (json.dumps(progress), job_id))
            db.executemany("INSERT OR REPLACE INTO losses (job_id, step, loss) VALUES (?, ?, ?)",
                           [(job_id, s, l) for s, l in losses])

    def finish(self, job_id: int, state: str, error: str | None = None) -> None:
        """A running job ends: ``done``, ``failed``, ``stopped`` or ``interrupted`` (the one way out of
        ``running``; a job in any other state is refused, so a late worker cannot overwrite it)."""
        if state not in FINISHED:
            raise ValueError(f"a job finishes as one of {', '.join(FINISHED)}, not {state!r}")
        with self._connect() as db:
            changed = db.execute(
                "UPDATE jobs SET state = ?, error = ?, finished = ? WHERE id = ? AND state = 'running'",
                (state, error, time.time(), job_id)).rowcount
        if not changed:
            raise ValueError(f"job #{job_id} is {self.get(job_id).state}, not running; it cannot finish as {state}")
