"""Retrieval evaluation: relevance judgements, metrics, and the `longembed eval` command's runner."""
