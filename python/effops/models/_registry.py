"""The model registry: model files register a builder per name; ``create_model`` looks it up.

A builder is called as ``fn(**kw)`` with only the options the caller gave (``num_classes`` and
``image_size`` are passed only when not None, so each family keeps its own defaults) and returns
an ``nn.Module``. ``create_model`` loads ``weights=PATH`` afterwards (see ``weights.load_weights``).
"""

from __future__ import annotations

from typing import Callable, Dict, List, Optional

import torch.nn as nn

_MODELS: Dict[str, Callable[..., nn.Module]] = {}


def register_model(name: str, fn: Optional[Callable[..., nn.Module]] = None):
    """Register ``fn`` under ``name``: ``register_model("x", fn)``, or as a decorator
    ``@register_model("x")``. A name can be registered once."""
    if not isinstance(name, str) or not name:
        raise TypeError(f"register_model: name must be a non-empty str, got {name!r}")

    def add(f: Callable[..., nn.Module]) -> Callable[..., nn.Module]:
        if not callable(f):
            raise TypeError(f"register_model: fn for {name!r} must be callable, got {type(f).__name__}")
        if name in _MODELS and _MODELS[name] is not f:
            raise ValueError(f"register_model: {name!r} is already registered")
        _MODELS[name] = f
        return f

    return add if fn is None else add(fn)


def list_models(pattern: Optional[str] = None) -> List[str]:
    """The registered names, sorted; ``pattern`` is an fnmatch filter (e.g. ``"tf_*"``)."""
    names = sorted(_MODELS)
    if pattern is None:
        return names
    import fnmatch

    return [n for n in names if fnmatch.fnmatchcase(n, pattern)]


def get_model_fn(name: str) -> Callable[..., nn.Module]:
    if not isinstance(name, str):
        raise TypeError(f"create_model: name must be a str, got {type(name).__name__}")
    fn = _MODELS.get(name)
    if fn is None:
        raise ValueError(f"create_model: unknown model {name!r}; known models: {', '.join(list_models())}")
    return fn


def create_model(name: str, *, num_classes: Optional[int] = None, weights=None, image_size=None, **kw) -> nn.Module:
    """Build the model registered as ``name``.

    ``num_classes``: classifier / detector classes (the family's default when None);
    ``weights``: a local checkpoint file (``.pth``/``.pt``/``.safetensors``) loaded strictly;
    ``image_size``: the input resolution the model is meant for (the variant's default when None);
    other keywords go to the family's builder (e.g. ``drop_rate``, ``drop_path_rate``,
    ``features_only`` / ``out_indices`` for EfficientNet). Nothing is downloaded.
    """
    fn = get_model_fn(name)
    if num_classes is not None:
        kw["num_classes"] = num_classes
    if image_size is not None:
        kw["image_size"] = image_size
    model = fn(**kw)
    if weights is not None:
        from .weights import load_weights

        load_weights(model, weights)
    return model
