"""Alembic environment: migrations run on the connection the gateway hands over.

:meth:`storyreel_gateway.db.Database.migrate` passes an open connection in
``config.attributes["connection"]``; there is no alembic.ini.
"""

from alembic import context
from storyreel_gateway.db import metadata

connection = context.config.attributes["connection"]
context.configure(
    connection=connection,
    target_metadata=metadata,
    # SQLite alters tables by copying them.
    render_as_batch=connection.dialect.name == "sqlite",
)
with context.begin_transaction():
    context.run_migrations()
