"""Transports: WebSocket, SSE, the OpenAI-compatible API, REST, health and metrics."""
