"""Typed results of the Python API; their JSON is what ``--json`` prints (one stable schema).

Version 1 of the schema. Fields are only ever added; a removal or change of meaning bumps
``SCHEMA_VERSION`` and is announced in the README.
"""

from __future__ import annotations

from datetime import datetime
from typing import Any, Literal

from pydantic import BaseModel as PydanticModel
from pydantic import ConfigDict, Field, model_validator


class BaseModel(PydanticModel):
    """Every result: its validator and serializer are built on first use, not on import
    (building all of them took most of this module's import time, paid by every command)."""

    model_config = ConfigDict(defer_build=True)


SCHEMA_VERSION = 1

Kind = Literal["trained", "derived", "ported", "pulled"]
NodeKind = Literal["trained", "derived", "ported", "pulled", "external"]


class ProvenanceInput(BaseModel):
    """One input of a derivation, with its coefficients (SEMANTICS.md section 2)."""

    ref: str = Field(description="NS/NAME@VERSION of the input")
    digest: str
    a: float = Field(description="unsigned coefficient")
    b: float = Field(description="signed coefficient")


class Provenance(BaseModel):
    expression: str = Field(description="as written")
    canonical: str = Field(description="normalized, references resolved to versions")
    method: str
    method_version: int
    parameters: dict[str, Any]
    results: dict[str, Any]
    environment: dict[str, Any]
    inputs: list[ProvenanceInput]
    created_at: datetime


class ModuleInfo(BaseModel):
    """One registered module version, as ``pem list --json`` prints it."""

    model_config = ConfigDict(frozen=True)

    name: str = Field(description="NS/NAME")
    version: int
    ref: str = Field(description="NS/NAME@VERSION")
    digest: str = Field(description="sha256 of the canonical tensors")
    kind: Kind
    peft_type: str
    composable: bool
    base_model: str
    base_revision: str | None
    task: str | None
    task_type: str | None
    rank: int | None
    lora_alpha: float | None
    use_rslora: bool
    use_dora: bool
    target_modules: list[str]
    dtype: str
    num_parameters: int
    size_bytes: int
    tags: dict[str, str]
    aliases: list[str] = Field(default_factory=list, description="aliases pointing at this version")
    owner: str
    description: str | None
    created_at: datetime
    # Set by add/compose: False when the call found the module already registered.
    created: bool = Field(default=True, exclude=True)


class ModuleDetails(ModuleInfo):
    """``pem show --json``: everything in :class:`ModuleInfo` plus layers, config and provenance."""

    unsupported: list[str] = Field(description="features that make it not composable")
    layers: dict[str, dict[str, Any]]
    config: dict[str, Any] = Field(description="adapter_config.json as exported")
    source: dict[str, Any] | None
    provenance: Provenance | None


class TermInfo(BaseModel):
    """One distinct input of an expression, flattened (SEMANTICS.md section 2)."""

    ref: str
    digest: str
    peft_type: str
    a: float = Field(description="unsigned coefficient")
    b: float = Field(description="signed coefficient")


class OutputSummary(BaseModel):
    peft_type: str
    dtype: str
    rank: int | None = Field(description="largest layer rank (LoRA)")
    layers: int
    num_parameters: int
    size_bytes: int
    estimated_seconds: float | None = Field(None, description="rough time to compute it, whole process")
    estimated_peak_bytes: int | None = Field(None, description="rough peak resident memory computing it")


class Deviation(BaseModel):
    """Relative Frobenius error of the method's dW against the plain weighted sum of effects."""

    overall: float
    per_layer: dict[str, float]


class CheckReport(BaseModel):
    """``pem check --json``: what a composition would do, or every reason it cannot."""

    expression: str
    canonical: str
    method: str
    parameters: dict[str, Any]
    composable: bool
    violations: list[str]
    terms: list[TermInfo]
    output: OutputSummary | None
    notes: list[str]
    deviation: Deviation | None = None


# --- provenance queries -----------------------------------------------------------------------


class LineageNode(BaseModel):
    """A module in a lineage; ``external`` nodes are inputs known only from imported provenance."""

    ref: str
    digest: str
    kind: NodeKind
    peft_type: str
    method: str | None = Field(description="how it was made, for derived and ported modules")
    expression: str | None = Field(description="canonical expression, for derived modules")


class LineageEdge(BaseModel):
    """``output`` was made from ``input`` with coefficients ``a``, ``b``."""

    output: str
    input: str
    method: str
    a: float
    b: float


class Lineage(BaseModel):
    """``pem lineage --json``: the ancestor graph of ``root``; each module appears once."""

    root: str
    nodes: list[LineageNode]
    edges: list[LineageEdge]


class Descendant(BaseModel):
    ref: str
    kind: Kind
    depth: int
    path: list[str] = Field(description="refs from the queried module to this one (a shortest path)")
    published: list[str] = Field(default_factory=list, description="where it was pushed: REPO@BRANCH:COMMIT")


class ContentTerm(BaseModel):
    """The effective weight of a module inside another, through every linear path."""

    ref: str
    digest: str
    kind: NodeKind
    a: float
    b: float
    opaque: bool = Field(description="derived by a non-linear method (svd, ties, dare, magnitude_prune): its own contents are nested")
    contents: list["ContentTerm"] | None = None


class Contents(BaseModel):
    """``pem contents --json``."""

    root: str
    root_linear: bool = Field(description="False when root was made by a non-linear method (svd, ties, ...): "
                              "its terms are what it approximates")
    terms: list[ContentTerm]


class VerifyFailure(BaseModel):
    ref: str
    problem: str


class VerifyReport(BaseModel):
    """``pem verify --json``. ``ok`` is False when any module failed."""

    checked: int
    rederived: int
    ok: bool
    failures: list[VerifyFailure]
    notes: list[str]


# --- base models and porting ------------------------------------------------------------------


class BaseModelInfo(BaseModel):
    """``pem base show --json``: a host model the registry knows."""

    model_id: str
    revision: str | None
    architecture: str | None
    model_type: str | None
    dimensions: dict[str, Any]
    structure_known: bool = Field(description="adaptable modules known (built on the meta device)")
    structure_unknown_reason: str | None = Field(
        default=None, description="why the structure is unknown, and the fix (set by `pem base add`)")
    adaptable_modules: int
    adapters: int = Field(description="registered modules whose base model is this one")
    created_at: datetime


class PortReport(BaseModel):
    """Whether a module can be attached to a host, with the evidence."""

    module: str
    from_base: str
    to_base: str
    level: Literal["same-base", "compatible", "incompatible", "unknown"]
    evidence: list[str]
    missing: list[str] = Field(default_factory=list, description="adapted layers the host does not have")
    mismatched: list[str] = Field(default_factory=list, description="adapted layers whose shapes differ in the host")


# --- the Hub ----------------------------------------------------------------------------------

SIDECAR_SCHEMA = "pem-registry/provenance"
SIDECAR_VERSION = 1
SIDECAR_FILENAME = "pem-provenance.json"


class SidecarInput(BaseModel):
    ref: str = Field(description="NS/NAME@VERSION in the registry that made the module")
    digest: str = Field(pattern=r"^[0-9a-f]{64}$")
    a: float
    b: float
    hub: dict[str, str] | None = Field(default=None, description="repo_id and commit, when published")


class SidecarDerivation(BaseModel):
    expression: str
    canonical: str
    method: str
    method_version: int
    parameters: dict[str, Any]
    results: dict[str, Any]
    environment: dict[str, Any]
    inputs: list[SidecarInput]


class SidecarModule(BaseModel):
    name: str
    version: int
    digest: str = Field(pattern=r"^[0-9a-f]{64}$")
    kind: Kind
    peft_type: str
    base_model: str
    base_revision: str | None


class ProvenanceSidecar(BaseModel):
    """``pem-provenance.json``, pushed beside the weights: the machine-readable provenance."""

    model_config = ConfigDict(extra="forbid")

    schema_: Literal["pem-registry/provenance"] = Field(alias="schema")
    schema_version: Literal[1]
    generator: str
    module: SidecarModule
    derivation: SidecarDerivation | None


class SyncStatus(BaseModel):
    """``pem sync --json``: one Hub link and how it compares with the remote now."""

    ref: str
    direction: Literal["pull", "push"]
    repo_id: str
    revision: str
    commit: str = Field(description="the commit pulled from, or pushed")
    remote_commit: str | None = Field(description="the branch head now (None when unreachable)")
    status: Literal["up-to-date", "behind", "in-sync", "changed", "missing", "error"]
    detail: str
    pulled: str | None = Field(default=None, description="with --pull: the new version registered")


class PushResult(BaseModel):
    """``pem push --json``."""

    ref: str
    repo_id: str
    branch: str
    commit: str
    url: str
    changed: bool = Field(True, description="False when the branch already held this content: no commit was made")


class Removal(BaseModel):
    """``pem rm --json``: a removed version, or with ``dry_run`` the one that would be."""

    ref: str
    digest: str
    dry_run: bool
    tags: dict[str, str] = Field(description="removed with it, as is its metadata history")
    provenance: bool = Field(description="it was derived: its derivation record is removed with it")
    hub_links: int = Field(description="records of its pushes and pulls, removed with it")
    blob_freed: bool = Field(description="its blob is deleted: no other module uses it")
    bytes_freed: int
    blob_kept_for: list[str] = Field(description="other modules holding the same blob (then kept)")


class HubLinkInfo(BaseModel):
    """A module's newest link to a Hub repo (what ``pem sync`` compares with the remote)."""

    ref: str
    name: str
    direction: Literal["pull", "push"]
    endpoint: str
    repo_id: str
    revision: str
    commit: str
    weights_oid: str | None


class PushBundle(BaseModel):
    """What a push uploads besides the weights (a registry server hands it to its client, which
    pushes with its own Hub token)."""

    ref: str
    digest: str
    config: dict[str, Any]
    card: str = Field(description="README.md")
    sidecar: ProvenanceSidecar


class GcReport(BaseModel):
    """``pem gc --json``."""

    dry_run: bool
    blobs: list[str] = Field(description="digests of unreferenced blobs (deleted unless dry_run)")
    temporary_files: list[str] = Field(description="partial writes of crashed writers")
    bytes_freed: int = Field(description="bytes deleted (with dry_run: that would be deleted)")
    kept_temporary_files: int = Field(default=0, description="partial writes younger than the grace period, kept")
    kept_temporary_bytes: int = Field(default=0, description="their size in bytes")


class AliasInfo(BaseModel):
    alias: str = Field(description="NS/NAME@ALIAS")
    ref: str = Field(description="the version it points at")
    version: int


class AliasMove(BaseModel):
    """One move of an alias: from_version None when created, to_version None when removed."""

    alias: str
    from_version: int | None
    to_version: int | None
    at: datetime
    by: str


class MetadataChange(BaseModel):
    field: str = Field(description="tag:KEY or description")
    old: str | None
    new: str | None
    at: datetime
    by: str


class HealthCheck(BaseModel):
    """One line of ``pem doctor``. ``status`` ``fail`` makes doctor exit 1; ``warn`` is a
    problem for some commands only (an unreachable Hub: pull, push, sync), and does not."""

    name: str
    ok: bool = Field(description="the check passed (status ok)")
    detail: str
    fix: str | None
    status: Literal["ok", "warn", "fail"] = Field(description="ok, warn, or fail (fail: doctor exits 1)")

    @model_validator(mode="before")
    @classmethod
    def _status_from_ok(cls, data: Any) -> Any:
        """A check built with ``ok`` alone fails when not ok."""
        if isinstance(data, dict) and data.get("status") is None:
            data = {**data, "status": "ok" if data.get("ok") else "fail"}
        return data
