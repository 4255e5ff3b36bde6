from __future__ import annotations

from pathlib import Path

from pydantic import field_validator

from llmos.settings import PlatformSettings
from services.audit.chain import ChainKeys

# The development key of the audit chain: published here, so accepted only with LLMOS_DEV=true
# (llmos.secrets refuses it elsewhere). `python -m llmos.secrets new LLMOS_AUDIT_CHAIN_KEYS` makes a real one.
DEV_AUDIT_CHAIN_KEYS = "dev:vBHev955AhMOgWViIb1B5dnUAlEjGjNHTy4nvM2vHm4="


class AuditSettings(PlatformSettings):
    # SQLite file of the chained records; empty means `$LLMOS_HOME/data/audit.sqlite3`.
    audit_db: Path | None = None
    # Most records one Query page returns.
    audit_max_page_size: int = 1000
    # Keys of the chain's HMAC, `key_id:base64(32 bytes),...`: the first signs new records and
    # checkpoints, all verify (rotate by putting a new key first and keeping the old ones).
    audit_chain_keys: str = DEV_AUDIT_CHAIN_KEYS
    # Where the latest signed checkpoint is kept; empty means `$LLMOS_HOME/audit/checkpoint.json`.
    # Somewhere whoever can write the database cannot: another volume or owner, at best (the
    # default folder is one of its own, to mount elsewhere).
    audit_checkpoint_file: Path | None = None
    # The checkpoint moves with every record; it is written to its file at most this often (and
    # when the service stops), so a crash can leave the file this far behind the log.
    audit_checkpoint_interval_s: float = 1.0

    @field_validator("audit_chain_keys")
    @classmethod
    def _valid_chain_keys(cls, value: str) -> str:
        ChainKeys.from_spec(value)
        return value

    @property
    def audit_db_path(self) -> Path:
        return self.audit_db or self.data_dir / "audit.sqlite3"

    @property
    def chain_keys(self) -> ChainKeys:
        return ChainKeys.from_spec(self.audit_chain_keys)

    @property
    def checkpoint_path(self) -> Path:
        return self.audit_checkpoint_file or self.home / "audit" / "checkpoint.json"
