"""Serve stage: generation from a trained run (the engine behind the CLI and, later, the chat front ends)."""
