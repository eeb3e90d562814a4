"""model_type (from the checkpoint's own config) -> family. A new family is one new file and one line here."""

from __future__ import annotations

from .errors import ModelLoadError
from .families import gemma3, qwen3
from .families.base import Family

FAMILIES: dict[str, Family] = {
    model_type: family.FAMILY for family in (gemma3, qwen3) for model_type in family.FAMILY.model_types
}


def family_for(model_type: str | None) -> Family:
    """The family serving ``model_type``; raises ModelLoadError listing the supported types otherwise."""
    try:
        return FAMILIES[model_type or ""]
    except KeyError:
        supported = ", ".join(sorted(FAMILIES))
        raise ModelLoadError(f"unsupported model type {model_type!r}: this project runs {supported}") from None
