"""Where a model's weights are: a local diffusers directory, the local Hugging Face cache, or
for test models a directory built offline (`stages.tiny`), checked against the spec's
architecture before anything is loaded. Nothing is ever downloaded."""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

from stages.errors import InvalidRequest
from stages.families import family_for
from stages.models import ModelSpec
from stages.tiny import built_path, ensure_built


def cache_dir() -> Path:
    """Where framecast keeps models it builds itself (`FRAMECAST_CACHE`, default ~/.cache/framecast)."""
    return Path(os.environ.get("FRAMECAST_CACHE", Path.home() / ".cache" / "framecast")).expanduser()


def resolve_weights(spec: ModelSpec, override: str | os.PathLike | None = None) -> Path:
    """Find the local diffusers directory of a model's weights, building test models if needed.

    Raises InvalidRequest (before anything heavy is loaded) when no weights are to be found.
    """
    explicit = override or spec.weights.path
    if explicit:
        path = Path(explicit).expanduser()
        if not (path / "model_index.json").is_file():
            raise InvalidRequest(
                f"no diffusers weights for {spec.name} at {path} (expected model_index.json there); "
                f"give weights, a local copy of the model directory"
            )
        return check_architecture(spec, path)
    if spec.weights.hub_id:
        from huggingface_hub import snapshot_download
        from huggingface_hub.errors import LocalEntryNotFoundError

        try:
            path = Path(snapshot_download(spec.weights.hub_id, local_files_only=True))
        except LocalEntryNotFoundError:
            raise InvalidRequest(
                f"weights for {spec.name} ({spec.weights.hub_id}) are not in the local Hugging Face cache; "
                f"give weights, a local diffusers copy, or set weights.path in {spec.source.name}"
            ) from None
        return check_architecture(spec, path)
    if spec.weights.build_seed is not None:
        return check_architecture(spec, ensure_built(spec, cache_dir(), family_for(spec).build_tokenizer))
    raise InvalidRequest(f"{spec.name} names no weights; give weights, a local diffusers copy")


def weights_status(spec: ModelSpec) -> dict[str, Any]:
    """Where the model's weights come from and whether they are on this machine, looked up
    without loading, building or downloading anything: {"source", "location", "present"}."""
    if spec.weights.path:
        path = Path(spec.weights.path)
        return {"source": "path", "location": str(path), "present": (path / "model_index.json").is_file()}
    if spec.weights.hub_id:
        from huggingface_hub import try_to_load_from_cache

        found = try_to_load_from_cache(spec.weights.hub_id, "model_index.json")
        return {"source": "hub cache", "location": spec.weights.hub_id, "present": isinstance(found, str)}
    if spec.weights.build_seed is not None:
        target = built_path(spec, cache_dir())
        return {"source": "built offline", "location": str(target), "present": (target / "model_index.json").is_file()}
    return {"source": "none", "location": None, "present": False}


# Components without an architecture to check: a tokenizer, an image preprocessor.
UNCHECKED = ("tokenizer", "feature_extractor", "image_processor")


def config_file(key: str) -> str:
    """The config file of a component, inside the weights directory."""
    return f"{key}/scheduler_config.json" if key == "scheduler" else f"{key}/config.json"


def check_architecture(spec: ModelSpec, weights: Path) -> Path:
    """Refuse weights whose configs contradict the spec (say, 5b weights under the 2b name).

    Reads only the small config.json files, so a mismatch is reported before anything is loaded.
    Keys the weights' config leaves out take the library default and are not compared.
    """
    problems = []
    for key in spec.components:
        if key in UNCHECKED:
            continue
        path = weights / config_file(key)
        if not path.is_file():
            raise InvalidRequest(f"{weights} has no {config_file(key)}: it is not a diffusers copy of {spec.name}")
        actual = json.loads(path.read_text())
        for name, declared in spec.components[key].config.items():
            if name in actual and actual[name] != declared:
                problems.append(f"{key}.{name} is {actual[name]!r} there but {declared!r} in {spec.source.name}")
    index_path = weights / "model_index.json"
    if not index_path.is_file():
        raise InvalidRequest(f"{weights} has no model_index.json: it is not a diffusers copy of {spec.name}")
    # The pipeline's own settings (its scalars: the rest names components), both ways: Wan 2.2 A14B
    # weights, whose transformer is Wan 2.1 14B's, differ from it only in `boundary_ratio` here.
    index = json.loads(index_path.read_text())
    settings = {k for k, v in index.items() if not k.startswith("_") and not isinstance(v, list)}
    for name in sorted(settings | set(spec.pipeline_config)):
        actual, declared = index.get(name), spec.pipeline_config.get(name)
        if (actual or None) != (declared or None):  # unset, null and false are one: the default
            problems.append(f"model_index.json's {name} is {actual!r} there but "
                            f"{'unset' if declared is None else repr(declared)} in {spec.source.name}")  # fmt: skip
    if problems:
        raise InvalidRequest(f"the weights at {weights} are not {spec.name}: " + "; ".join(problems))
    return weights
