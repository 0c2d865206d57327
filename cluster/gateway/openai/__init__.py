"""The OpenAI-compatible HTTP API: request and response models, error shape, auth, the FastAPI app."""
