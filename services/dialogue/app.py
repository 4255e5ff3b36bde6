"""How the dialogue service is assembled. Its API is declared; its logic is not built yet."""

from __future__ import annotations

from llmos.bus.subjects import DOCS_INDEXED
from llmos.service import unbuilt_service
from llmos.v1 import dialogue_pb2, dialogue_pb2_grpc

DEFINITION = unbuilt_service(
    "dialogue",
    dialogue_pb2,
    "DialogueService",
    dialogue_pb2_grpc.DialogueServiceServicer,
    dialogue_pb2_grpc.add_DialogueServiceServicer_to_server,
    reason="chat, voice turns and summaries arrive with the dialogue work (issue 5)",
    reserved_subjects=(DOCS_INDEXED,),
)
