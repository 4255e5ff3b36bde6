from __future__ import annotations

from pathlib import Path

from llmos.settings import PlatformSettings


class AuditSettings(PlatformSettings):
    # SQLite file of the chained records; empty means `$LLMOS_HOME/data/audit.sqlite3`.
    audit_db: Path | None = None
    # Most records one Query page returns.
    audit_max_page_size: int = 1000

    @property
    def audit_db_path(self) -> Path:
        return self.audit_db or self.data_dir / "audit.sqlite3"
