"""`vpcnet status`: reads the state beside a running plugin without ever writing it."""
from __future__ import annotations

import sqlite3

from fakes import make_config

from vpcnet.cli import status
from vpcnet.state.store import Store


def test_status_never_migrates_a_running_plugins_database(tmp_path):
    config = make_config(tmp_path)
    Store(config.db_path).close()
    conn = sqlite3.connect(config.db_path)
    conn.execute("UPDATE meta SET value='1' WHERE key='schema_version'")    # as an older plugin wrote it
    conn.execute("ALTER TABLE networks DROP COLUMN mode")
    conn.commit()
    conn.close()
    assert status.collect(config)["networks"] == []
    conn = sqlite3.connect(config.db_path)
    assert conn.execute("SELECT value FROM meta WHERE key='schema_version'").fetchone()[0] == "1"
    assert "mode" not in {r[1] for r in conn.execute("PRAGMA table_info(networks)")}
    conn.close()
