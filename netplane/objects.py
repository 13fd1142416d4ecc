"""Helpers on Kubernetes-shaped objects (plain dicts in wire shape): loading, keys, selectors.

Components convert these dicts once into their own small frozen dataclasses; the helpers here
are the few things every component needs before that.
"""
from __future__ import annotations

from pathlib import Path
from typing import Iterable

import yaml


class ManifestError(ValueError):
    """A manifest that cannot be used; the message names the document and the field."""


def load_documents(text: str, source: str = "<input>") -> list[dict]:
    """Parse multi-document YAML (or JSON) into objects; `List` kinds are flattened.

    Raises ManifestError naming the source and document number when the YAML does not parse
    or a document is not a mapping with apiVersion and kind.
    """
    docs: list = []
    try:
        for doc in yaml.safe_load_all(text):  # one at a time, so an error names its document
            docs.append(doc)
    except yaml.YAMLError as err:
        mark = getattr(err, "problem_mark", None)
        line = f", line {mark.line + 1}" if mark is not None else ""
        problem = getattr(err, "problem", None) or str(err)
        raise ManifestError(f"{source}: document {len(docs) + 1}{line}: YAML does not parse: {problem}") from None
    return objects_of(docs, source)


def objects_of(docs: list, source: str) -> list[dict]:
    """Parsed YAML documents -> objects, `List` kinds flattened; ManifestError naming the document
    that is not a mapping with apiVersion and kind."""
    objects: list[dict] = []
    for index, doc in enumerate(docs, start=1):
        if doc is None:
            continue
        where = f"{source}: document {index}"
        if not isinstance(doc, dict):
            raise ManifestError(f"{where}: expected a mapping with apiVersion and kind, got {type(doc).__name__}")
        if str(doc.get("kind", "")).endswith("List") and isinstance(doc.get("items"), list):
            objects.extend(doc["items"])
            continue
        for field in ("apiVersion", "kind"):
            if not isinstance(doc.get(field), str) or not doc.get(field):
                raise ManifestError(f"{where}: missing field {field!r}")
        objects.append(doc)
    return objects


def load_file(path: str | Path) -> list[dict]:
    path = Path(path)
    try:
        text = path.read_text()
    except OSError as err:
        raise ManifestError(f"{path}: cannot read: {err.strerror}") from None
    return load_documents(text, str(path))


def name_of(obj: dict) -> str:
    return obj.get("metadata", {}).get("name", "")


def namespace_of(obj: dict) -> str:
    return obj.get("metadata", {}).get("namespace", "")


def changes_between(seen: dict, current: dict) -> dict:
    """What makes `seen` into `current` (both key -> object): key -> the object, for keys new or
    holding another object (compared by identity: a watch cache has one dict per version), and
    key -> None for keys gone."""
    changes = {k: o for k, o in current.items() if seen.get(k) is not o}
    changes.update((k, None) for k in seen if k not in current)
    return changes


def key_of(obj: dict) -> tuple[str, str]:
    """(namespace, name): the cache key of an object within its kind."""
    return namespace_of(obj), name_of(obj)


def labels_of(obj: dict) -> dict[str, str]:
    return obj.get("metadata", {}).get("labels") or {}


def matches_labels(selector: dict[str, str] | None, labels: dict[str, str]) -> bool:
    """A Service-style equality selector. An empty or missing selector selects nothing."""
    if not selector:
        return False
    return all(labels.get(k) == v for k, v in selector.items())


def matches_label_selector(selector: dict | None, labels: dict[str, str]) -> bool:
    """A metav1.LabelSelector (matchLabels + matchExpressions). An empty selector selects everything."""
    if selector is None:
        return False
    for k, v in (selector.get("matchLabels") or {}).items():
        if labels.get(k) != v:
            return False
    for expr in selector.get("matchExpressions") or []:
        key, op, values = expr.get("key"), expr.get("operator"), expr.get("values") or []
        if op == "In" and labels.get(key) not in values:
            return False
        if op == "NotIn" and key in labels and labels[key] in values:
            return False
        if op == "Exists" and key not in labels:
            return False
        if op == "DoesNotExist" and key in labels:
            return False
    return True


def by_kind(objects: Iterable[dict], kind: str) -> list[dict]:
    return [o for o in objects if o.get("kind") == kind]


def pod_is_ready(pod: dict) -> bool:
    for cond in pod.get("status", {}).get("conditions") or []:
        if cond.get("type") == "Ready":
            return cond.get("status") == "True"
    return False
