"""Typed clients of the platform's services: one per service, over the generated stubs.

Callers get platform errors (`llmos.errors`) and plain values, never gRPC's exceptions or paging.
Every RPC of `protos/llmos/v1` has a call here:

| service | calls |
| --- | --- |
| AuditService | AuditClient.query (Query, every page), verify |
| DialogueService | DialogueClient.chat, converse, summarize, session (GetSession), end_session |
| IngestService | IngestClient.submit, status (GetDocumentStatus), delete, documents / documents_page (ListDocuments), wait_until_settled |
| InferenceService | InferenceClient.generate, generate_stream, embed, embed_response, models (ListModels) |
| RetrievalService | RetrievalClient.search, recommend, document_page / read_document / document (GetDocument) |
| SpeechService | SpeechClient.recognize, recognize_stream, synthesize, synthesize_stream, voices (ListVoices) |
| TokenizerService | TokenizerClient.tokenize, token_offsets, detokenize, count / count_response (CountTokens), apply_chat_template |
"""

from llmos.clients.audit import AuditClient
from llmos.clients.base import Metadata, ServiceClient
from llmos.clients.dialogue import DialogueClient
from llmos.clients.inference import InferenceClient, chat_messages
from llmos.clients.ingest import IngestClient
from llmos.clients.retrieval import Document, RetrievalClient, stitch
from llmos.clients.speech import SpeechClient, transcript
from llmos.clients.tokenizer import TokenizerClient

__all__ = [
    "AuditClient", "DialogueClient", "Document", "InferenceClient", "IngestClient", "Metadata", "RetrievalClient",
    "ServiceClient", "SpeechClient", "TokenizerClient", "chat_messages", "stitch", "transcript",
]
