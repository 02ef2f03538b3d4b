"""The artifact store: the one place that knows the artifact files, where each lives, which stage
makes it, how it is read back with its checks, and how a trained head is rebuilt from it.

Layout (docs/architecture.md §4): every artifact has a directory named by the stage's label and a
digest of the settings it was made with (:mod:`cause_lightning.config.identity`), inside the
directory of the artifact it was made from::

    <artifact_dir>/<data>/<backbone>/
      clusterbook-1a2b3c4d/                 clusterbook.pt, artifact.json
        tr-5e6f7a8b/                        head.pt (the head's YAML name labels it)
          probe-9c0d1e2f/                   probe.pt
            eval-3a4b5c6d/                  metrics.json, segmenter.pt

``artifact_tag`` adds a label (``tr-noema-5e6f7a8b``); inputs are found by their settings whatever
their label, so a tagged ablation of one stage reuses the untagged artifacts it starts from. Each
directory holds ``artifact.json``: the kind, the settings, the label, the content ids of its inputs
and its own, and when it was written; :meth:`ArtifactStore.entries` lists them. Smoke runs (fast
dev runs, batch-limited loops) write under ``<artifact_dir>/debug/...`` and read real artifacts
without ever writing there.

An artifact of the reference release (``stage=import``) carries the files it came from as its
settings; it is found by its label (``artifact_tag=release``) instead.
"""

from __future__ import annotations

import json
import os
import re
import time
from collections.abc import Collection, Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from torch import Tensor, nn

from cause_lightning.artifacts.bundle import check_backbone, rebuild_backbone
from cause_lightning.artifacts.io import (
    ArtifactError,
    MissingArtifactError,
    load_artifact,
    payload_checksum,
    save_artifact,
)
from cause_lightning.config.identity import digest
from cause_lightning.core.files import write_json_atomic
from cause_lightning.core.specs import ModelSpec, SpecError
from cause_lightning.models.contract import build_head
from cause_lightning.models.heads import LinearProbe

__all__ = [
    "KINDS",
    "SIDECAR",
    "ArtifactStore",
    "Entry",
    "Kind",
    "content_id",
    "difference_text",
    "normalised",
]

#: The file in every artifact directory that says what it holds and how it was made.
SIDECAR = "artifact.json"


@dataclass(frozen=True)
class Kind:
    """One kind of artifact.

    Attributes:
        name: ``clusterbook``, ``head``, ``probe`` or ``eval``.
        stage: The stage that makes it.
        file: Its main file (``None`` for the evaluation, whose files the report writes).
        parent: The kind it is made from.
    """

    name: str
    stage: str
    file: str | None
    parent: str | None


KINDS: dict[str, Kind] = {
    "clusterbook": Kind("clusterbook", "mediator", "clusterbook.pt", None),
    "head": Kind("head", "head", "head.pt", "clusterbook"),
    "probe": Kind("probe", "probe", "probe.pt", "head"),
    "eval": Kind("eval", "eval", None, "probe"),
}
#: The evaluation's files.
METRICS_FILE, SEGMENTER_FILE = "metrics.json", "segmenter.pt"
_DIGEST = re.compile(r"^[0-9a-f]{8}$")


def content_id(record: Mapping[str, Any]) -> str:
    """The identity of an artifact's content: its tensors and model spec, not its provenance
    (config, git hash, time), so re-exporting the same weights gives the same id."""
    meta = record.get("meta") or {}
    kept = {k: v for k, v in record.items() if k not in ("meta", "checksum", "content_id")}
    return payload_checksum({**kept, "spec": meta.get("spec"), "settings": meta.get("settings")})


@dataclass(frozen=True)
class Entry:
    """One artifact directory, as its ``artifact.json`` describes it."""

    kind: str
    path: Path
    settings: dict[str, Any]
    label: str
    tag: str = ""
    inputs: dict[str, str] = field(default_factory=dict)
    content: str = ""
    written: str = ""
    imported: bool = False

    @property
    def file(self) -> Path | None:
        """The artifact's main file."""
        name = KINDS[self.kind].file
        return None if name is None else self.path / name


def normalised(settings: Mapping[str, Any]) -> dict[str, Any]:
    """Settings as they read back from JSON (tuples become lists, keys strings)."""
    return json.loads(json.dumps(dict(settings), sort_keys=True, default=str))


def _differing(stored: Mapping[str, Any], wanted: Mapping[str, Any]) -> list[str]:
    """The keys whose values differ, a stage module's argument left out where it only repeats a
    setting that differs alike (``method.head.module.temperature`` beside
    ``method.head.temperature``, ``...module.seed`` beside ``seed``)."""
    keys = sorted(k for k in stored.keys() | wanted.keys() if stored.get(k) != wanted.get(k))

    def alike(key: str) -> tuple[str, str, str]:
        return key.rsplit(".", 1)[-1], repr(stored.get(key)), repr(wanted.get(key))

    settings = {alike(k) for k in keys if ".module." not in k}
    return [k for k in keys if ".module." not in k or alike(k) not in settings]


def difference_text(stored: Mapping[str, Any], wanted: Mapping[str, Any], limit: int = 6) -> str:
    """``key: <stored> there, <wanted> now`` for each setting that differs (at most ``limit``)."""
    unset = "<unset>"
    keys = _differing(stored, wanted)
    shown = "; ".join(
        f"{k}: {stored.get(k, unset)!r} there, {wanted.get(k, unset)!r} now" for k in keys[:limit]
    )
    return shown + (f" (and {len(keys) - limit} more)" if len(keys) > limit else "")


class ArtifactStore:
    """Finds, writes and reads the artifacts of one dataset and backbone.

    Args:
        root: Where this run writes (``<artifact_dir>/<data>/<backbone>``, or its ``debug`` twin
            for smoke runs).
        fallback: A root read after ``root`` and never written (the real artifacts of a smoke
            run).
    """

    def __init__(self, root: str | Path, fallback: str | Path | None = None) -> None:
        self.root = Path(root)
        self.fallback = None if fallback is None else Path(fallback)

    # ------------------------------------------------------------------ places
    def _roots(self) -> list[Path]:
        return [self.root] + ([self.fallback] if self.fallback is not None else [])

    def _read_only(self, entry: Entry) -> bool:
        return self.fallback is not None and self.fallback in entry.path.parents

    def relative(self, path: Path) -> Path:
        """``path`` relative to the root that holds it."""
        for root in self._roots():
            if path == root or root in path.parents:
                return path.relative_to(root)
        raise ValueError(f"{path} is not inside {self.root}")

    def directory(
        self, kind: str, parent: Entry | None, settings: Mapping[str, Any], label: str, tag: str
    ) -> Path:
        """Where this run writes an artifact of ``kind`` made from ``parent`` with ``settings``.

        Always under :attr:`root`; a parent found among the fallback's artifacts is mirrored.
        """
        base = self.root if parent is None else self.root / self.relative(parent.path)
        name = "-".join(part for part in (_safe(label), _safe(tag), digest(settings)) if part)
        return base / name

    def _children(self, kind: str, parent: Entry | None) -> Iterator[Entry]:
        relative = Path() if parent is None else self.relative(parent.path)
        for root in self._roots():
            folder = root / relative
            if not folder.is_dir():
                continue
            for child in sorted(folder.iterdir()):
                entry = self.entry(child)
                if entry is not None and entry.kind == kind:
                    yield entry

    # ------------------------------------------------------------------ lookup
    def entry(self, directory: Path) -> Entry | None:
        """The artifact a directory holds, or ``None`` when it holds none (yet)."""
        sidecar = directory / SIDECAR
        if not sidecar.is_file():
            return None
        try:
            data = json.loads(sidecar.read_text())
            return Entry(**{**data, "path": directory})
        except (ValueError, TypeError) as err:
            raise ArtifactError(f"{sidecar} is unreadable ({err}): remove {directory}") from None

    def find(
        self,
        kind: str,
        parent: Entry | None,
        settings: Mapping[str, Any],
        tag: str = "",
        ignore: Collection[str] = (),
        unique: bool = False,
    ) -> Entry | None:
        """The artifact of ``kind`` made from ``parent`` with ``settings``, if one exists.

        A labelled import of the reference release (``stage=import``) stands in for any settings
        when the run carries its label, unless an artifact with that label was made with these
        very settings (a probe refitted on the imported head). Among several matches, one with the
        run's label comes first, then an unlabelled one, then one of the fallback (a full run
        rather than another smoke run's), then the newest.

        Args:
            kind: ``clusterbook``, ``head``, ``probe`` or ``eval``.
            parent: The artifact it was made from (``None`` for a clusterbook).
            settings: The settings it must have been made with.
            tag: The run's ``artifact_tag``.
            ignore: Settings compared neither way (a smoke run's loop limits, when it looks for
                its inputs).
            unique: Only an artifact that is the one match counts (``None`` among several).
        """
        children = list(self._children(kind, parent))

        def kept(values: Mapping[str, Any]) -> dict[str, Any]:
            return {k: v for k, v in values.items() if k not in ignore}

        stored_form = normalised(settings)
        wanted = kept(stored_form)
        matches = [e for e in children if not e.imported and kept(e.settings) == wanted]
        imported = [e for e in children if e.imported and tag and e.tag == tag]
        if imported and not any(e.tag == tag for e in matches):
            # The release stands in, unless this run's settings made one with its label (a probe
            # refitted on the imported head).
            return _fitting(imported[0], stored_form)
        if not matches or (unique and len(matches) > 1):
            return None
        return max(
            matches, key=lambda e: (e.tag == tag, e.tag == "", self._read_only(e), e.written)
        )

    def newest(self, kind: str, parent: Entry | None) -> Entry | None:
        """The most recently written artifact of ``kind`` made from ``parent``, whatever its
        settings (``None`` when there is none)."""
        children = list(self._children(kind, parent))
        return max(children, key=lambda e: e.written) if children else None

    def require(
        self, kind: str, parent: Entry | None, settings: Mapping[str, Any], tag: str = ""
    ) -> Entry:
        """Like :meth:`find`, but a missing artifact is an error naming the stage to run first
        and how the closest existing one differs.

        Raises:
            MissingArtifactError: No artifact of ``kind`` was made with these settings.
        """
        found = self.find(kind, parent, settings, tag)
        if found is not None:
            return found
        stage = KINDS[kind].stage
        where = self.root if parent is None else parent.path
        text = (
            f"no {kind} made with this run's settings in {where}: run "
            f"`python -m cause_lightning stage={stage}` first with the same settings"
        )
        siblings = [e for e in self._children(kind, parent)]
        wanted = normalised(settings)
        trained = [e for e in siblings if not e.imported]
        if trained:
            closest = min(trained, key=lambda e: len(_differing(e.settings, wanted)))
            text += f". The closest one, {closest.path}, differs: "
            text += difference_text(closest.settings, wanted)
        labels = sorted({e.tag for e in siblings if e.imported})
        if labels:
            text += f". Imported releases there: artifact_tag={' or '.join(labels)}"
        legacy = where / (KINDS[kind].file or "")
        if legacy.is_file() and self.entry(where) is None:
            text += (
                f". {legacy} is of the earlier layout (one directory per dataset and backbone); "
                "its segmenter.pt still loads with predict.segmenter=<file>, or train again"
            )
        raise MissingArtifactError(text)

    def entries(self) -> list[Entry]:
        """Every artifact under the roots, parents before their children."""
        found: list[Entry] = []
        for root in self._roots():
            if root.is_dir():
                for sidecar in sorted(root.rglob(SIDECAR)):
                    entry = self.entry(sidecar.parent)
                    if entry is not None:
                        found.append(entry)
        return found

    # ------------------------------------------------------------------ writing
    def claim(self, directory: Path, settings: Mapping[str, Any]) -> dict[str, Any]:
        """Check, before any work, that an artifact made with ``settings`` may be written to
        ``directory``: it is inside the writable root, and holds nothing of other settings.

        Returns:
            The settings as they are stored.

        Raises:
            ArtifactError: Naming the settings that differ; the directory is never replaced.
        """
        if directory != self.root and self.root not in directory.parents:
            raise ArtifactError(f"{directory} is outside the writable artifact root {self.root}")
        wanted = normalised(settings)
        existing = self.entry(directory)
        if existing is not None and existing.settings != wanted:
            raise ArtifactError(
                f"{directory} holds a {existing.kind} made with other settings "
                f"({difference_text(existing.settings, wanted)}); it is never replaced: remove it "
                "or change artifact_tag"
            )
        return wanted

    def save(
        self,
        kind: str,
        directory: Path,
        payload: Mapping[str, Any] | None,
        *,
        settings: Mapping[str, Any],
        inputs: Mapping[str, str],
        label: str,
        tag: str = "",
        imported: bool = False,
    ) -> Entry:
        """Write an artifact and its ``artifact.json`` (atomically, the sidecar last).

        Args:
            kind: The artifact's kind.
            directory: Its directory (from :meth:`directory`).
            payload: The ``.pt`` content (tensors and plain values, ``meta`` included); ``None``
                for the evaluation, whose files are written by the report before this call.
            settings: The settings it was made with.
            inputs: Content ids of the artifacts it was made from, by kind.
            label: Its label (the stage's, or the head's name).
            tag: ``artifact_tag``.
            imported: Whether it comes from the reference release.

        Returns:
            The written entry.

        Raises:
            ArtifactError: The directory holds an artifact of other settings (it is never
                replaced), or ``directory`` is outside this store's writable root.
        """
        wanted = self.claim(directory, settings)
        content = ""
        name = KINDS[kind].file
        if payload is not None and name is not None:
            meta = {**dict(payload.get("meta") or {}), "settings": wanted, "inputs": dict(inputs)}
            record = {**payload, "meta": meta}
            record["content_id"] = content_id(record)
            save_artifact(directory / name, kind, record)
            content = record["content_id"]
        entry = Entry(
            kind=kind,
            path=directory,
            settings=wanted,
            label=label,
            tag=tag,
            inputs=dict(inputs),
            content=content,
            written=time.strftime("%Y-%m-%dT%H:%M:%S"),
            imported=imported,
        )
        fields = {k: v for k, v in entry.__dict__.items() if k != "path"}
        write_json_atomic(directory / SIDECAR, fields)
        return entry

    # ------------------------------------------------------------------ reading
    def load(self, entry: Entry) -> dict[str, Any]:
        """The artifact file of an entry, checked (kind, version, checksum, model spec).

        Returns:
            The stored dict, with ``spec`` (a :class:`ModelSpec`) added (a probe written without
            one, by an earlier version, has none: its head's spec rebuilds the model).

        Raises:
            MissingArtifactError: The file is gone.
            ArtifactError: It is damaged, of another kind or without a readable spec.
        """
        kind = KINDS[entry.kind]
        if entry.file is None:
            raise ArtifactError(f"{entry.path} ({entry.kind}) has no artifact file to load")
        record = load_artifact(entry.file, kind.name, kind.stage)
        meta = record.get("meta") or {}
        if kind.name == "probe" and "spec" not in meta:
            return record  # the probe's model is its head's: only the head must rebuild from it
        try:
            record["spec"] = ModelSpec.from_meta(meta)
        except (SpecError, KeyError, TypeError, ValueError) as err:
            raise ArtifactError(
                f"{entry.file} has no readable model spec ({err}): re-run stage={kind.stage}"
            ) from err
        return record

    def check_fresh(self, entry: Entry, parent: Entry | None) -> None:
        """Refuse an artifact made from an earlier version of its input (replaced since).

        Raises:
            ArtifactError: Naming the artifact, its input and the stage to run again.
        """
        if parent is None or parent.content == "" or parent.kind not in entry.inputs:
            return
        if entry.inputs[parent.kind] != parent.content:
            raise ArtifactError(
                f"{entry.path} was made from an earlier {parent.kind} ({parent.path} was written "
                f"again since): run stage={KINDS[entry.kind].stage} again"
            )

    def trained_head(
        self,
        head_record: Mapping[str, Any],
        probe_record: Mapping[str, Any] | None = None,
        clusterbook: Tensor | None = None,
    ) -> tuple[nn.Module, LinearProbe]:
        """The teacher head and linear probe a later stage uses, rebuilt from their spec.

        The head is stage 2's, unless stage 3 trained it (``method.probe.reference_leak``): then
        ``probe.pt`` carries the head it left, and that is the head the evaluation scored and a
        segmenter must predict with. The linear probe is the newest (stage 3's when given).

        Args:
            head_record: ``head.pt`` as :meth:`load` returns it.
            probe_record: ``probe.pt``, when the caller has it.
            clusterbook: The clusterbook, for a head state that does not hold it.

        Raises:
            ArtifactError: The state does not fit the head its spec builds.
        """
        spec: ModelSpec = head_record["spec"]
        if spec.head is None:
            raise ArtifactError("the head artifact's model spec has no head: re-run stage=head")
        leaked = probe_record is not None and "head_state" in probe_record
        state = (probe_record if leaked else head_record)["head_state"]  # type: ignore[index]
        head = build_head(spec.head)
        missing, unexpected = head.load_state_dict(state, strict=False)
        if unexpected or [m for m in missing if m != "clusterbook"]:
            raise ArtifactError(
                f"the stored head does not fit {spec.head.target} {spec.head.kwargs}: missing "
                f"{missing}, unexpected {unexpected}: re-run stage=head"
            )
        if "clusterbook" in missing:
            if clusterbook is None:
                raise ArtifactError("the stored head has no clusterbook and none was given")
            head.set_clusterbook(clusterbook)
        linear = LinearProbe(head.reduced_dim, spec.num_classes)
        linear.load_state_dict((probe_record or head_record)["linear_state"])
        return head, linear

    def segmenter_arguments(
        self,
        entry: Entry,
        backbone: nn.Module | None = None,
        weights: str | os.PathLike[str] | None = None,
    ) -> dict[str, Any]:
        """Constructor arguments of a ``Segmenter`` made from a probe artifact (or an evaluation,
        whose probe is used) and the head and clusterbook it was made from.

        The head is the one the evaluation scores (:meth:`trained_head`, reference leak included).

        Args:
            entry: A ``probe`` or ``eval`` entry.
            backbone: An already-built backbone; rebuilt from the head's spec when ``None``.
            weights: A new location of the backbone weights.

        Raises:
            MissingArtifactError: A file of the chain is gone.
            ArtifactError: A file is damaged, or was made from an earlier version of its input.
        """
        chain = [e for e in self.chain(entry) if e.kind != "eval"]
        probe, head_entry, book = chain
        self.check_fresh(probe, head_entry)
        self.check_fresh(head_entry, book)
        probe_record, head_record = self.load(probe), self.load(head_entry)
        clusterbook = self.load(book)["clusterbook"]
        head, _ = self.trained_head(head_record, probe_record, clusterbook)
        spec: ModelSpec = head_record["spec"]
        ref = spec.backbone
        if backbone is None:
            backbone = rebuild_backbone(ref, head_entry.file, weights)  # type: ignore[arg-type]
        check_backbone(backbone, ref, head_entry.file)  # type: ignore[arg-type]
        pmeta, hmeta = dict(probe_record.get("meta") or {}), dict(head_record.get("meta") or {})
        private = ("config", "spec", "settings", "inputs")
        return {
            "backbone": backbone,
            "head": head,
            "centroids": probe_record["centroids"],
            "backbone_name": ref.name,
            "backbone_weights": os.fspath(weights) if weights is not None else ref.weights,
            "backbone_kwargs": ref.kwargs,
            "backbone_target": ref.target,
            "clusterbook": clusterbook,
            "class_names": pmeta.get("class_names") or hmeta.get("class_names"),
            "resolution": int(spec.resolution.test),
            "config": pmeta.get("config") or hmeta.get("config") or {},
            "meta": {
                "artifacts": str(probe.path),
                "spec": spec.to_dict(),
                "settings": probe.settings,
                "head_meta": {k: v for k, v in hmeta.items() if k not in private},
                "probe_meta": {k: v for k, v in pmeta.items() if k not in private},
            },
        }

    def chain(self, entry: Entry) -> list[Entry]:
        """The entry and the entries it was made from, nearest first (probe, head, clusterbook)."""
        found = [entry]
        while KINDS[found[-1].kind].parent is not None:
            parent = self.entry(found[-1].path.parent)
            if parent is None:
                raise MissingArtifactError(
                    f"{found[-1].path} sits outside the directory of the "
                    f"{KINDS[found[-1].kind].parent} it was made from"
                )
            found.append(parent)
        return found


def _fitting(entry: Entry, wanted: Mapping[str, Any]) -> Entry:
    """An imported artifact, refused when it was imported for other settings than the run's (the
    backbone options, the data): the same shapes could hide other features. Checked where the
    settings name them (the clusterbook; what sits inside it was imported with it)."""
    if not any(k.startswith("backbone.") for k in wanted):
        return entry
    differ = {
        k: v for k, v in entry.settings.items() if k != "imported_from" and wanted.get(k) != v
    }
    if not differ:
        return entry
    fixes = " ".join(f"{'' if k in wanted else '+'}{k}={v}" for k, v in sorted(differ.items()))
    raise ArtifactError(
        f"{entry.path} was imported for other settings (differing: "
        f"{difference_text(differ, {k: wanted[k] for k in differ if k in wanted})}): pass the same "
        f"options ({fixes}) or import the release again for this run's"
    )


def _safe(text: str) -> str:
    """A label usable in a directory name (letters, digits, ``.``, ``_``; ``-`` separates parts)."""
    cleaned = re.sub(r"[^A-Za-z0-9._]+", "_", str(text or "")).strip("_")
    if _DIGEST.match(cleaned):  # a label must never read as a settings digest
        cleaned = f"_{cleaned}"
    return cleaned
