"""deploy/postgres-init run as the postgres image would run it, on a private PostgreSQL
cluster: the owner migrates, the application role reads and writes rows only."""

from __future__ import annotations

import os
import shutil
import subprocess
from pathlib import Path

import pytest

from vidq.settings import Settings

REPO = Path(__file__).resolve().parents[1]
INIT_SCRIPT = REPO / "deploy" / "postgres-init" / "10-vidq-app-role.sh"


def test_the_init_script_gives_the_application_rows_but_not_the_schema(tmp_path: Path) -> None:
    """Run deploy/postgres-init as the postgres image would, on a private cluster: the
    owner migrates, vidq_app submits and reads jobs, and cannot create or drop tables."""
    from sqlalchemy import create_engine, text
    from sqlalchemy.exc import ProgrammingError

    from producer.submit import JobRequest, submit
    from tests.faults.harness import PostgresServer
    from vidq.db import dispose_engines, make_engine
    from vidq.migrate import upgrade

    server = PostgresServer()
    if server.bindir is None or not shutil.which("psql"):
        pytest.skip("PostgreSQL server binaries or psql are not installed")
    server.init()
    try:
        admin = create_engine(server.url, isolation_level="AUTOCOMMIT")
        with admin.connect() as conn:
            conn.execute(text("CREATE ROLE vidq LOGIN SUPERUSER"))  # as the image makes it
            conn.execute(text("CREATE DATABASE vidq OWNER vidq"))
        admin.dispose()
        env = {**os.environ, "POSTGRES_USER": "vidq", "POSTGRES_DB": "vidq",
               "APP_DB_PASSWORD": "app-pw", "PGHOST": "127.0.0.1", "PGPORT": str(server.port)}
        done = subprocess.run(["sh", str(INIT_SCRIPT)], env=env, capture_output=True,
                              text=True, timeout=60)
        assert done.returncode == 0, done.stderr
        base = f"postgresql+psycopg://{{}}@127.0.0.1:{server.port}/vidq"
        owner = make_engine(base.format("vidq"))
        upgrade(owner)
        owner.dispose()
        app_url = base.format("vidq_app")
        video = tmp_path / "a.mp4"
        video.write_bytes(b"not decoded by submit")
        report = submit([str(video)], settings=Settings(database_url=app_url),
                        request=JobRequest(), batch="b", publish=False)
        assert len(report.job_ids) == 1
        app = create_engine(app_url)
        with app.connect() as conn:
            assert conn.execute(text("select count(*) from jobs")).scalar() == 1
            for ddl in ("create table intruder (i int)", "drop table jobs",
                        "alter table jobs add column x int"):
                with pytest.raises(ProgrammingError, match="permission denied|must be owner"):
                    conn.execute(text(ddl))
                conn.rollback()
        app.dispose()
    finally:
        dispose_engines()
        server.destroy()
