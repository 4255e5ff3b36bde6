"""How the inference service is assembled. Its API is declared; its logic is not built yet."""

from __future__ import annotations

from llmos.bus.subjects import CHUNKS_CREATED
from llmos.service import unbuilt_service
from llmos.v1 import inference_pb2, inference_pb2_grpc

DEFINITION = unbuilt_service(
    "inference",
    inference_pb2,
    "InferenceService",
    inference_pb2_grpc.InferenceServiceServicer,
    inference_pb2_grpc.add_InferenceServiceServicer_to_server,
    reason="generation and embeddings arrive with the inference service work (issue 3)",
    reserved_subjects=(CHUNKS_CREATED,),
)
