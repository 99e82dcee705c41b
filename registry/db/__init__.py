"""Database access: engines, sessions and the schema (SQLAlchemy models, Alembic migrations)."""
