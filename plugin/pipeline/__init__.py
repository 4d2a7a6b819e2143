"""Ingestion: the leased queue and the worker that embeds what it claims."""
