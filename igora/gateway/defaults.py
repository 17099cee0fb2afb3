"""Gateway defaults, apart so that building the CLI does not import FastAPI."""

GATEWAY_NAME = "openai-gateway"
DEFAULT_HOST = "127.0.0.1"
DEFAULT_PORT = 5678
