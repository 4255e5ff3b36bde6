from __future__ import annotations

from pydantic import field_validator

from llmos.settings import PlatformSettings


class GatewaySettings(PlatformSettings):
    # Largest JSON body accepted (chat, embeddings, a document sent as JSON): 413 past it.
    gateway_max_json_bytes: int = 8 * 1024 * 1024
    # Largest multipart upload (an audio file to transcribe, a document file): 413 past it.
    # The gRPC message limit (32 MiB) bounds what can travel on anyway.
    gateway_max_upload_bytes: int = 25 * 1024 * 1024
    # Origins allowed to call from a browser (comma-separated); empty: no CORS headers at all.
    gateway_cors_origins: str = ""
    # Deadline of each call to a service made for a request.
    gateway_timeout_s: float = 120.0
    # The model name that routes chat completions to the assistant (DialogueService.Chat).
    gateway_assistant_model: str = "llmos-assistant"
    # How long the list of served models is reused before asking inference again.
    gateway_models_ttl_s: float = 30.0
    # Longest audio accepted for transcription, in seconds (decoded before it is sent).
    gateway_max_audio_s: float = 600.0
    # Jaeger's UI, linked from the console's trace view when spans go to LLMOS_OTLP_ENDPOINT.
    gateway_jaeger_url: str = "http://127.0.0.1:16686"

    @field_validator("gateway_max_json_bytes", "gateway_max_upload_bytes")
    @classmethod
    def _positive(cls, value: int) -> int:
        if value < 1:
            raise ValueError("must be at least 1 byte")
        return value

    @property
    def cors_origins(self) -> list[str]:
        return [origin.strip() for origin in self.gateway_cors_origins.split(",") if origin.strip()]
