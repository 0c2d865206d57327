"""The gateway process: HTTP (OpenAI API) and gRPC in front of a `Backend`; imports no engine code."""
