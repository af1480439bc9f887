"""What `--model` names, parsed: a local file, one file of a Hugging Face repository, or a
repository and a quantisation tag. Pure: no file and no network is touched here.

    path/to/model.gguf                  a local file (what is not one of the forms below)
    hf:owner/repo/dir/model.gguf        that file of that repository
    owner/repo:Q4_K_M  (or hf:...)      the .gguf file of that quantisation, chosen as
                                        llama-server's `-hf owner/repo:Q4_K_M` chooses it
    hf:owner/repo                       llama-server's default: Q4_K_M, else Q8_0, else the first
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path

HF_PREFIX = "hf:"
MAX_REFERENCE = 1024  # characters: a reference is typed by people, not generated
# Hugging Face names: letters, digits, '-', '_', '.'; not starting or ending with '-' or '.',
# no '--' or '..', at most 96 characters.
_NAME = re.compile(r"[A-Za-z0-9_](?:[A-Za-z0-9_.-]{0,94}[A-Za-z0-9_])?")
_QUANT = re.compile(r"[A-Za-z0-9_][A-Za-z0-9_.-]{0,63}")
_QUANT_FORM = re.compile(r"([^/:\s]+)/([^/:\s]+):(.*)")  # owner/repo:TAG, before validation


class ModelError(Exception):
    """A model reference that cannot be used; the message says what is wrong, in one sentence."""


class BadReference(ModelError, ValueError):
    """The reference itself is malformed (nothing was looked up)."""


@dataclass(frozen=True, slots=True)
class LocalFile:
    path: Path

    def __str__(self) -> str:
        return str(self.path)


@dataclass(frozen=True, slots=True)
class HubFile:
    repo: str  # owner/name
    filename: str  # path inside the repository

    def __str__(self) -> str:
        return f"{HF_PREFIX}{self.repo}/{self.filename}"


@dataclass(frozen=True, slots=True)
class HubQuant:
    repo: str
    quant: str | None  # None: llama-server's default order

    def __str__(self) -> str:
        return f"{self.repo}:{self.quant}" if self.quant else f"{HF_PREFIX}{self.repo}"


ModelRef = LocalFile | HubFile | HubQuant


def parse_reference(text: str) -> ModelRef:
    """The reference `text` names; raises BadReference saying what is wrong with it.

    A local path that exists should be taken as one before calling this (the caller can look;
    this cannot): `dir/name:x` is otherwise read as a repository and a tag."""
    if len(text) > MAX_REFERENCE:
        raise BadReference(f"a model reference is at most {MAX_REFERENCE} characters")
    if text.startswith(HF_PREFIX):
        return _hub(text, text[len(HF_PREFIX) :])
    form = _QUANT_FORM.fullmatch(text)
    if form is not None:
        owner, name, quant = form.groups()
        return HubQuant(_repo(text, owner, name), _quant(text, quant))
    if not text.strip():
        raise BadReference("the model reference is empty")
    return LocalFile(Path(text))


def _hub(text: str, rest: str) -> HubFile | HubQuant:
    head, sep, quant = rest.partition(":")
    parts = head.split("/")
    if len(parts) < 2:
        raise BadReference(f"{text}: expected hf:OWNER/REPO/FILE.gguf or hf:OWNER/REPO:QUANT")
    repo = _repo(text, parts[0], parts[1])
    if len(parts) == 2 and parts[1].lower().endswith(".gguf"):
        raise BadReference(f"{text}: a file needs its repository: hf:OWNER/REPO/FILE.gguf")
    if len(parts) == 2:
        return HubQuant(repo, _quant(text, quant) if sep else None)
    if sep:
        raise BadReference(f"{text}: name a file or a quantisation tag, not both")
    return HubFile(repo, _filename(text, parts[2:]))


def _repo(text: str, owner: str, name: str) -> str:
    for part, what in ((owner, "owner"), (name, "repository name")):
        if not _NAME.fullmatch(part) or "--" in part or ".." in part:
            raise BadReference(
                f"{text}: {part!r} is not a valid Hugging Face {what} (letters, digits, '-', '_',"
                " '.', at most 96)"
            )
    return f"{owner}/{name}"


def _quant(text: str, quant: str) -> str:
    if not quant:
        raise BadReference(f"{text}: no quantisation tag after ':' (e.g. Q4_K_M)")
    if not _QUANT.fullmatch(quant):
        raise BadReference(
            f"{text}: {quant!r} is not a quantisation tag (letters, digits, '_', '-', '.')"
        )
    return quant


def _filename(text: str, parts: list[str]) -> str:
    if any(p in ("", ".", "..") or "\\" in p for p in parts):
        raise BadReference(f"{text}: the file's path has an empty, '.' or '..' part")
    filename = "/".join(parts)
    if not filename.lower().endswith(".gguf"):
        raise BadReference(f"{text}: {filename} is not a .gguf file")
    return filename
