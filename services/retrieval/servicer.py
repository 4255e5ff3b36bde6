"""gRPC adapter of the retrieval core: the tenant always comes from the caller's credentials, and
so does the user whose reading profile a call reads or writes: users act as themselves, operators
and administrators may name another user of the tenant (`llmos.users`)."""

from __future__ import annotations

import grpc

from llmos.auth import current_principal, effective_tenant
from llmos.users import acting_user
from llmos.v1 import retrieval_pb2, retrieval_pb2_grpc
from services.retrieval.core import RetrievalCore


class RetrievalServicer(retrieval_pb2_grpc.RetrievalServiceServicer):
    def __init__(self, core: RetrievalCore) -> None:
        self._core = core

    async def Search(
        self, request: retrieval_pb2.SearchRequest, context: grpc.aio.ServicerContext
    ) -> retrieval_pb2.SearchResponse:
        return await self._core.search(effective_tenant(request.tenant), request, _named_user(request.user_id))

    async def Recommend(
        self, request: retrieval_pb2.RecommendRequest, context: grpc.aio.ServicerContext
    ) -> retrieval_pb2.RecommendResponse:
        # Recommendations are always for someone: the caller, unless it names another user.
        user_id = acting_user(current_principal(), request.user_id)
        return await self._core.recommend(effective_tenant(request.tenant), request, user_id)

    async def GetDocument(
        self, request: retrieval_pb2.GetDocumentRequest, context: grpc.aio.ServicerContext
    ) -> retrieval_pb2.GetDocumentResponse:
        return await self._core.get_document(effective_tenant(request.tenant), request, _named_user(request.user_id))


def _named_user(requested: str) -> str:
    """The user whose profile remembers a search or a read: only one the request names."""
    return acting_user(current_principal(), requested) if requested else ""
