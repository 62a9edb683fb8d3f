"""Parameter groups: which state-dict entries a client sends and the server aggregates ("what is sent").

A group selects keys of a model's state dict. ``all`` is everything; ``backbone`` everything but the head (FASSL's
"-bb" variants: heads stay on the client); ``head`` the head alone; ``predictor`` FedU's predictor (BYOL's
``predictor`` module, else the head). A model names its head modules in the class
attribute ``head_modules`` (default ``("classifier",)``, the head of every model in :data:`MODELS`). Composite models
(FedMLAC's Plug-in, ModalityMirror's meme) register their sub-models as further groups.
"""

from __future__ import annotations

from collections.abc import Iterable

from torch import nn

from fedcore.registry import Registry


def head_prefixes(model: nn.Module) -> tuple[str, ...]:
    """State-dict key prefixes of the model's head modules (``"classifier."`` by default)."""
    modules = getattr(model, "head_modules", ("classifier",))
    return tuple(f"{name}." for name in modules)


class ParamGroup:
    """Select the state-dict keys of a group; subclasses override :meth:`includes`."""

    def includes(self, key: str, model: nn.Module) -> bool:
        """Whether entry ``key`` of ``model`` belongs to the group."""
        return True

    def keys(self, model: nn.Module, keys: Iterable[str] | None = None) -> list[str]:
        """The group's keys, in state-dict order (``keys`` defaults to ``model.state_dict()``'s).

        Raises
        ------
        ValueError
            If the group selects no key of the model.
        """
        candidates = list(model.state_dict()) if keys is None else list(keys)
        selected = [key for key in candidates if self.includes(key, model)]
        if not selected:
            raise ValueError(f"{type(self).__name__}: selects no entry of {type(model).__name__} "
                             f"(head modules {head_prefixes(model)!r}).")
        return selected


class Backbone(ParamGroup):
    """Every entry outside the head modules."""

    def includes(self, key: str, model: nn.Module) -> bool:
        """True outside the head modules."""
        return not key.startswith(head_prefixes(model))


class Head(ParamGroup):
    """The entries of the head modules."""

    def includes(self, key: str, model: nn.Module) -> bool:
        """True inside the head modules."""
        return key.startswith(head_prefixes(model))


class Predictor(ParamGroup):
    """FedU's predictor: the model's ``predictor`` module (BYOL's), or its head modules when it has none.

    A supervised model has no predictor, so its classifier head stands in for it [A: PAPERS.md §4, FedU].
    """

    def includes(self, key: str, model: nn.Module) -> bool:
        """True inside ``model.predictor`` when it is a module, else inside the head modules."""
        if isinstance(getattr(model, "predictor", None), nn.Module):
            return key.startswith("predictor.")
        return key.startswith(head_prefixes(model))


PARAM_GROUPS: Registry[ParamGroup] = Registry("param_group")
PARAM_GROUPS.register("all")(ParamGroup)
PARAM_GROUPS.register("backbone")(Backbone)
PARAM_GROUPS.register("head")(Head)
PARAM_GROUPS.register("predictor")(Predictor)

__all__ = ["PARAM_GROUPS", "Backbone", "Head", "ParamGroup", "Predictor", "head_prefixes"]
