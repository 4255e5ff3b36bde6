"""How the speech service is assembled. Its API is declared; its logic is not built yet."""

from __future__ import annotations

from llmos.service import unbuilt_service
from llmos.v1 import speech_pb2, speech_pb2_grpc

DEFINITION = unbuilt_service(
    "speech",
    speech_pb2,
    "SpeechService",
    speech_pb2_grpc.SpeechServiceServicer,
    speech_pb2_grpc.add_SpeechServiceServicer_to_server,
    reason="recognition and synthesis arrive with the speech work (issue 6)",
    reserved_subjects=(),
)
