"""The HTTP adapter of the gateway core: routes, authentication, audit, limits, error shapes.

Every `/v1/` request presents `Authorization: Bearer <api key>`; the key is resolved like the
gRPC services resolve it (`llmos.keys.KeyAuthenticator`) and the request is served under
`llmos.auth.acting_as`, so the calls it makes act for that caller: each carries an assertion the
gateway signs for the caller's principal (`llmos.assertions`), never the caller's key. Each route
needs the permission of the RPC it stands for (`llmos.policy`); refusals, and allowed calls that
touch a tenant's data, are audited on `llmos.audit.gateway`, failing closed like the services.
"""

from __future__ import annotations

import asyncio
import base64
import binascii
import json
import logging
import mimetypes
import re
from collections.abc import AsyncIterator, Awaitable, Callable, MutableMapping
from typing import Any, Protocol, TypeVar

from fastapi import Depends, FastAPI, File, Form, Query, Request, UploadFile
from fastapi.exceptions import RequestValidationError
from fastapi.middleware.cors import CORSMiddleware
from fastapi.responses import JSONResponse, PlainTextResponse, Response, StreamingResponse
from opentelemetry import trace
from opentelemetry.trace import TracerProvider
from opentelemetry.instrumentation.asgi import OpenTelemetryMiddleware
from pydantic import ValidationError
from starlette.exceptions import HTTPException as StarletteHTTPException

from llmos import errors
from llmos.audit import ALLOW, DENY
from llmos.auth import AUTHORIZATION_HEADER, Principal, acting_as, current_principal
from llmos.policy import DATA_PERMISSIONS, Permission, permissions_of
from llmos.v1 import events_pb2
from services.gateway.core import GatewayCore, gather_chat, gather_completion
from services.gateway.errors import RequestTooLarge, error_body, error_response_parts, http_error_for
from services.gateway.schemas import (
    ChatCompletionRequest,
    CompletionRequest,
    DocumentRequest,
    EmbeddingRequest,
    RecommendRequest,
    SpeechRequest,
    StreamOptions,
    SummarizeRequest,
)
from services.gateway.settings import GatewaySettings

logger = logging.getLogger(__name__)
T = TypeVar("T")

SESSION_HEADER = "X-Llmos-Session-Id"
_CONVERTER = re.compile(r":\w+}")
API_PREFIX = "/v1/"
Scope = MutableMapping[str, Any]
Message = MutableMapping[str, Any]
Receive = Callable[[], Awaitable[Message]]
Send = Callable[[Message], Awaitable[None]]
Asgi = Callable[[Scope, Receive, Send], Awaitable[None]]


class Authenticator(Protocol):
    async def authenticate(self, authorization: str | None) -> Principal: ...


class AuditRecorder(Protocol):
    async def record(
        self, principal: Principal | None, action: str, resource: str, decision: events_pb2.AuditDecision.ValueType, reason: str
    ) -> None: ...


def error_response(error: errors.LlmosError) -> JSONResponse:
    status, body, headers = error_response_parts(error)
    return JSONResponse(body, status_code=status, headers=headers)


async def _send_json(send: Send, status: int, body: dict[str, Any], headers: dict[str, str] | None = None) -> None:
    payload = json.dumps(body).encode()
    raw = [(b"content-type", b"application/json"), (b"content-length", str(len(payload)).encode())]
    raw += [(key.lower().encode(), value.encode()) for key, value in (headers or {}).items()]
    await send({"type": "http.response.start", "status": status, "headers": raw})
    await send({"type": "http.response.body", "body": payload})


class BodyLimit:
    """413 for a body over the limit: by its Content-Length before it is read, else as it arrives."""

    def __init__(self, app: Asgi, max_json_bytes: int, max_upload_bytes: int) -> None:
        self._app = app
        self._max_json = max_json_bytes
        self._max_upload = max_upload_bytes

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self._app(scope, receive, send)
            return
        headers = dict(scope.get("headers") or ())
        multipart = headers.get(b"content-type", b"").startswith(b"multipart/")
        limit = self._max_upload if multipart else self._max_json
        what = "upload" if multipart else "JSON body"
        declared = headers.get(b"content-length", b"")
        too_large = RequestTooLarge(f"the {what} is over the limit of {limit} bytes")
        if declared.isdigit() and int(declared) > limit:
            status, body, extra = error_response_parts(too_large)
            await _send_json(send, status, body, extra)
            return
        received = 0
        started = False

        async def counted() -> Message:
            nonlocal received
            message = await receive()
            received += len(message.get("body", b""))
            if received > limit:
                raise too_large
            return message

        async def watched(message: Message) -> None:
            nonlocal started
            started = started or message["type"] == "http.response.start"
            await send(message)

        try:
            await self._app(scope, counted, watched)
        except RequestTooLarge as exc:
            if started:
                raise
            status, body, extra = error_response_parts(exc)
            await _send_json(send, status, body, extra)


class Authenticate:
    """Resolves the caller of every `/v1/` request and serves it as that caller."""

    def __init__(self, app: Asgi, authenticator: Authenticator, audit: AuditRecorder) -> None:
        self._app = app
        self._authenticator = authenticator
        self._audit = audit

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http" or not scope["path"].startswith(API_PREFIX):
            await self._app(scope, receive, send)
            return
        value = dict(scope.get("headers") or ()).get(AUTHORIZATION_HEADER.encode())
        credentials = value.decode("latin-1") if value else None
        try:
            principal = await self._authenticator.authenticate(credentials)
        except errors.Unauthenticated as exc:
            await self._audit.record(None, f"{scope['method']} {scope['path']}", "", DENY, exc.message)
            status, body, headers = error_response_parts(exc)
            await _send_json(send, status, body, {"WWW-Authenticate": "Bearer", **headers})
            return
        span = trace.get_current_span()
        span.set_attribute("enduser.id", principal.subject)
        span.set_attribute("llmos.tenant", principal.tenant)
        with acting_as(principal):
            await self._app(scope, receive, send)


def _resource(request: Request) -> str:
    for name in ("document_id", "session_id"):
        if name in request.path_params:
            return f"{name.removesuffix('_id')}/{request.path_params[name]}"
    return ""


def sse(chunks: AsyncIterator[dict[str, Any]], first: dict[str, Any]) -> AsyncIterator[bytes]:
    """Server-sent events as the `openai` client reads them: one `data:` line per chunk, an
    error object if the answer fails half-way, then `[DONE]`."""

    async def events() -> AsyncIterator[bytes]:
        try:
            yield f"data: {json.dumps(first)}\n\n".encode()
            async for chunk in chunks:
                yield f"data: {json.dumps(chunk)}\n\n".encode()
        except errors.LlmosError as exc:
            _, body, _ = error_response_parts(exc)
            yield f"data: {json.dumps(body)}\n\n".encode()
            return
        finally:
            await chunks.aclose()  # type: ignore[attr-defined]
        yield b"data: [DONE]\n\n"

    return events()


def create_app(
    settings: GatewaySettings, core: GatewayCore, authenticator: Authenticator, audit: AuditRecorder,
    tracer_provider: TracerProvider | None = None,
) -> FastAPI:
    """The gateway's routes and middleware; spans go to `tracer_provider` (default: the process's)."""
    app = FastAPI(
        title="LLM OS gateway",
        version="1",
        description=(
            "OpenAI-compatible API (chat, completions, embeddings, models, audio) and REST for the platform. "
            "Every /v1/ route takes `Authorization: Bearer <api key>`. The assistant model's session is the "
            f"`session_id` body field or the `{SESSION_HEADER}` header, returned in both."
        ),
    )

    async def permitted(request: Request, permission: Permission) -> tuple[Principal, str]:
        """The caller and the route's action, once the caller holds `permission` (a refusal is audited)."""
        principal = current_principal()
        route = request.scope.get("route")
        # The route's template without converters ({document_id:path} -> {document_id}): one name per route.
        action = f"{request.method} {_CONVERTER.sub('}', getattr(route, 'path', request.url.path))}"
        trace.get_current_span().update_name(action)
        if permission not in permissions_of(principal):
            roles = ", ".join(sorted(principal.roles)) or "none"
            denied = errors.PermissionDenied(f"{principal.subject!r} (roles: {roles}) lacks permission {permission.value!r} for {action}")
            await audit.record(principal, action, _resource(request), DENY, denied.message)
            raise denied
        return principal, action

    async def authorize(request: Request, permission: Permission) -> Principal:
        """Authorize the request for the caller and audit it as the services audit an RPC."""
        principal, action = await permitted(request, permission)
        if permission in DATA_PERMISSIONS:
            await audit.record(principal, action, _resource(request), ALLOW, "")
        return principal

    async def audited_while(request: Request, permission: Permission, work: Callable[[], Awaitable[T]]) -> T:
        """`work()` run while the request's record is published, its result released only once the
        record is stored (fail closed as `authorize`): the record's round trip to the bus no longer
        comes before a turn's first token."""
        principal, action = await permitted(request, permission)
        record = asyncio.ensure_future(audit.record(principal, action, _resource(request), ALLOW, ""))
        try:
            return await work()
        finally:
            await record

    def allow(permission: Permission) -> Callable[[Request], Awaitable[Principal]]:
        """The route's permission, as a dependency."""

        async def check(request: Request) -> Principal:
            return await authorize(request, permission)

        return check

    @app.exception_handler(errors.LlmosError)
    async def platform_error(request: Request, exc: errors.LlmosError) -> JSONResponse:
        if http_error_for(exc).status >= 500:
            logger.warning("%s %s: %s", request.method, request.url.path, exc.message)
        return error_response(exc)

    @app.exception_handler(RequestValidationError)
    async def invalid_body(request: Request, exc: RequestValidationError) -> JSONResponse:
        problems = exc.errors()
        first = problems[0] if problems else {"loc": (), "msg": "invalid request"}
        param = ".".join(str(part) for part in first["loc"] if part not in ("body", "query", "path", "form"))
        message = "; ".join(f"{'.'.join(str(p) for p in problem['loc'][1:]) or 'body'}: {problem['msg']}" for problem in problems)
        return JSONResponse(error_body(message, http_error_for(errors.InvalidArgument("", "")), param or None), status_code=422)

    @app.exception_handler(StarletteHTTPException)
    async def http_error(request: Request, exc: StarletteHTTPException) -> JSONResponse:
        kinds = {404: "not_found_error", 405: "invalid_request_error"}
        kind = http_error_for(errors.NotFound("")) if exc.status_code == 404 else http_error_for(errors.InvalidArgument("", ""))
        body = {"error": {"message": f"{request.method} {request.url.path}: {exc.detail}", "type": kinds.get(exc.status_code, kind.type),
                          "param": None, "code": None}}
        return JSONResponse(body, status_code=exc.status_code, headers=getattr(exc, "headers", None))

    @app.get("/healthz", include_in_schema=False)
    async def healthz() -> dict[str, str]:
        return {"status": "ok"}

    # -- OpenAI-compatible ----------------------------------------------------------------

    @app.get("/v1/models", tags=["openai"], dependencies=[Depends(allow(Permission.MODELS_READ))])
    async def list_models() -> dict[str, Any]:
        return await core.models()

    @app.post("/v1/chat/completions", tags=["openai"], dependencies=[Depends(allow(Permission.GENERATE))], response_model=None)
    async def chat_completions(body: ChatCompletionRequest, request: Request) -> Response:
        session_id = body.session_id or request.headers.get(SESSION_HEADER)
        if not body.stream:
            body.stream_options = StreamOptions(include_usage=True)
        chunks = core.chat_completion_chunks(body, session_id)
        try:
            if body.model == core.assistant_model:  # a turn reads the tenant's knowledge base: audited
                first = await audited_while(request, Permission.CHAT, lambda: anext(chunks))
            else:
                first = await anext(chunks)
        except BaseException:
            await chunks.aclose()  # type: ignore[attr-defined]
            raise
        headers = {SESSION_HEADER: first["session_id"]} if "session_id" in first else {}
        if body.stream:
            return StreamingResponse(sse(chunks, first), media_type="text/event-stream", headers={"Cache-Control": "no-cache", **headers})
        return JSONResponse(gather_chat([first, *[chunk async for chunk in chunks]]), headers=headers)

    @app.post("/v1/completions", tags=["openai"], dependencies=[Depends(allow(Permission.GENERATE))], response_model=None)
    async def completions(body: CompletionRequest) -> Response:
        if not body.stream:
            body.stream_options = StreamOptions(include_usage=True)
        chunks = core.completion_chunks(body)
        first = await anext(chunks)
        if body.stream:
            return StreamingResponse(sse(chunks, first), media_type="text/event-stream", headers={"Cache-Control": "no-cache"})
        return JSONResponse(gather_completion([first, *[chunk async for chunk in chunks]]))

    @app.post("/v1/embeddings", tags=["openai"], dependencies=[Depends(allow(Permission.EMBED))])
    async def embeddings(body: EmbeddingRequest) -> dict[str, Any]:
        return await core.embeddings(body)

    @app.post("/v1/audio/transcriptions", tags=["openai"], dependencies=[Depends(allow(Permission.SPEECH))], response_model=None)
    async def transcriptions(
        file: UploadFile = File(...),
        model: str = Form(...),
        language: str | None = Form(None),
        response_format: str = Form("json"),
        granularities: list[str] = Form(default=[], alias="timestamp_granularities[]"),
    ) -> Response:
        result = await core.transcription(await file.read(), model, language, response_format, "word" in granularities)
        return PlainTextResponse(result) if isinstance(result, str) else JSONResponse(result)

    @app.post("/v1/audio/speech", tags=["openai"], dependencies=[Depends(allow(Permission.SPEECH))], response_class=Response)
    async def speech(body: SpeechRequest) -> Response:
        audio = await core.speech(body)
        return Response(audio.content, media_type=audio.media_type)

    # -- the platform ---------------------------------------------------------------------

    @app.get("/v1/me", tags=["platform"])
    async def me() -> dict[str, Any]:
        return core.caller()

    @app.post("/v1/documents", tags=["documents"], status_code=202, dependencies=[Depends(allow(Permission.DOCUMENTS_WRITE))],
              openapi_extra={"requestBody": {"content": {
                  "application/json": {"schema": DocumentRequest.model_json_schema()},
                  "multipart/form-data": {"schema": {"type": "object", "properties": {
                      "file": {"type": "string", "format": "binary"}, "document_id": {"type": "string"}, "title": {"type": "string"},
                      "source": {"type": "string"}, "tags": {"type": "string", "description": "comma-separated"}}}}}}})
    async def submit_document(request: Request) -> dict[str, Any]:
        document, content = await _document_of(request)
        return await core.submit_document(document, content)

    @app.get("/v1/documents", tags=["documents"], dependencies=[Depends(allow(Permission.DOCUMENTS_READ))])
    async def list_documents(
        limit: int = Query(50, ge=1, le=500), after: str = "", status: str | None = None, include_deleted: bool = False
    ) -> dict[str, Any]:
        return await core.list_documents(limit, after, status, include_deleted)

    @app.get("/v1/documents/{document_id:path}", tags=["documents"], dependencies=[Depends(allow(Permission.DOCUMENTS_READ))])
    async def get_document(document_id: str, include_content: bool = False) -> dict[str, Any]:
        return await core.document(document_id, include_content)

    @app.delete("/v1/documents/{document_id:path}", tags=["documents"], dependencies=[Depends(allow(Permission.DOCUMENTS_WRITE))])
    async def delete_document(document_id: str) -> dict[str, Any]:
        return await core.delete_document(document_id)

    @app.get("/v1/search", tags=["platform"], dependencies=[Depends(allow(Permission.SEARCH))])
    async def search(
        q: str = Query(..., min_length=1), top_k: int = Query(0, ge=0), mode: str = "hybrid",
        document_id: list[str] = Query([]), tag: list[str] = Query([]), source: list[str] = Query([]), user_id: str = "",
    ) -> dict[str, Any]:
        return await core.search(q, top_k, mode, document_id, tag, source, user_id)

    @app.post("/v1/summarize", tags=["platform"], dependencies=[Depends(allow(Permission.CHAT))])
    async def summarize(body: SummarizeRequest) -> dict[str, Any]:
        return await core.summarize(body)

    @app.get("/v1/sessions/{session_id}", tags=["platform"], dependencies=[Depends(allow(Permission.SESSIONS_READ))])
    async def get_session(session_id: str) -> dict[str, Any]:
        return await core.session(session_id)

    @app.delete("/v1/sessions/{session_id}", tags=["platform"], dependencies=[Depends(allow(Permission.CHAT))])
    async def end_session(session_id: str) -> dict[str, Any]:
        return await core.end_session(session_id)

    @app.post("/v1/recommend", tags=["platform"], dependencies=[Depends(allow(Permission.SEARCH))])
    async def recommend(body: RecommendRequest) -> dict[str, Any]:
        return await core.recommend(body)

    @app.get("/v1/audit", tags=["audit"], dependencies=[Depends(allow(Permission.AUDIT_READ))])
    async def audit_query(
        principal: str = "", action: str = "", after: int = Query(0, ge=0), limit: int = Query(100, ge=1, le=1000), tenant: str = ""
    ) -> dict[str, Any]:
        return await core.audit_records(principal, action, after, limit, tenant)

    @app.post("/v1/audit/verify", tags=["audit"], dependencies=[Depends(allow(Permission.AUDIT_VERIFY))])
    async def audit_verify() -> dict[str, Any]:
        return await core.verify_audit()

    if settings.cors_origins:
        app.add_middleware(CORSMiddleware, allow_origins=settings.cors_origins, allow_methods=["*"],
                           allow_headers=["Authorization", "Content-Type", SESSION_HEADER], expose_headers=[SESSION_HEADER])
    app.add_middleware(Authenticate, authenticator=authenticator, audit=audit)
    app.add_middleware(BodyLimit, max_json_bytes=settings.gateway_max_json_bytes, max_upload_bytes=settings.gateway_max_upload_bytes)
    # Outermost: one SERVER span per request, current while the request is served, so the
    # gRPC calls it makes carry its trace context.
    app.add_middleware(
        OpenTelemetryMiddleware, excluded_urls="healthz", exclude_spans=["receive", "send"], tracer_provider=tracer_provider
    )
    return app


SUPPORTED_UPLOADS = {".md": "text/markdown", ".markdown": "text/markdown", ".txt": "text/plain", ".html": "text/html",
                     ".htm": "text/html", ".pdf": "application/pdf"}


async def _document_of(request: Request) -> tuple[DocumentRequest, bytes]:
    """A document from a multipart upload (`file` and form fields) or a JSON body."""
    content_type = request.headers.get("content-type", "")
    if content_type.startswith("multipart/form-data"):
        form = await request.form()
        upload = form.get("file")
        if not isinstance(upload, UploadFile) and not hasattr(upload, "read"):
            raise errors.InvalidArgument("file", "send the document as the multipart field 'file'")
        name = upload.filename or ""  # type: ignore[union-attr]
        suffix = name[name.rfind("."):].lower() if "." in name else ""
        guessed = SUPPORTED_UPLOADS.get(suffix) or mimetypes.guess_type(name)[0] or "text/plain"
        fields = {key: str(value) for key, value in form.items() if key != "file"}
        try:
            document = DocumentRequest(
                document_id=fields.get("document_id", ""), title=fields.get("title", "") or name, source=fields.get("source", "") or name,
                mime_type=fields.get("mime_type", "") or guessed,
                tags=[tag.strip() for tag in fields.get("tags", "").split(",") if tag.strip()],
                interactive=fields.get("interactive", "true").lower() != "false",
            )
        except ValidationError as exc:
            raise errors.InvalidArgument("form", str(exc)) from None
        return document, await upload.read()  # type: ignore[union-attr]
    try:
        document = DocumentRequest.model_validate_json(await request.body())
    except ValidationError as exc:
        raise RequestValidationError(exc.errors()) from None
    if document.content and document.content_base64:
        raise errors.InvalidArgument("content", "give content or content_base64, not both")
    if document.content_base64:
        try:
            return document, base64.b64decode(document.content_base64, validate=True)
        except binascii.Error:
            raise errors.InvalidArgument("content_base64", "is not valid base64") from None
    return document, document.content.encode()
