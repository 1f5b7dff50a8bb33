"""Tokenizer signatures: vocabulary (token -> id) and BPE merges, so two processes can tell
whether they give the same ids to the same text (distillation teachers, remote servers)."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Any


def _signature_from_json(obj: dict) -> dict:
    model = obj.get("model") or {}
    vocab = dict(model.get("vocab") or {}) if isinstance(model.get("vocab"), dict) else {}
    if isinstance(model.get("vocab"), list):  # Unigram: [[piece, score], ...]
        vocab = {piece[0]: i for i, piece in enumerate(model["vocab"])}
    for tok in obj.get("added_tokens") or []:
        vocab[tok["content"]] = int(tok["id"])
    merges = [m if isinstance(m, str) else " ".join(m) for m in model.get("merges") or []]
    return {"type": model.get("type"), "vocab": vocab, "merges": merges}


def tokenizer_signature(tokenizer: Any) -> dict:
    """Vocabulary (token -> id) and BPE merges of a loaded (mlx-lm wrapped) tokenizer."""
    hf = getattr(tokenizer, "_tokenizer", tokenizer)
    backend = getattr(hf, "backend_tokenizer", None)
    if backend is not None:
        return _signature_from_json(json.loads(backend.to_str()))
    return {"type": None, "vocab": dict(hf.get_vocab()), "merges": []}


def signature_from_dir(path: str | Path) -> dict | None:
    """The same from a model directory's tokenizer.json (None when it has none)."""
    f = Path(path) / "tokenizer.json"
    if not f.is_file():
        return None
    return _signature_from_json(json.loads(f.read_text(encoding="utf-8")))


def fingerprint(sig: dict) -> str:
    blob = json.dumps([sig["type"], sorted(sig["vocab"].items()), sig["merges"]])
    return hashlib.sha256(blob.encode()).hexdigest()


def same_tokenizer(a: dict, b: dict) -> bool:
    """Same tokenizer: identical merges, and every token both know has the same id (one may
    add tokens after the other's, e.g. a padded or extended vocabulary)."""
    if a["type"] != b["type"] or a["merges"] != b["merges"]:
        return False
    small, big = (
        (a["vocab"], b["vocab"]) if len(a["vocab"]) <= len(b["vocab"]) else (b["vocab"], a["vocab"])
    )
    return all(big.get(tok) == i for tok, i in small.items())


def tokenizer_json(tokenizer: Any) -> str | None:
    """The serialised tokenizer.json of a loaded tokenizer (None for a slow tokenizer)."""
    hf = getattr(tokenizer, "_tokenizer", tokenizer)
    backend = getattr(hf, "backend_tokenizer", None)
    return backend.to_str() if backend is not None else None


def signature_from_text(text: str) -> dict:
    """The signature of a tokenizer.json given as text (e.g. sent by a remote server)."""
    return _signature_from_json(json.loads(text))
