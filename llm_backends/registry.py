"""What the package can run, as plain data: model_type -> family, and backend name -> the module that loads it.

A new family is one new file under families/ and one line in FAMILIES' tuple; a new backend is one new file
(a ``load(target, options) -> ChatModel`` and a ``label(target) -> str``) and one line in BACKENDS.
"""

from __future__ import annotations

from .errors import ModelLoadError
from .families import gemma3, qwen3
from .families.base import Family

FAMILIES: dict[str, Family] = {
    model_type: family.FAMILY for family in (gemma3, qwen3) for model_type in family.FAMILY.model_types
}

# Modules are imported when a source names them, so fronting a remote server never imports torch.
BACKENDS: dict[str, str] = {
    "transformers": ".transformers_backend",
    "mlx": ".mlx_backend",
    "openai": ".remote",
}


def family_for(model_type: str | None) -> Family:
    """The family serving ``model_type``; raises ModelLoadError listing the supported types otherwise."""
    try:
        return FAMILIES[model_type or ""]
    except KeyError:
        supported = ", ".join(sorted(FAMILIES))
        raise ModelLoadError(f"unsupported model type {model_type!r}: this project runs {supported}") from None
