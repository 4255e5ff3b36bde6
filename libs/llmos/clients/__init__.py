"""Typed clients of the platform's services: one per service, over the generated stubs.

Callers get platform errors (`llmos.errors`) and plain values, never gRPC's exceptions or paging.
"""

from llmos.clients.base import Metadata, ServiceClient
from llmos.clients.dialogue import DialogueClient
from llmos.clients.inference import InferenceClient
from llmos.clients.retrieval import RetrievalClient, stitch
from llmos.clients.speech import SpeechClient
from llmos.clients.tokenizer import TokenizerClient

__all__ = ["DialogueClient", "InferenceClient", "Metadata", "RetrievalClient", "ServiceClient", "SpeechClient", "TokenizerClient", "stitch"]
