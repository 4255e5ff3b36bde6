"""Request bodies of the OpenAI-compatible API and of the platform's REST routes.

Fields the `openai` client may send but the platform has no use for (presence_penalty, logit_bias,
…) are accepted and ignored, as other OpenAI-compatible servers do; fields whose value changes
the answer in a way the platform cannot honour (n > 1, logprobs, token arrays) are refused.
"""

from __future__ import annotations

from typing import Literal

from pydantic import BaseModel, ConfigDict, Field


class TextPart(BaseModel):
    model_config = ConfigDict(extra="allow")
    type: str
    text: str | None = None


class ChatMessage(BaseModel):
    model_config = ConfigDict(extra="allow")
    role: Literal["system", "developer", "user", "assistant", "tool"]
    content: str | list[TextPart] | None = None
    name: str | None = None


class StreamOptions(BaseModel):
    include_usage: bool = False


class SamplingFields(BaseModel):
    model_config = ConfigDict(extra="allow")
    model: str = Field(min_length=1)
    temperature: float | None = Field(default=None, ge=0.0, le=2.0)
    top_p: float | None = Field(default=None, gt=0.0, le=1.0)
    seed: int | None = Field(default=None, ge=0)
    stop: str | list[str] | None = None
    n: int = Field(default=1, ge=1)
    stream: bool = False
    stream_options: StreamOptions | None = None
    user: str | None = Field(default=None, max_length=256)
    logprobs: bool | int | None = None


class ChatCompletionRequest(SamplingFields):
    messages: list[ChatMessage] = Field(min_length=1)
    max_tokens: int | None = Field(default=None, ge=1)
    max_completion_tokens: int | None = Field(default=None, ge=1)
    # The assistant's session (model `llmos-assistant`); the X-Llmos-Session-Id header also names it.
    session_id: str | None = Field(default=None, max_length=256)


class CompletionRequest(SamplingFields):
    prompt: str | list[str]
    max_tokens: int | None = Field(default=16, ge=1)
    echo: bool = False


class EmbeddingRequest(BaseModel):
    model_config = ConfigDict(extra="allow")
    model: str = Field(min_length=1)
    input: str | list[str] | list[int] | list[list[int]]
    encoding_format: Literal["float", "base64"] = "float"
    dimensions: int | None = Field(default=None, ge=1)
    user: str | None = None


class SpeechRequest(BaseModel):
    model_config = ConfigDict(extra="allow")
    model: str = Field(min_length=1)
    input: str = Field(min_length=1, max_length=4096)
    voice: str = Field(min_length=1)
    response_format: str = "wav"
    speed: float = Field(default=1.0, ge=0.25, le=4.0)
    instructions: str | None = None


class DocumentRequest(BaseModel):
    """A document sent as JSON: `content` is its text (or base64 bytes with `content_base64`)."""

    document_id: str = ""
    title: str = ""
    content: str = ""
    content_base64: str = ""
    mime_type: str = "text/plain"
    source: str = ""
    tags: list[str] = Field(default_factory=list)
    metadata: dict[str, str] = Field(default_factory=dict)
    interactive: bool = True


class SummarizeRequest(BaseModel):
    text: str | None = None
    document_id: str | None = None
    mode: Literal["extractive", "abstractive"] = "extractive"
    target_words: int = Field(default=0, ge=0)


class RecommendRequest(BaseModel):
    user_id: str = Field(min_length=1)
    top_k: int = Field(default=0, ge=0)
    include_seen: bool = False
