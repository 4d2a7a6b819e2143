"""The embedded PostgreSQL: server lifecycle, home and permissions, service user, PL/Python build."""
