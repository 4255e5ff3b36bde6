"""`llmos models add|list|remove`: models people bring, beside the catalog's (`llmos models build`)."""

from __future__ import annotations

import argparse
from pathlib import Path

from llmos.models.catalog import CATALOG, Role, models_root
from llmos.models.manifest import artefact_problems
from llmos.models.store import registered_models
from llmos.settings import PlatformSettings, load_settings
from llmos_cli.output import add_json_option, print_json, print_table

ADDABLE_ROLES = (Role.GENERATION.value, Role.EMBEDDING.value)
VARIANTS = ("cpu-int4", "cuda-fp16", "fp32", "int8")


def _home() -> Path:
    return load_settings(PlatformSettings).home


def cmd_add(args: argparse.Namespace) -> int:
    from llmos.models.registry import add_model

    add_model(_home(), args.name, gguf=args.gguf, hf=args.hf, role=Role(args.role), variant=args.variant)
    return 0


def model_rows(home: Path) -> list[dict[str, object]]:
    """Every model this home knows: the catalog's and the added ones, with whether each is built."""
    rows: list[dict[str, object]] = []
    for spec in CATALOG.values():
        for variant in spec.variants:
            built = not artefact_problems(spec.folder(home, variant), check_hashes=False)
            rows.append({"name": spec.name, "role": spec.role.value, "variant": variant, "origin": "built-in",
                         "source": spec.source.package, "licence": spec.licence, "chat_template": None,
                         "context_length": None, "sha256": None, "built": built})
    for model in registered_models(home).values():
        built = not artefact_problems(model.folder(home), check_hashes=False)
        rows.append({"name": model.name, "role": model.role, "variant": model.variant, "origin": "added",
                     "source": f"{model.source_format}:{model.source}", "licence": model.licence,
                     "chat_template": model.chat_template is not None, "context_length": model.context_length,
                     "sha256": model.sha256, "built": built})
    return rows


def cmd_list(args: argparse.Namespace) -> int:
    rows = model_rows(_home())
    if args.json:
        print_json({"models_folder": str(models_root(_home())), "models": rows})
        return 0
    print_table(
        ("name", "role", "variant", "origin", "built", "chat", "context", "licence", "source"),
        [(str(r["name"]), str(r["role"]), str(r["variant"]), str(r["origin"]), "yes" if r["built"] else "no",
          {True: "yes", False: "no (completion)", None: "-"}[r["chat_template"]],  # type: ignore[index]
          str(r["context_length"] or "-"), str(r["licence"]), str(r["source"])) for r in rows],
    )
    return 0


def cmd_remove(args: argparse.Namespace) -> int:
    from llmos.models.registry import remove_model

    model = remove_model(_home(), args.name)
    print(f"removed {model.name} ({model.variant}); its checkpoint {model.source} is untouched")
    return 0


def register(models: argparse._SubParsersAction) -> None:  # type: ignore[type-arg]
    add = models.add_parser("add", help="build a served model from a local checkpoint and register it")
    add.add_argument("name", help="the model's name, as GenerateRequest.model names it")
    source = add.add_mutually_exclusive_group(required=True)
    source.add_argument("--gguf", type=Path, help="a GGUF file (generation)")
    source.add_argument("--hf", type=Path, help="a Hugging Face folder (generation, or a sentence-transformers folder for embeddings)")
    add.add_argument("--role", choices=ADDABLE_ROLES, default=Role.GENERATION.value)
    add.add_argument("--variant", choices=VARIANTS, help="default: cpu-int4 for generation, fp32 for embeddings")
    add.set_defaults(run=cmd_add)
    add_json_option(models.add_parser("list", help="built-in and added models, built or not")).set_defaults(run=cmd_list)
    remove = models.add_parser("remove", help="forget an added model and delete its artefact")
    remove.add_argument("name")
    remove.set_defaults(run=cmd_remove)
