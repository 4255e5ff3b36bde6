"""The assistant's voice, from the domain configuration (`demo/assistant.yaml`): the company it
speaks for and its scripted replies, so another company's assistant is a file, not a code change."""

from __future__ import annotations

from dataclasses import dataclass, fields
from pathlib import Path

import yaml

from llmos.settings import SettingsError


@dataclass(frozen=True)
class Replies:
    greet: str
    thanks: str
    goodbye: str
    handoff_offer: str  # added to every reply that hands the conversation to a person
    dont_know: str  # an in-domain question the help centre does not answer
    out_of_scope: str
    human: str
    ask_order: str


@dataclass(frozen=True)
class Assistant:
    brand: str
    replies: Replies

    def scripted(self, intent: str) -> str:
        """The reply of a small-talk intent (greet, thanks, goodbye)."""
        return str(getattr(self.replies, intent))


SMALL_TALK = frozenset({"greet", "thanks", "goodbye"})


def load_assistant(path: Path) -> Assistant:
    """The assistant described by `path`; a missing file or key stops the service with its name."""
    try:
        data = yaml.safe_load(path.read_text(encoding="utf-8")) or {}
    except (OSError, yaml.YAMLError) as exc:
        raise SettingsError(f"LLMOS_DIALOGUE_ASSISTANT_FILE: {path}: {exc}") from None
    replies = data.get("replies") or {}
    missing = [f"replies.{field.name}" for field in fields(Replies) if not str(replies.get(field.name, "")).strip()]
    if not str(data.get("brand", "")).strip():
        missing.insert(0, "brand")
    if missing:
        raise SettingsError(f"LLMOS_DIALOGUE_ASSISTANT_FILE: {path} lacks {', '.join(missing)}")
    return Assistant(str(data["brand"]).strip(), Replies(**{field.name: str(replies[field.name]).strip() for field in fields(Replies)}))
