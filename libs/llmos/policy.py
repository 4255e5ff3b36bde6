"""Who may call what: permissions per RPC and per role, and which service calls which RPC,
defined once for every service.

Each RPC needs one permission; each role grants a set of them. A call whose principal lacks
the permission is refused with PERMISSION_DENIED naming it. A call a service makes for a caller
acts for the caller's principal (`llmos.assertions`), so a role must also grant what the services
call on its behalf (a user's Chat needs search and generate downstream); and the calling service
must be one DESIGN.md has call that RPC (`SERVICE_CALLS`), whoever it acts for.
"""

from __future__ import annotations

from enum import StrEnum

from llmos.auth import SERVICE_ROLE, Principal
from llmos.errors import PermissionDenied


class Permission(StrEnum):
    TOKENIZE = "tokenize"
    EMBED = "embed"
    GENERATE = "generate"
    MODELS_READ = "models:read"
    DOCUMENTS_READ = "documents:read"
    DOCUMENTS_WRITE = "documents:write"
    SEARCH = "search"
    SPEECH = "speech"
    CHAT = "chat"
    SESSIONS_READ = "sessions:read"
    AUDIT_READ = "audit:read"
    AUDIT_VERIFY = "audit:verify"


# Permissions whose use reads or changes a tenant's data: every allowed call is audited.
DATA_PERMISSIONS = frozenset(
    {
        Permission.DOCUMENTS_READ,
        Permission.DOCUMENTS_WRITE,
        Permission.SEARCH,
        Permission.CHAT,
        Permission.SESSIONS_READ,
        Permission.AUDIT_READ,
        Permission.AUDIT_VERIFY,
    }
)

_USER = frozenset(
    {
        Permission.TOKENIZE,
        Permission.EMBED,
        Permission.GENERATE,
        Permission.MODELS_READ,
        Permission.DOCUMENTS_READ,
        Permission.SEARCH,
        Permission.SPEECH,
        Permission.CHAT,
        Permission.SESSIONS_READ,
    }
)

ROLE_PERMISSIONS: dict[str, frozenset[Permission]] = {
    "user": _USER,
    "operator": _USER | {Permission.DOCUMENTS_WRITE, Permission.AUDIT_READ},
    # A service acting on its own behalf for a bus event's tenant (only inside an assertion).
    SERVICE_ROLE: frozenset(
        {
            Permission.TOKENIZE,
            Permission.EMBED,
            Permission.GENERATE,
            Permission.MODELS_READ,
            Permission.DOCUMENTS_READ,
            Permission.DOCUMENTS_WRITE,
            Permission.SEARCH,
            Permission.SPEECH,
        }
    ),
    "admin": frozenset(Permission),
}
# The roles an API key may carry; SERVICE_ROLE is no key's.
ROLES = tuple(role for role in ROLE_PERMISSIONS if role != SERVICE_ROLE)

_P = Permission
RPC_PERMISSIONS: dict[str, Permission] = {
    "/llmos.v1.IngestService/SubmitDocument": _P.DOCUMENTS_WRITE,
    "/llmos.v1.IngestService/GetDocumentStatus": _P.DOCUMENTS_READ,
    "/llmos.v1.IngestService/DeleteDocument": _P.DOCUMENTS_WRITE,
    "/llmos.v1.IngestService/ListDocuments": _P.DOCUMENTS_READ,
    "/llmos.v1.TokenizerService/Tokenize": _P.TOKENIZE,
    "/llmos.v1.TokenizerService/Detokenize": _P.TOKENIZE,
    "/llmos.v1.TokenizerService/CountTokens": _P.TOKENIZE,
    "/llmos.v1.TokenizerService/ApplyChatTemplate": _P.TOKENIZE,
    "/llmos.v1.InferenceService/Generate": _P.GENERATE,
    "/llmos.v1.InferenceService/Embed": _P.EMBED,
    "/llmos.v1.InferenceService/ListModels": _P.MODELS_READ,
    "/llmos.v1.RetrievalService/Search": _P.SEARCH,
    "/llmos.v1.RetrievalService/Recommend": _P.SEARCH,
    "/llmos.v1.RetrievalService/GetDocument": _P.DOCUMENTS_READ,
    "/llmos.v1.SpeechService/Recognize": _P.SPEECH,
    "/llmos.v1.SpeechService/StreamingRecognize": _P.SPEECH,
    "/llmos.v1.SpeechService/Synthesize": _P.SPEECH,
    "/llmos.v1.SpeechService/SynthesizeStream": _P.SPEECH,
    "/llmos.v1.SpeechService/ListVoices": _P.SPEECH,
    "/llmos.v1.DialogueService/Chat": _P.CHAT,
    "/llmos.v1.DialogueService/Converse": _P.CHAT,
    "/llmos.v1.DialogueService/Summarize": _P.CHAT,
    "/llmos.v1.DialogueService/GetSession": _P.SESSIONS_READ,
    "/llmos.v1.DialogueService/EndSession": _P.CHAT,
    "/llmos.v1.AuditService/Query": _P.AUDIT_READ,
    "/llmos.v1.AuditService/Verify": _P.AUDIT_VERIFY,
}


_AUDIT = "/llmos.v1.AuditService/"
_DIALOGUE = "/llmos.v1.DialogueService/"
_INGEST = "/llmos.v1.IngestService/"
_INFERENCE = "/llmos.v1.InferenceService/"
_RETRIEVAL = "/llmos.v1.RetrievalService/"
_SPEECH = "/llmos.v1.SpeechService/"
_TOKENIZER = "/llmos.v1.TokenizerService/"
# The RPCs each service calls on other services (DESIGN.md's flows): its service identity may call
# these and nothing else. A service missing here signs no assertions (tokenizer, inference, audit).
SERVICE_CALLS: dict[str, frozenset[str]] = {
    # chunking by tokens
    "ingest": frozenset({f"{_TOKENIZER}Tokenize"}),
    # the query's embedding for hybrid search
    "retrieval": frozenset({f"{_INFERENCE}Embed"}),
    # an indexed document's text for the tenant's domain language model
    "speech": frozenset({f"{_RETRIEVAL}GetDocument"}),
    # answers, summaries and voice turns
    "dialogue": frozenset(
        {
            f"{_INFERENCE}Embed",
            f"{_INFERENCE}Generate",
            f"{_RETRIEVAL}Search",
            f"{_RETRIEVAL}GetDocument",
            f"{_TOKENIZER}CountTokens",
            f"{_SPEECH}StreamingRecognize",
            f"{_SPEECH}SynthesizeStream",
        }
    ),
    # the HTTP gateway: the OpenAI-compatible API and REST for the platform, for its callers
    "gateway": frozenset(
        {
            f"{_INFERENCE}Generate",
            f"{_INFERENCE}Embed",
            f"{_INFERENCE}ListModels",
            f"{_RETRIEVAL}Search",
            f"{_RETRIEVAL}Recommend",
            f"{_RETRIEVAL}GetDocument",
            f"{_SPEECH}Recognize",
            f"{_SPEECH}Synthesize",
            f"{_SPEECH}ListVoices",
            f"{_DIALOGUE}Chat",
            f"{_DIALOGUE}Summarize",
            f"{_DIALOGUE}GetSession",
            f"{_DIALOGUE}EndSession",
            f"{_INGEST}SubmitDocument",
            f"{_INGEST}GetDocumentStatus",
            f"{_INGEST}DeleteDocument",
            f"{_INGEST}ListDocuments",
            f"{_AUDIT}Query",
            f"{_AUDIT}Verify",
        }
    ),
}


def permissions_of(principal: Principal) -> frozenset[Permission]:
    granted: frozenset[Permission] = frozenset()
    for role in principal.roles:
        if role == SERVICE_ROLE and not principal.service:
            continue  # a key stored with the old shared service role grants nothing
        granted |= ROLE_PERMISSIONS.get(role, frozenset())
    return granted


def required_permission(method: str) -> Permission:
    """The permission `method` needs; an RPC missing from the table is refused, never open."""
    if method not in RPC_PERMISSIONS:
        raise PermissionDenied(f"{method} has no access policy; it is refused until one is defined")
    return RPC_PERMISSIONS[method]


def authorize(principal: Principal, method: str) -> Permission:
    """Return the permission used, or raise PermissionDenied naming the missing one (or naming
    the service that may not make this call)."""
    permission = required_permission(method)
    if principal.service and method not in SERVICE_CALLS.get(principal.service, frozenset()):
        raise PermissionDenied(
            f"service {principal.service!r} may not call {method.lstrip('/')} (llmos.policy.SERVICE_CALLS "
            "lists the calls DESIGN.md gives each service)"
        )
    if permission not in permissions_of(principal):
        roles = ", ".join(sorted(principal.roles)) or "none"
        raise PermissionDenied(
            f"{principal.subject!r} (roles: {roles}) lacks permission {permission.value!r} for {method.lstrip('/')}"
        )
    return permission
