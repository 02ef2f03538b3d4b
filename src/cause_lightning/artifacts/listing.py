"""``stage=artifacts``: what the artifact directory holds, and the settings each was made with.

Artifacts are listed as the tree they form (a head inside its clusterbook, a probe inside its head,
an evaluation inside its probe). Beside each, the settings that tell it apart from its siblings
(the artifacts of the same kind made from the same input), so an ablation reads as the one
setting it changed; an evaluation shows its recorded mIoU.
"""

from __future__ import annotations

import json
from typing import Any

from rich.console import Console
from rich.tree import Tree

from cause_lightning.artifacts.store import METRICS_FILE, ArtifactStore, Entry

__all__ = ["differences", "list_artifacts"]


def differences(entry: Entry, siblings: list[Entry]) -> dict[str, Any]:
    """The settings of ``entry`` that not every sibling shares (all of them when it is alone)."""
    others = [s for s in siblings if s.path != entry.path]
    if not others:
        return {}
    return {k: v for k, v in entry.settings.items() if any(o.settings.get(k) != v for o in others)}


def list_artifacts(store: ArtifactStore) -> dict[str, Any]:
    """Print the artifact tree of a store (a data set and backbone, and its smoke-test twin).

    Returns:
        ``artifacts/list``: one record per artifact (kind, path, tag, written, settings that set
        it apart, mIoU of an evaluation).
    """
    entries = store.entries()
    by_parent: dict[Any, list[Entry]] = {}
    for entry in entries:
        by_parent.setdefault(entry.path.parent, []).append(entry)
    records = []
    roots = [store.root] + ([store.fallback] if store.fallback else [])
    console = Console()
    for root in roots:
        tree = Tree(f"[bold]{root}[/bold]")
        _grow(tree, root, by_parent, records)
        if tree.children:
            console.print(tree)
    if not records:
        console.print(f"no artifacts under {store.root} yet")
    return {"artifacts/list": records}


def _grow(node: Tree, folder: Any, by_parent: dict[Any, list[Entry]], records: list) -> None:
    children = sorted(by_parent.get(folder, []), key=lambda e: e.written)
    for entry in children:
        siblings = [c for c in children if c.kind == entry.kind]
        apart = differences(entry, siblings)
        record = {
            "kind": entry.kind,
            "path": str(entry.path),
            "tag": entry.tag,
            "written": entry.written,
            "imported": entry.imported,
            "settings": apart,
        }
        text = f"{entry.kind} [dim]{entry.path.name}[/dim] {entry.written}"
        if entry.imported:
            text += f" (imported, artifact_tag={entry.tag})"
        elif entry.tag:
            text += f" (artifact_tag={entry.tag})"
        if entry.kind == "eval":
            score = _score(entry)
            if score is not None:
                record["mIoU"] = score
                text += f"  mIoU {100 * score:.1f}"
        if apart:
            text += "  " + ", ".join(f"{k}={v}" for k, v in sorted(apart.items()))
        records.append(record)
        _grow(node.add(text), entry.path, by_parent, records)


def _score(entry: Entry) -> float | None:
    """The recorded variant's cluster-probe mIoU of an evaluation's metrics.json."""
    path = entry.path / METRICS_FILE
    try:
        report = json.loads(path.read_text())
        return float(report["metrics"][f"test/cluster/{report['record_variant']}/mIoU"])
    except (OSError, ValueError, KeyError):
        return None
