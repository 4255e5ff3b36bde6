"""gRPC adapter of the retrieval core: the tenant always comes from the caller's credentials."""

from __future__ import annotations

import grpc

from llmos.auth import effective_tenant
from llmos.v1 import retrieval_pb2, retrieval_pb2_grpc
from services.retrieval.core import RetrievalCore


class RetrievalServicer(retrieval_pb2_grpc.RetrievalServiceServicer):
    def __init__(self, core: RetrievalCore) -> None:
        self._core = core

    async def Search(
        self, request: retrieval_pb2.SearchRequest, context: grpc.aio.ServicerContext
    ) -> retrieval_pb2.SearchResponse:
        return await self._core.search(effective_tenant(request.tenant), request)

    async def Recommend(
        self, request: retrieval_pb2.RecommendRequest, context: grpc.aio.ServicerContext
    ) -> retrieval_pb2.RecommendResponse:
        return await self._core.recommend(effective_tenant(request.tenant), request)

    async def GetDocument(
        self, request: retrieval_pb2.GetDocumentRequest, context: grpc.aio.ServicerContext
    ) -> retrieval_pb2.GetDocumentResponse:
        return await self._core.get_document(effective_tenant(request.tenant), request)
