"""Kubernetes operator for DPOJob: QLoRA SFT then DPO of language models, with live status."""

from importlib import metadata


def _version() -> str:
    """The installed distribution's version: `dpo-operator` in the image, `dpo-operator-dev` in the development
    install (both pyproject.toml files carry the one version number)."""
    for distribution in ("dpo-operator", "dpo-operator-dev"):
        try:
            return metadata.version(distribution)
        except metadata.PackageNotFoundError:
            continue
    return "0+unknown"


__version__ = _version()
