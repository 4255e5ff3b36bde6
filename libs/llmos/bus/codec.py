"""Protobuf payloads on the bus: one schema (events.proto) for bus and RPC."""

from __future__ import annotations

import hashlib
from typing import TypeVar

from google.protobuf.message import DecodeError, Message

from llmos.errors import InvalidArgument

MessageT = TypeVar("MessageT", bound=Message)

CONTENT_TYPE = "application/x-protobuf"
CONTENT_TYPE_HEADER = "content-type"
MESSAGE_TYPE_HEADER = "llmos-message-type"
MSG_ID_HEADER = "Nats-Msg-Id"


def encode(message: Message) -> bytes:
    return message.SerializeToString(deterministic=True)


def decode(message_type: type[MessageT], payload: bytes) -> MessageT:
    """Parse a payload, rejecting bytes that are not a valid `message_type`."""
    message = message_type()
    try:
        message.ParseFromString(payload)
    except DecodeError as exc:
        raise InvalidArgument(
            "payload", f"not a valid {message_type.DESCRIPTOR.full_name} protobuf message ({exc})"
        ) from None
    return message


def content_id(message: Message) -> str:
    """A stable id for a message's content, used as `Nats-Msg-Id` so a re-publish is dropped."""
    return hashlib.sha256(encode(message)).hexdigest()
