"""Who may call what: permissions per RPC and per role, defined once for every service.

Each RPC needs one permission; each role grants a set of them. A call whose principal lacks
the permission is refused with PERMISSION_DENIED naming it. Calls a service makes while serving
a request carry the caller's credentials, so a role must also grant what the services call on
its behalf (a user's Chat needs search and generate downstream).
"""

from __future__ import annotations

from enum import StrEnum

from llmos.auth import Principal
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
    "service": frozenset(
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
ROLES = tuple(ROLE_PERMISSIONS)

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


def permissions_of(principal: Principal) -> frozenset[Permission]:
    granted: frozenset[Permission] = frozenset()
    for role in principal.roles:
        granted |= ROLE_PERMISSIONS.get(role, frozenset())
    return granted


def required_permission(method: str) -> Permission:
    """The permission `method` needs; an RPC missing from the table is refused, never open."""
    if method not in RPC_PERMISSIONS:
        raise PermissionDenied(f"{method} has no access policy; it is refused until one is defined")
    return RPC_PERMISSIONS[method]


def authorize(principal: Principal, method: str) -> Permission:
    """Return the permission used, or raise PermissionDenied naming the missing one."""
    permission = required_permission(method)
    if permission not in permissions_of(principal):
        roles = ", ".join(sorted(principal.roles)) or "none"
        raise PermissionDenied(
            f"{principal.subject!r} (roles: {roles}) lacks permission {permission.value!r} for {method.lstrip('/')}"
        )
    return permission
