"""The catalog's tables, as SQLAlchemy 2 typed ORM classes.

The schema is created only by the Alembic migrations in ``migrations/``; a test compares
these models with the migrations (``alembic check``) so that the two never drift.
"""

from __future__ import annotations

from datetime import datetime, timezone
from typing import Any

from sqlalchemy import (
    JSON,
    BigInteger,
    Boolean,
    DateTime,
    Float,
    ForeignKey,
    Index,
    Integer,
    MetaData,
    String,
    Text,
    TypeDecorator,
    UniqueConstraint,
)
from sqlalchemy.orm import DeclarativeBase, Mapped, mapped_column, relationship

# Named constraints keep migrations readable and identical on SQLite and PostgreSQL.
NAMING_CONVENTION = {
    "ix": "ix_%(column_0_label)s",
    "uq": "uq_%(table_name)s_%(column_0_N_name)s",
    "ck": "ck_%(table_name)s_%(constraint_name)s",
    "fk": "fk_%(table_name)s_%(column_0_name)s_%(referred_table_name)s",
    "pk": "pk_%(table_name)s",
}


class UTCDateTime(TypeDecorator[datetime]):
    """Timestamps stored in UTC and always returned timezone-aware (SQLite drops the zone)."""

    impl = DateTime(timezone=True)
    cache_ok = True

    def process_bind_param(self, value: datetime | None, dialect: Any) -> datetime | None:
        if value is not None and value.tzinfo is None:
            raise ValueError("naive datetime: use datetime.now(timezone.utc)")
        return value.astimezone(timezone.utc) if value is not None else None

    def process_result_value(self, value: datetime | None, dialect: Any) -> datetime | None:
        if value is not None and value.tzinfo is None:
            value = value.replace(tzinfo=timezone.utc)
        return value


def utcnow() -> datetime:
    return datetime.now(timezone.utc)


class Base(DeclarativeBase):
    metadata = MetaData(naming_convention=NAMING_CONVENTION)


class Blob(Base):
    """A stored weights file, named by the sha256 of its canonical bytes."""

    __tablename__ = "blobs"

    digest: Mapped[str] = mapped_column(String(64), primary_key=True)
    size_bytes: Mapped[int] = mapped_column(BigInteger)
    created_at: Mapped[datetime] = mapped_column(UTCDateTime, default=utcnow)


class NameCounter(Base):
    """The last version ever given to a name, so that a removed version is never reused:
    ``team/x@2`` always means the same tensors, wherever it was written down."""

    __tablename__ = "module_names"

    namespace: Mapped[str] = mapped_column(String(96), primary_key=True)
    name: Mapped[str] = mapped_column(String(96), primary_key=True)
    last_version: Mapped[int] = mapped_column(Integer)


class Module(Base):
    """One registered version of a named module: its metadata, config and blob."""

    __tablename__ = "modules"
    __table_args__ = (
        UniqueConstraint("namespace", "name", "version"),
        # The same content under one name is one version, even when two writers race to add it.
        # A unique index, not a constraint: adding it does not rebuild the table on SQLite.
        Index("ux_modules_same_content", "namespace", "name", "digest", "config_digest", unique=True),
        # A removed module's id is never given to another (SQLite reuses the highest rowid
        # otherwise; PostgreSQL sequences never do): an id resolved earlier means one module.
        {"sqlite_autoincrement": True},
    )

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    namespace: Mapped[str] = mapped_column(String(96))
    name: Mapped[str] = mapped_column(String(96))
    version: Mapped[int] = mapped_column(Integer)
    kind: Mapped[str] = mapped_column(String(16), index=True)  # trained, derived, ported, pulled
    digest: Mapped[str] = mapped_column(ForeignKey("blobs.digest"), index=True)
    config_digest: Mapped[str] = mapped_column(String(64))  # identity together with digest
    peft_type: Mapped[str] = mapped_column(String(32), index=True)
    composable: Mapped[bool] = mapped_column(Boolean)
    # Features whose arithmetic is not defined (DoRA, lora_bias, ...): why it is not composable.
    unsupported: Mapped[list[str]] = mapped_column(JSON)
    base_model: Mapped[str] = mapped_column(String(255), index=True)
    base_revision: Mapped[str | None] = mapped_column(String(255))
    task_type: Mapped[str | None] = mapped_column(String(64))  # PEFT's task_type, e.g. CAUSAL_LM
    task: Mapped[str | None] = mapped_column(String(128), index=True)  # the team's task, e.g. sentiment
    rank: Mapped[int | None] = mapped_column(Integer, index=True)
    lora_alpha: Mapped[float | None] = mapped_column(Float)
    use_rslora: Mapped[bool] = mapped_column(Boolean, default=False)
    use_dora: Mapped[bool] = mapped_column(Boolean, default=False)
    target_modules: Mapped[list[str]] = mapped_column(JSON)
    layers: Mapped[dict[str, Any]] = mapped_column(JSON)  # layer -> {"params": {param: shape}, ...}
    config: Mapped[dict[str, Any]] = mapped_column(JSON)  # adapter_config.json as exported
    dtype: Mapped[str] = mapped_column(String(16))
    num_parameters: Mapped[int] = mapped_column(BigInteger)
    size_bytes: Mapped[int] = mapped_column(BigInteger)
    description: Mapped[str | None] = mapped_column(Text)
    owner: Mapped[str] = mapped_column(String(128))
    source: Mapped[dict[str, Any] | None] = mapped_column(JSON)  # where it came from: path, file sha256
    created_at: Mapped[datetime] = mapped_column(UTCDateTime, default=utcnow)

    tags: Mapped[list["Tag"]] = relationship(
        back_populates="module", cascade="all, delete-orphan", order_by="Tag.key", lazy="selectin"
    )
    derivation: Mapped["Derivation | None"] = relationship(
        back_populates="module", cascade="all, delete-orphan", foreign_keys="Derivation.module_id"
    )

    @property
    def full_name(self) -> str:
        return f"{self.namespace}/{self.name}"

    @property
    def ref(self) -> str:
        return f"{self.namespace}/{self.name}@{self.version}"


class Tag(Base):
    __tablename__ = "tags"

    module_id: Mapped[int] = mapped_column(ForeignKey("modules.id", ondelete="CASCADE"), primary_key=True)
    key: Mapped[str] = mapped_column(String(128), primary_key=True)
    value: Mapped[str] = mapped_column(String(512), index=True)

    module: Mapped[Module] = relationship(back_populates="tags")


class Derivation(Base):
    """How a derived module was made: the expression, the method and its parameters."""

    __tablename__ = "derivations"

    module_id: Mapped[int] = mapped_column(ForeignKey("modules.id", ondelete="CASCADE"), primary_key=True)
    expression: Mapped[str] = mapped_column(Text)  # as the user wrote it
    canonical: Mapped[str] = mapped_column(Text)  # normalized, with resolved references
    method: Mapped[str] = mapped_column(String(32))
    method_version: Mapped[int] = mapped_column(Integer)
    parameters: Mapped[dict[str, Any]] = mapped_column(JSON)  # rank, union, dtype, seed, ...
    results: Mapped[dict[str, Any]] = mapped_column(JSON)  # measured: truncation error, ...
    environment: Mapped[dict[str, Any]] = mapped_column(JSON)  # package, torch, safetensors versions
    identity: Mapped[str] = mapped_column(String(64), index=True)  # hash of method, params, inputs
    created_at: Mapped[datetime] = mapped_column(UTCDateTime, default=utcnow)

    module: Mapped[Module] = relationship(back_populates="derivation", foreign_keys=[module_id])
    inputs: Mapped[list["DerivationInput"]] = relationship(
        back_populates="derivation", cascade="all, delete-orphan", order_by="DerivationInput.position",
        lazy="selectin",
    )


class DerivationInput(Base):
    """One edge of the lineage graph: ``input_id`` went into ``module_id`` with coefficients a, b."""

    __tablename__ = "derivation_inputs"

    module_id: Mapped[int] = mapped_column(
        ForeignKey("derivations.module_id", ondelete="CASCADE"), primary_key=True
    )
    position: Mapped[int] = mapped_column(Integer, primary_key=True)
    # RESTRICT: a module that others were derived from cannot disappear under them. NULL for
    # an input known only from imported provenance (an external node); it is linked to a
    # module when one with the same digest is registered.
    input_id: Mapped[int | None] = mapped_column(ForeignKey("modules.id", ondelete="RESTRICT"), index=True)
    input_digest: Mapped[str] = mapped_column(String(64), index=True)
    # For external inputs: {"ref": name in the registry that made it, "repo_id", "commit"}.
    external: Mapped[dict[str, Any] | None] = mapped_column(JSON)
    a: Mapped[float] = mapped_column(Float)  # unsigned coefficient (SEMANTICS.md section 2)
    b: Mapped[float] = mapped_column(Float)  # signed coefficient

    derivation: Mapped[Derivation] = relationship(back_populates="inputs")
    input: Mapped[Module | None] = relationship(foreign_keys=[input_id])


class BaseModelRecord(Base):
    """A host model the registry knows the structure of (from its config.json)."""

    __tablename__ = "base_models"
    __table_args__ = (UniqueConstraint("model_id", "revision"),)

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    model_id: Mapped[str] = mapped_column(String(255))
    revision: Mapped[str] = mapped_column(String(255))  # "" when unpinned
    architecture: Mapped[str | None] = mapped_column(String(128))
    model_type: Mapped[str | None] = mapped_column(String(64))
    dimensions: Mapped[dict[str, Any]] = mapped_column(JSON)  # hidden_size, num_hidden_layers, ...
    config: Mapped[dict[str, Any]] = mapped_column(JSON)  # config.json as read
    # Adaptable module name -> weight shape [out, in], from building the model on the meta
    # device; None when transformers is not installed or cannot build the architecture.
    structure: Mapped[dict[str, list[int]] | None] = mapped_column(JSON)
    created_at: Mapped[datetime] = mapped_column(UTCDateTime, default=utcnow)


class HubLink(Base):
    """A module's tie to a Hub repository: where it was pulled from, or pushed to."""

    __tablename__ = "hub_links"

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    module_id: Mapped[int] = mapped_column(ForeignKey("modules.id", ondelete="CASCADE"), index=True)
    direction: Mapped[str] = mapped_column(String(8))  # "pull" or "push"
    endpoint: Mapped[str] = mapped_column(String(255))
    repo_id: Mapped[str] = mapped_column(String(255), index=True)
    revision: Mapped[str] = mapped_column(String(255))  # the branch (or revision) asked for
    commit: Mapped[str] = mapped_column(String(64))  # the commit it resolved to
    weights_oid: Mapped[str] = mapped_column(String(64))  # git blob id of the weights file on the Hub
    created_at: Mapped[datetime] = mapped_column(UTCDateTime, default=utcnow)


class Alias(Base):
    """A movable label on one version of a name (``team/sentiment@prod``)."""

    __tablename__ = "aliases"
    __table_args__ = (UniqueConstraint("namespace", "name", "alias"),)

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    namespace: Mapped[str] = mapped_column(String(96))
    name: Mapped[str] = mapped_column(String(96))
    alias: Mapped[str] = mapped_column(String(64))
    module_id: Mapped[int] = mapped_column(ForeignKey("modules.id", ondelete="RESTRICT"), index=True)
    updated_at: Mapped[datetime] = mapped_column(UTCDateTime, default=utcnow)


class AliasEvent(Base):
    """Every move of an alias, kept forever: from which version to which, when, by whom."""

    __tablename__ = "alias_events"

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    namespace: Mapped[str] = mapped_column(String(96))
    name: Mapped[str] = mapped_column(String(96))
    alias: Mapped[str] = mapped_column(String(64))
    from_version: Mapped[int | None] = mapped_column(Integer)  # None: the alias was created
    to_version: Mapped[int | None] = mapped_column(Integer)  # None: the alias was removed
    at: Mapped[datetime] = mapped_column(UTCDateTime, default=utcnow)
    by: Mapped[str] = mapped_column(String(128))


class MetadataEvent(Base):
    """An edit of a version's metadata (tags, description): what changed, when, by whom.
    A version's tensors and provenance never change."""

    __tablename__ = "metadata_events"

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    module_id: Mapped[int] = mapped_column(ForeignKey("modules.id", ondelete="CASCADE"), index=True)
    field: Mapped[str] = mapped_column(String(64))  # "tag:KEY" or "description"
    old: Mapped[str | None] = mapped_column(Text)
    new: Mapped[str | None] = mapped_column(Text)
    at: Mapped[datetime] = mapped_column(UTCDateTime, default=utcnow)
    by: Mapped[str] = mapped_column(String(128))


class ApiToken(Base):
    """A token of the registry server (``pem token create``). Only the sha256 of the token is
    stored: the token itself is shown once, when it is created."""

    __tablename__ = "api_tokens"

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    token_sha256: Mapped[str] = mapped_column(String(64), unique=True)
    user: Mapped[str] = mapped_column(String(128))
    role: Mapped[str] = mapped_column(String(16))  # reader | writer | admin
    namespaces: Mapped[list[str]] = mapped_column(JSON)  # writer rights; empty: every namespace
    created_at: Mapped[datetime] = mapped_column(UTCDateTime, default=utcnow)
    expires_at: Mapped[datetime | None] = mapped_column(UTCDateTime)
    revoked_at: Mapped[datetime | None] = mapped_column(UTCDateTime)


class IdempotencyKey(Base):
    """The answer to a write sent with an ``Idempotency-Key``, so that a client retrying after
    a lost response gets the same answer instead of applying the write twice."""

    __tablename__ = "idempotency_keys"
    __table_args__ = (UniqueConstraint("user", "key"),)

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    user: Mapped[str] = mapped_column(String(128))
    key: Mapped[str] = mapped_column(String(128))
    request_sha256: Mapped[str] = mapped_column(String(64))  # route and body: a key reused for another request is refused
    status: Mapped[int] = mapped_column(Integer)
    response: Mapped[dict[str, Any]] = mapped_column(JSON)
    created_at: Mapped[datetime] = mapped_column(UTCDateTime, default=utcnow)


class WebSession(Base):
    """A signed-in browser of the web view: an opaque id in an HttpOnly cookie, stored only as
    its sha256, so that every replica knows it and logout ends it everywhere. It acts as the
    token it was opened with: revoking or expiring the token ends the session too."""

    __tablename__ = "web_sessions"

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    session_sha256: Mapped[str] = mapped_column(String(64), unique=True)
    token_id: Mapped[int] = mapped_column(ForeignKey("api_tokens.id", ondelete="CASCADE"), index=True)
    created_at: Mapped[datetime] = mapped_column(UTCDateTime, default=utcnow)
    expires_at: Mapped[datetime] = mapped_column(UTCDateTime)
