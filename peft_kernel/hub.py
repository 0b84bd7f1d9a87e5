"""Where adapter files come from: a local directory, or a Hugging Face Hub repository.

``model_id`` is a directory when one exists at that path; otherwise it is a Hub repo id
(``"user/repo"``) and files are fetched through ``huggingface_hub`` (imported only then),
which keeps its own cache and honours ``HF_HUB_OFFLINE`` / ``local_files_only``.
"""

from __future__ import annotations

import os
from typing import Any

#: keyword arguments that say where an adapter's files are (HF PEFT accepts the same)
HUB_KWARGS = ("subfolder", "revision", "token", "cache_dir", "force_download", "local_files_only", "use_auth_token")


def split_hub_kwargs(kwargs: dict[str, Any]) -> tuple[dict[str, Any], dict[str, Any]]:
    """``(hub keyword arguments, the rest)``; HF PEFT's old ``use_auth_token`` becomes ``token``."""
    hub = {k: v for k, v in kwargs.items() if k in HUB_KWARGS}
    rest = {k: v for k, v in kwargs.items() if k not in HUB_KWARGS}
    if "use_auth_token" in hub:
        token = hub.pop("use_auth_token")
        hub.setdefault("token", token)
    return hub, rest


def resolve_file(model_id: str | os.PathLike, filenames: tuple[str, ...], **hub_kwargs: Any) -> str:
    """The local path of the first of ``filenames`` that the adapter at ``model_id`` has.

    Raises ``FileNotFoundError`` naming where it looked, and how to get the files, when none is
    there (or, offline, none is cached).
    """
    subfolder = hub_kwargs.get("subfolder") or ""
    if os.path.isdir(model_id):
        from . import io

        directory = os.path.join(model_id, subfolder)
        for name in filenames:
            path = io.committed_path(directory, name)  # after an interrupted save: the staged copy
            if path is not None and os.path.isfile(path):
                return path
        raise FileNotFoundError(f"No {' or '.join(filenames)} in the directory {directory!r}.")
    return _download(str(model_id), filenames, **hub_kwargs)


def _download(repo_id: str, filenames: tuple[str, ...], subfolder: str = "", revision: str | None = None,
              token: str | bool | None = None, cache_dir: str | None = None, force_download: bool = False,
              local_files_only: bool = False) -> str:
    try:
        import huggingface_hub
        from huggingface_hub.errors import EntryNotFoundError, HFValidationError, LocalEntryNotFoundError
    except ImportError:
        raise FileNotFoundError(
            f"{repo_id!r} is not a local directory, and loading from the Hugging Face Hub needs huggingface_hub: "
            "pip install huggingface_hub (or pass the path of a saved adapter directory)."
        ) from None
    where = f"{repo_id!r}" + (f" (subfolder {subfolder!r})" if subfolder else "") + (
        f" at revision {revision!r}" if revision else "")
    offline = local_files_only or huggingface_hub.constants.HF_HUB_OFFLINE
    for name in filenames:
        try:
            return huggingface_hub.hf_hub_download(
                repo_id, name, subfolder=subfolder or None, revision=revision, token=token, cache_dir=cache_dir,
                force_download=force_download, local_files_only=local_files_only)
        except HFValidationError:
            raise FileNotFoundError(
                f"{repo_id!r} is neither a local directory nor a valid Hugging Face Hub repo id ('user/name'). "
                "Check the path."
            ) from None
        except LocalEntryNotFoundError:
            if not offline:
                raise
        except EntryNotFoundError:
            pass
    if offline:
        raise FileNotFoundError(
            f"No {' or '.join(filenames)} of {where} in the Hugging Face cache, and Hub downloads are off "
            "(HF_HUB_OFFLINE=1 or local_files_only=True). Download it once while online, or pass a local directory."
        )
    raise FileNotFoundError(f"The Hugging Face Hub repo {where} has no {' or '.join(filenames)}.")


# -- model card -------------------------------------------------------------------------

CARD_NAME = "README.md"
_VERSIONS_HEADING = "### Framework versions"


def write_model_card(directory: str, metadata: dict[str, Any], version: str) -> None:
    """Create ``README.md`` in ``directory``, or update the one there (written by the user,
    transformers' Trainer or TRL): the metadata block gets ``metadata`` (tags are added to the
    existing ones) and the "Framework versions" list gets ``- PEFT <version>``. Updating needs
    huggingface_hub (it reads the YAML block); without it an existing card is left alone."""
    from .io import atomic_write_text

    path = os.path.join(directory, CARD_NAME)
    version_line = f"- PEFT {version}"
    try:
        from huggingface_hub import ModelCard, ModelCardData
    except ImportError:
        if not os.path.exists(path):
            atomic_write_text(path, _fresh_card_text(_yaml(metadata), version_line))
        return
    if os.path.exists(path):
        card = ModelCard.load(path)
        for key, value in metadata.items():
            if key == "tags":
                value = sorted(set(card.data.tags or []) | set(value))
            if key != "pipeline_tag" or not card.data.pipeline_tag:
                card.data[key] = value
        lines = card.text.splitlines()
        if version_line not in lines:
            if _VERSIONS_HEADING in lines:
                at = lines.index(_VERSIONS_HEADING) + 1
                at += at < len(lines) and not lines[at].strip()  # after the blank line under the heading
                lines.insert(at, version_line)
            else:
                lines += ["", _VERSIONS_HEADING, "", version_line]
        card.text = "\n".join(lines) + "\n"
    else:
        card = ModelCard(_fresh_card_text(ModelCardData(**metadata).to_yaml(), version_line))
    atomic_write_text(path, str(card))


def _yaml(metadata: dict[str, Any]) -> str:
    lines = []
    for key, value in metadata.items():
        if isinstance(value, list):
            lines += [f"{key}:"] + [f"- {item}" for item in value]
        else:
            lines.append(f"{key}: {value}")
    return "\n".join(lines)


def _fresh_card_text(front_matter: str, version_line: str) -> str:
    return (f"---\n{front_matter}\n---\n\n# Adapter\n\nA parameter-efficient fine-tuning adapter in Hugging Face "
            "PEFT's format (`adapter_config.json` + `adapter_model.safetensors`); load it with PEFT's or "
            f"peft-kernel's `PeftModel.from_pretrained(base_model, <this repo>)`.\n\n{_VERSIONS_HEADING}\n\n"
            f"{version_line}\n")
