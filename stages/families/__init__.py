"""Model family adapters, one module each, found by the `family:` a model's YAML names.

The family `name` lives in module `stages.families.<name>` (a `-` in the name is a `_` in the
module's), as the `ModelFamily` subclass whose `name` it is. Nothing else lists the families, so
adding one touches no shared file: its module here, its YAML in `configs/models/`, an offline
test model and its tests (docs/models.md, "Adding a model family").
"""

from __future__ import annotations

import functools
import importlib
import pkgutil
from pathlib import Path

from stages.errors import InvalidRequest
from stages.families.base import Conditioning, Denoising, ImageLatents, ModelFamily
from stages.models import ModelSpec

SHARED = ("base",)  # modules here that are not families


@functools.cache  # the folder's modules do not change while framecast runs
def known_families() -> tuple[str, ...]:
    """Every family with a module here (by module name)."""
    return tuple(sorted(m.name for m in pkgutil.iter_modules([str(Path(__file__).parent)]) if m.name not in SHARED))


@functools.cache  # asked on every validation and encode: found once per name
def family_class(name: str) -> type[ModelFamily]:
    """The adapter class of the family `name`."""
    module_name = name.replace("-", "_")
    if module_name not in known_families():
        known = ", ".join(known_families())
        raise InvalidRequest(f"framecast has no adapter for model family {name!r}; known: {known}")
    module = importlib.import_module(f"{__name__}.{module_name}")
    classes = [c for c in vars(module).values() if isinstance(c, type) and issubclass(c, ModelFamily)]
    found = [c for c in classes if getattr(c, "name", None) == name]
    if len(found) != 1:
        raise TypeError(f"{module.__name__} must define one ModelFamily subclass named {name!r}")
    return found[0]


def family_for(spec: ModelSpec) -> ModelFamily:
    """The adapter of the spec's family, bound to the spec."""
    return family_class(spec.family)(spec)


__all__ = ["Conditioning", "Denoising", "ImageLatents", "ModelFamily", "family_class", "family_for", "known_families"]
