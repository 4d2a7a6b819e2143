"""What lives in PostgreSQL: collections, documents, search, vectorized tables."""
