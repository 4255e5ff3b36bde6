"""How the tokenizer service is assembled: its core, gRPC servicer and (no) bus handlers."""

from __future__ import annotations

from llmos.bus.broker import Bus
from llmos.models import artefact_dir
from llmos.service import GrpcBinding, ServiceDefinition, ServiceParts
from llmos.tokenization import ModelTokenizer
from llmos.v1 import tokenizer_pb2, tokenizer_pb2_grpc
from services.tokenizer.core import TokenizerCore
from services.tokenizer.servicer import TokenizerServicer
from services.tokenizer.settings import TokenizerSettings


async def build(settings: TokenizerSettings, bus: Bus) -> ServiceParts:
    model = settings.tokenizer_model
    tokenizer = ModelTokenizer.from_dir(artefact_dir(settings.home, model))
    core = TokenizerCore({model: tokenizer}, model, settings.tokenizer_max_text_chars, settings.tokenizer_max_batch)
    return ServiceParts(
        grpc=[
            GrpcBinding.of(
                tokenizer_pb2,
                "TokenizerService",
                TokenizerServicer(core),
                tokenizer_pb2_grpc.add_TokenizerServiceServicer_to_server,
            )
        ]
    )


DEFINITION = ServiceDefinition("tokenizer", TokenizerSettings, build)
