"""longembed's PostgreSQL layer, in rooms; imports run one way, down this list.

- `cli/`       the `longembed` command: argument parsing, one error policy and exit codes
               (`errors.py`), one module per command group.
- `service/`   the model host (`longembed serve`): the one process that holds the models. HTTP
               (`http.py`, OpenAI-compatible) -> `served.py` (request policy) -> `batcher.py` (one
               thread per model packs every caller's sequences into token-budget batches) -> the
               encoder. `supervisor.py` keeps it running beside the embedded server.
- `pipeline/`  ingestion: the input reader (`ingest.py`), the leased queue (`queue.py`) and the
               worker (`worker.py`) that claims, embeds and writes batches.
- `store/`     what lives in PostgreSQL: collections, documents, search, vectorized tables.
- `embedded/`  the embedded PostgreSQL (launcher, home, service user) and its PL/Python build.
- `db.py`, `migrate.py`, `models.py`, `settings.py`: connections, the schema runner, one loaded
  model per source per process, the environment read once.

The encoder is reached through `models.get_model` only (by the host, the workers, and Python search and
the CLI for a text query in their own process). No longembed code runs
inside PostgreSQL: the SQL functions (migrations/functions/020_embed.sql) are standard-library PL/Python
that send texts to the model host. `docker/` holds the images of docker-compose.yml.
"""
