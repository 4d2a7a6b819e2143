"""The model host: the one process that holds the model(s) and serves HTTP, SQL and ingestion."""
