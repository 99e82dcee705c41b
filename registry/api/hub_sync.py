"""Hugging Face Hub sync: pull, push, sync."""

from __future__ import annotations

import hashlib
import json
import tempfile
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Iterator

from sqlalchemy import func, select
from sqlalchemy.orm import Session

from registry import faults, lazy_module
from registry.api.common import (
    WEIGHTS_FILE,
    check_lengths,
    file_sha256,
    module_info,
    parse_tags,
)
from registry.db.models import (
    Derivation,
    DerivationInput,
    HubLink,
    Module,
)
from registry.errors import (
    HubError,
    InvalidAdapterError,
    InvalidNameError,
    ModuleRemovedError,
    NotFoundError,
)
from registry.refs import (
    parse_module_name,
)
from registry.schemas import (
    HubLinkInfo,
    ModuleInfo,
    ProvenanceSidecar,
    PushBundle,
    PushResult,
    SyncStatus,
)
from registry.store.checked import copy_blob


hub = lazy_module("registry.hub")  # loaded on first use: only pull, push and sync need it

class HubSync:
    """Part of :class:`registry.Registry` (see registry/api/__init__.py)."""


    def pull(
        self,
        repo: str,
        *,
        name: str | None = None,
        task: str | None = None,
        tags: dict[str, str] | None = None,
        endpoint: str | None = None,
    ) -> ModuleInfo:
        """Register the adapter at ``REPO_ID[@REVISION]`` on the Hub (kind ``pulled``), pinned
        to the commit the revision resolves to. Pulling a commit already pulled returns its
        module (``created`` False); a new commit becomes a new version. Provenance in a
        ``pem-provenance.json`` sidecar is imported."""
        repo_id, revision = hub.parse_repo_reference(repo)
        module_name = parse_module_name(name or hub.default_name(repo_id))
        tag_pairs = parse_tags(tags)
        check_lengths(task=task)
        self._check_new_name_early(module_name)
        endpoint = (endpoint or self.settings.hub_endpoint).rstrip("/")
        commit, names = hub.resolve(repo_id, revision, endpoint)
        known = self.pulled_module(str(module_name), repo_id, commit)
        if known is not None:
            return known
        with tempfile.TemporaryDirectory(prefix="pem-pull-") as tmp:
            files = hub.download(repo_id, commit, names, endpoint, Path(tmp))
            faults.point("pull-downloaded")
            return self.register_pulled(Path(tmp), str(module_name), endpoint=endpoint, repo_id=repo_id,
                                        revision=revision, commit=commit, card=files.card, sidecar=files.sidecar,
                                        task=task, tags=tags)

    def pulled_module(self, name: str, repo_id: str, commit: str) -> ModuleInfo | None:
        """The version of ``name`` pulled from ``repo_id`` at ``commit``, if there is one."""
        module_name = parse_module_name(name)
        with self._session() as session:
            known = session.scalars(
                select(Module).join(HubLink, HubLink.module_id == Module.id).where(
                    HubLink.direction == "pull", HubLink.repo_id == repo_id, HubLink.commit == commit,
                    Module.namespace == module_name.namespace, Module.name == module_name.name,
                )
            ).first()
            return module_info(known, created=False) if known is not None else None

    def register_pulled(
        self,
        folder: Path,
        name: str,
        *,
        endpoint: str,
        repo_id: str,
        revision: str | None,
        commit: str,
        card: dict[str, Any],
        sidecar: ProvenanceSidecar | None,
        task: str | None = None,
        tags: dict[str, str] | None = None,
    ) -> ModuleInfo:
        """Register an adapter folder downloaded from the Hub at ``commit`` (by :meth:`pull`, or
        by a registry server's client, which downloads with its own Hub token and uploads the
        folder), with the link to the repo and commit."""
        module_name = parse_module_name(name)
        tag_pairs = parse_tags(tags)
        check_lengths(task=task)
        known = self.pulled_module(name, repo_id, commit)
        if known is not None:
            return known
        self._check_new_name_early(module_name)
        with named_on_the_hub(folder, f"{repo_id}@{commit[:12]}"):
            config, metadata, digest, size = self._ingest(folder)
        weights_oid = hub.git_blob_oid(folder / WEIGHTS_FILE)
        weights_sha256 = file_sha256(folder / WEIGHTS_FILE)
        link = HubLink(direction="pull", endpoint=endpoint, repo_id=repo_id, revision=revision or "main",
                       commit=commit, weights_oid=weights_oid)
        sidecar = sidecar if sidecar and sidecar.module.digest == digest else None

        def attach(session: Session, module: Module) -> None:
            link.module_id = module.id
            session.add(link)
            if sidecar is not None and sidecar.derivation is not None:
                session.add(imported_derivation(session, module, sidecar, repo_id, commit))

        source = {"hub": {"endpoint": endpoint, "repo_id": repo_id, "revision": revision or "main", "commit": commit,
                          "file_sha256": weights_sha256}, "card": card}
        info = self._register(
            module_name, kind="pulled", digest=digest, size_bytes=size, config=config, metadata=metadata,
            task=task, tags=tag_pairs, description=None, source=source, attach=attach,
        )
        if not info.created:  # same content as a version we have: remember this commit too
            with self._write_session() as session:
                try:
                    link.module_id = self._resolve(session, info.ref, lock=True).id
                except NotFoundError:
                    raise ModuleRemovedError(f"{info.ref} was removed while pulling; nothing was recorded") from None
                session.add(link)
        return info

    def push(
        self,
        ref: str,
        repo: str,
        *,
        private: bool = False,
        branch: str | None = None,
        message: str | None = None,
        endpoint: str | None = None,
    ) -> PushResult:
        """Publish a module to the Hub: config, weights, a model card and the provenance
        sidecar. Creates the repo if needed; unchanged content makes no new commit."""
        repo_id, revision = hub.parse_repo_reference(repo)
        if revision:
            raise InvalidNameError(f"push takes a repo id without @revision: use --branch {revision}")
        endpoint = (endpoint or self.settings.hub_endpoint).rstrip("/")
        bundle = self.push_bundle(ref)
        with tempfile.TemporaryDirectory(prefix="pem-push-") as tmp:
            hub.stage_push(Path(tmp), bundle.config, None, bundle.card, bundle.sidecar)
            with open(Path(tmp) / WEIGHTS_FILE, "wb") as staged:  # nothing is uploaded unless it checks
                copy_blob(self.store, bundle.ref, bundle.digest, self.store.size(bundle.digest), staged)
            commit, changed = hub.upload(endpoint, repo_id, Path(tmp), private=private, branch=branch,
                                         message=message or f"pem-registry: push {bundle.ref}")
            weights_oid = hub.git_blob_oid(Path(tmp) / WEIGHTS_FILE)  # what was uploaded, even if rm took the blob
        return self.record_push(bundle.ref, digest=bundle.digest, endpoint=endpoint, repo_id=repo_id, branch=branch,
                                commit=commit, weights_oid=weights_oid, changed=changed)

    def push_bundle(self, ref: str) -> PushBundle:
        """What a push uploads besides the weights: config, model card and provenance sidecar."""
        with self._session() as session:
            module = self._resolve(session, ref)
            input_ids = [i.input_id for i in module.derivation.inputs if i.input_id] if module.derivation else []
            links = {
                link.module_id: {"repo_id": link.repo_id, "commit": link.commit}
                for link in session.scalars(select(HubLink).where(HubLink.module_id.in_(input_ids)).order_by(HubLink.id))
            }
            sidecar = hub.sidecar_for(module, links)
            return PushBundle(ref=module.ref, digest=module.digest, config=module.config,
                              card=hub.model_card(module, sidecar), sidecar=sidecar)

    def record_push(self, ref: str, *, digest: str, endpoint: str, repo_id: str, branch: str | None, commit: str,
                    weights_oid: str, changed: bool = True) -> PushResult:
        """Record that ``ref`` (whose tensors are ``digest``) was pushed to ``repo_id`` at
        ``commit`` (sync compares against it); pushing unchanged content again records nothing new."""
        with self._write_session() as session:
            try:
                module = self._resolve(session, ref, lock=True)
            except NotFoundError:
                module = None
            if module is None or module.digest != digest:
                raise ModuleRemovedError(
                    f"{ref} was removed while pushing: {repo_id}@{commit[:12]} holds it, but the push was not recorded"
                )
            link = dict(module_id=module.id, direction="push", endpoint=endpoint, repo_id=repo_id,
                        revision=branch or "main", commit=commit)
            # Pushing unchanged content again records nothing new.
            if session.scalar(select(HubLink.id).filter_by(**link).limit(1)) is None:
                session.add(HubLink(**link, weights_oid=weights_oid))
            module_ref = module.ref
        return PushResult(ref=module_ref, repo_id=repo_id, branch=branch or "main", commit=commit,
                          url=f"{endpoint}/{repo_id}", changed=changed)

    def sync(self, *, pull: bool = False, endpoint: str | None = None) -> list[SyncStatus]:
        """For each pulled module, whether its repo moved on since the pinned commit; for each
        pushed one, whether the remote still holds what was pushed. ``pull`` pulls new
        commits as new versions."""
        return [sync_link(self, link, pull, endpoint or link.endpoint) for link in self.hub_links()]

    def hub_links(self) -> list[HubLinkInfo]:
        """The newest link of each (name, direction, repo, branch): once a new commit was
        pulled as @2, @1 is history, not a module that is behind."""
        with self._session() as session:
            latest = (
                select(func.max(HubLink.id))
                .join(Module, Module.id == HubLink.module_id)
                .group_by(Module.namespace, Module.name, HubLink.direction, HubLink.repo_id, HubLink.revision)
            )
            return [
                HubLinkInfo(ref=module.ref, name=module.full_name, direction=link.direction, endpoint=link.endpoint,
                            repo_id=link.repo_id, revision=link.revision, commit=link.commit,
                            weights_oid=link.weights_oid)
                for link, module in session.execute(
                    select(HubLink, Module).join(Module, Module.id == HubLink.module_id)
                    .where(HubLink.id.in_(latest)).order_by(HubLink.id)
                )
            ]


def sync_link(registry: Any, link: HubLinkInfo, pull: bool, endpoint: str) -> SyncStatus:
    """How one Hub link compares with the remote now (``registry.pull`` new commits with
    ``pull``). Shared by a local registry and a registry server's client, which asks the Hub
    itself, with its own token."""
    base = dict(ref=link.ref, direction=link.direction, repo_id=link.repo_id, revision=link.revision, commit=link.commit)
    try:
        head = hub.remote_head(endpoint, link.repo_id, link.revision)
        if link.direction == "pull":
            if head == link.commit:
                return SyncStatus(**base, remote_commit=head, status="up-to-date", detail="pinned commit is the head")
            pulled = None
            if pull:
                info = registry.pull(f"{link.repo_id}@{link.revision}", name=link.name, endpoint=endpoint)
                pulled = info.ref if info.created else None
            return SyncStatus(**base, remote_commit=head, status="behind", pulled=pulled,
                              detail=f"{link.revision} moved to {head[:12]}")
        oid = hub.remote_weights_oid(endpoint, link.repo_id, link.revision)
    except HubError as exc:
        return SyncStatus(**base, remote_commit=None, status="error", detail=str(exc))
    if oid is None:
        return SyncStatus(**base, remote_commit=head, status="missing", detail="the weights are gone from the remote")
    if oid != link.weights_oid:
        return SyncStatus(**base, remote_commit=head, status="changed", detail="the remote weights differ from what was pushed")
    return SyncStatus(**base, remote_commit=head, status="in-sync", detail="the remote holds what was pushed")


@contextmanager
def named_on_the_hub(folder: Path, where: str) -> Iterator[None]:
    """Errors about the downloaded files name them as ``REPO@COMMIT:FILE``, where the user can
    find them, instead of by the temporary folder they were checked in."""
    try:
        yield
    except InvalidAdapterError as exc:
        message = str(exc).replace(f"{folder}/", f"{where}:").replace(str(folder), where)
        raise type(exc)(message) from None


def imported_derivation(
    session: Session, module: Module, sidecar: ProvenanceSidecar, repo_id: str, commit: str
) -> Derivation:
    """The derivation a pulled sidecar describes; inputs registered here (by digest) are
    linked, the others are external nodes with the repo and commit they were published at."""
    assert sidecar.derivation is not None
    d = sidecar.derivation
    digests = [i.digest for i in d.inputs]
    local = {}
    for row in session.execute(
        select(Module.digest, func.min(Module.id))
        .where(Module.digest.in_(digests), Module.id != module.id)  # a port shares its input's digest
        .group_by(Module.digest)
    ):
        local[row[0]] = row[1]
    inputs = [
        DerivationInput(
            position=n, input_id=local.get(i.digest), input_digest=i.digest, a=i.a, b=i.b,
            external={"ref": i.ref, **(i.hub or {})},
        )
        for n, i in enumerate(d.inputs)
    ]
    identity = hashlib.sha256(json.dumps(["imported", repo_id, commit, module.digest]).encode()).hexdigest()
    environment = {**d.environment, "imported_from": f"{repo_id}@{commit}"}
    return Derivation(
        module_id=module.id, expression=d.expression, canonical=d.canonical, method=d.method,
        method_version=d.method_version, parameters=d.parameters, results=d.results, environment=environment,
        identity=identity, inputs=inputs,
    )
