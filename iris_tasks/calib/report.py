"""Read-only views of contexts for operators, the CLI and the Airflow UI."""

from __future__ import annotations

import logging
from typing import Any

from . import cache
from .errors import CalibrationError
from .publishing import _sha1
from .reftypes import INSTRUMENT

log = logging.getLogger(__name__)


def describe_context(context: str | None = None) -> dict[str, Any]:
    """Structured content of `context` (default: operational): its status, provenance and,
    per reference type, the rmap and each rule (match values, USEAFTER, reference)."""
    name = cache.resolve_context(context)
    status = cache.cache_status()
    pmap = cache.load_mapping(name, cached=False)
    imap_name = pmap.selector[INSTRUMENT.upper()]
    imap = cache.load_mapping(imap_name, cached=False)
    reftypes = {}
    for key, rmap_name in sorted(imap.selector.items()):
        rmap = cache.load_mapping(rmap_name, cached=False)
        flat = rmap.todict()
        params = [p.upper() for p in flat["parameters"][:-2]]  # drop USEAFTER, REFERENCE
        rules = [
            {"match": dict(zip(params, row[:-2], strict=True)), "useafter": row[-2], "reference": row[-1]}
            for row in flat["selections"]
        ]
        reftypes[key.lower()] = {"rmap": rmap_name, "rules": rules}
    header = dict(dict.items(pmap.header))  # raw values (LowerCaseDict lower-cases on access)
    return {
        "context": name,
        "operational": name == status["operational"],
        "newest": name == status["newest"],
        "pinned": status["pinned"] and name == status["operational"],
        "derived_from": header.get("derived_from"),
        "description": header.get("description", ""),
        "author": header.get("author", ""),
        "imap": imap_name,
        "reftypes": reftypes,
    }


def show(context: str | None = None) -> str:
    """Human-readable :func:`describe_context`."""
    info = describe_context(context)
    flags = [f for f in ("operational", "newest", "pinned") if info[f]]
    lines = [
        f"{info['context']}" + (f"  [{', '.join(flags)}]" if flags else ""),
        f"  derived from: {info['derived_from']}",
        f"  description:  {info['description']}",
    ]
    if info["author"]:
        lines.append(f"  author:       {info['author']}")
    for reftype, entry in info["reftypes"].items():
        lines.append(f"  {reftype:10s} {entry['rmap']}  ({len(entry['rules'])} rules)")
        for rule in entry["rules"]:
            match = " ".join(f"{k}={v}" for k, v in rule["match"].items())
            lines.append(f"      {match:40s} after {rule['useafter']}  {rule['reference']}")
    return "\n".join(lines)


def format_contexts() -> str:
    """One line per context: name, flags, description (for ``iris-drs calib list``)."""
    status = cache.cache_status()
    descriptions = {e["context"]: e.get("description", e["event"]) for e in cache.context_history()
                    if e["event"] in ("publish", "bootstrap")}
    lines = []
    for name in cache.list_contexts():
        flags = []
        if name == status["operational"]:
            flags.append("operational" + (" (pinned)" if status["pinned"] else ""))
        if name == status["newest"]:
            flags.append("newest")
        lines.append(f"{name:16s} {', '.join(flags):28s} {descriptions.get(name, '')}")
    return "\n".join(lines)


def verify_cache(context: str | None = None) -> list[str]:
    """Check mapping sha1sums of `context` (default: every context) and that every
    published reference is present with the sha1 recorded when it was published.
    Returns a list of problems (empty = healthy)."""
    problems = []
    contexts = [cache.resolve_context(context)] if context else cache.list_contexts()
    referenced: set[str] = set()
    for name in contexts:
        try:
            cache.verify_context(name)
            info = describe_context(name)
        except CalibrationError as exc:
            problems.append(str(exc))
            continue
        for entry in info["reftypes"].values():
            referenced.update(rule["reference"] for rule in entry["rules"])
    recorded = {ref["name"]: ref["sha1"] for event in cache.context_history()
                for ref in event.get("references", [])}
    for name in sorted(referenced):
        path = cache.references_dir() / name
        if not path.is_file():
            problems.append(f"{path}: referenced by a context but missing from the cache")
            continue
        digest = _sha1(path)
        if name in recorded and recorded[name] != digest:
            problems.append(f"{path}: sha1 {digest} differs from {recorded[name]} recorded at publish")
    return problems
