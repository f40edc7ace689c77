"""Inference-time guardrails: the pipeline of checks, its configuration, the `guard score` job and the
guarded OpenAI-compatible server."""
