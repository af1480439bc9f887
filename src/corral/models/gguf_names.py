"""GGUF file names in a repository: split parts, quantisation tags, and which file a tag picks.
Pure. The rules are llama-server's (`common/download.cpp` of the llama.cpp Corral builds):

- a split model is `PREFIX-00001-of-00003.gguf` ... `PREFIX-00003-of-00003.gguf`; llama-server
  loads the first part and finds the others beside it;
- a file's tag is the last `-` or `.` separated word of its name (`model-Q4_K_M.gguf`: Q4_K_M);
- a tag picks the files whose path contains it followed by `.` or `-`, case-insensitively,
  leaving out projectors and other companions (mmproj, imatrix, ...) and the parts after the
  first. No tag means Q4_K_M, else Q8_0, else the first model file. Of the matches, a single
  file is preferred to a split one, then the first by path.
"""

from __future__ import annotations

import re
from collections.abc import Iterable
from dataclasses import dataclass

from corral.models.reference import ModelError

SUFFIX = ".gguf"
MAX_PARTS = 1024  # a split's part count, as its name claims: bounded before names are made
DEFAULT_QUANTS = ("Q4_K_M", "Q8_0")  # llama-server's order when no tag is given
_SPLIT = re.compile(r"(.+)-([0-9]{5})-of-([0-9]{5})", re.IGNORECASE)
_TAG = re.compile(r"[-.]([A-Z0-9_]+)$", re.IGNORECASE)
_NOT_MODELS = ("mmproj", "imatrix", "mtp-", "eagle3-", "dflash-", "dspark-")


@dataclass(frozen=True, slots=True)
class GgufName:
    prefix: str  # the path without `.gguf` and without the split's `-0000i-of-0000n`
    tag: str  # upper case; "" when the name has none
    index: int  # 1 for a single file
    count: int


def gguf_name(path: str) -> GgufName | None:
    """The parts of a .gguf file's path; None for any other file."""
    if not path.endswith(SUFFIX):
        return None
    prefix, index, count = path[: -len(SUFFIX)], 1, 1
    split = _SPLIT.fullmatch(prefix)
    if split is not None:
        prefix, index, count = split[1], int(split[2]), int(split[3])
    tag = _TAG.search(prefix)
    return GgufName(prefix, tag[1].upper() if tag else "", index, count)


def is_model(path: str) -> bool:
    """A model's weights, not a projector, an importance matrix or a draft model beside it."""
    base = path.rsplit("/", 1)[-1]
    return base.endswith(SUFFIX) and not any(word in base for word in _NOT_MODELS)


def split_parts(path: str) -> tuple[str, ...]:
    """Every file the model at `path` is made of, first part first (just `path` when it is a
    single file). Raises ModelError for a split name that cannot be right."""
    name = gguf_name(path)
    if name is None or (name.count == 1 and name.index == 1):
        return (path,)
    if not 1 <= name.index <= name.count or name.count > MAX_PARTS:
        raise ModelError(
            f"{path}: part {name.index} of {name.count} is not a valid split GGUF part"
            f" (1 to {MAX_PARTS} parts)"
        )
    return tuple(
        f"{name.prefix}-{i:05d}-of-{name.count:05d}{SUFFIX}" for i in range(1, name.count + 1)
    )


def quants(paths: Iterable[str]) -> list[str]:
    """The tags of the model files among `paths`, each once, sorted."""
    tags = {n.tag for p in paths if is_model(p) and (n := gguf_name(p)) is not None and n.tag}
    return sorted(tags)


def choose(paths: Iterable[str], quant: str | None) -> str | None:
    """The file a tag picks (the first part of a split one), or None when nothing matches."""
    models = [p for p in sorted(paths) if is_model(p)]
    firsts = [p for p in models if (n := gguf_name(p)) is not None and n.index == 1]
    for tag in (quant,) if quant else DEFAULT_QUANTS:
        pattern = re.compile(re.escape(tag) + "[.-]", re.IGNORECASE)
        found = [p for p in firsts if pattern.search(p)]
        single = [p for p in found if _single(p)]
        if found:
            return (single or found)[0]
    if quant is None and firsts:
        return next((p for p in firsts if _single(p)), firsts[0])
    return None


def _single(path: str) -> bool:
    name = gguf_name(path)
    return name is not None and name.count == 1
