"""How the retrieval service is assembled. Its API is declared; its logic is not built yet."""

from __future__ import annotations

from llmos.bus.subjects import CHUNKS_EMBEDDED, DOCS_DELETED
from llmos.service import unbuilt_service
from llmos.v1 import retrieval_pb2, retrieval_pb2_grpc

DEFINITION = unbuilt_service(
    "retrieval",
    retrieval_pb2,
    "RetrievalService",
    retrieval_pb2_grpc.RetrievalServiceServicer,
    retrieval_pb2_grpc.add_RetrievalServiceServicer_to_server,
    reason="search, recommend and document lookup arrive with the live knowledge-base work (issue 4)",
    reserved_subjects=(CHUNKS_EMBEDDED, DOCS_DELETED),
)
