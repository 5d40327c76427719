"""The HTTP service (Litestar): OpenAI-compatible chat, /v1/answer, admin, metrics, the try-it page, and the
live A/B split. It sits on top of persona inference (router) and the adapters."""
