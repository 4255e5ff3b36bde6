"""Served models: the catalog, building artefacts from packaged weights, and finding them.

Importing this package never imports build tools (torch, transformers); only build_models uses them.
"""

from llmos.models.build import build_models
from llmos.models.catalog import CATALOG, ModelSpec, Role, get_spec, locate_source
from llmos.models.errors import BuildFailed, ModelsNotBuilt, ModelSourceMissing
from llmos.models.manifest import ArtefactManifest, FileEntry, ModelsManifest
from llmos.models.store import artefact_dir, load_manifest, models_built

__all__ = [
    "CATALOG",
    "ArtefactManifest",
    "BuildFailed",
    "FileEntry",
    "ModelSourceMissing",
    "ModelSpec",
    "ModelsManifest",
    "ModelsNotBuilt",
    "Role",
    "artefact_dir",
    "build_models",
    "get_spec",
    "load_manifest",
    "locate_source",
    "models_built",
]
