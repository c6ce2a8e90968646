"""Model surgery the family table describes, on a live Hugging Face base model: a copy that ends after its last
layer (the device's first blocks) and a view that starts at block k (the cloud's part of an --edge-layers
session). Apart from common.families so that the table itself imports no torch (entry points read it first)."""

from __future__ import annotations

import copy
from typing import Any

import torch
from torch import nn

from common.families import Family, with_layers


def drop_final(model: nn.Module, family: Family) -> None:
    """Make a base model end at its last layer's output: its final norm (and OPT's output projection) become
    the identity. For the device's own copy of the first layers (it is never shared)."""
    for path in family.final:
        parent_path, _, attr = path.rpartition(".")
        parent = model.get_submodule(parent_path) if parent_path else model
        if getattr(parent, attr, None) is not None:
            setattr(parent, attr, nn.Identity())


class _Zero(nn.Module):
    """An entry-stage addend (learned positions) that the device already added: adds nothing (x + 0 == x)."""

    def forward(self, *args: Any, **kwargs: Any) -> torch.Tensor:
        return torch.zeros(())


def start_view(model: nn.Module, family: Family, start: int) -> nn.Module:
    """The base model from decoder layer `start` on, for hidden states the device made with layers < start.

    A shallow copy that shares every parameter and layer of `model` and changes nothing in it: the copy's layer
    list is layers[start:], its config says so (`with_layers`), and its entry stage is skipped. Modules on the
    way to a replaced one are copied too (each copy with its own child table), so many views and the model
    itself can serve at once.
    """
    copies: dict[str, nn.Module] = {}  # path -> the view's copy of the module there
    num_layers = len(model.get_submodule(family.layers))  # type: ignore[arg-type]

    def own(path: str) -> nn.Module:
        """The view's private copy of the module at `path`, made (with its parents') on first use."""
        if path in copies:
            return copies[path]
        parent_path, _, attr = path.rpartition(".")
        parent = own(parent_path) if path else None
        original = model if parent is None else getattr(parent, attr)
        view = copy.copy(original)
        view.__dict__.pop("forward", None)  # an instance-level forward (accelerate's hooks) would run the original
        view._modules = dict(original._modules)  # its own child table: replacing a child leaves the original's
        if hasattr(view, "config"):
            view.config = with_layers(view.config, start, num_layers - start)
        if parent is not None:
            setattr(parent, attr, view)
        copies[path] = view
        return view

    root = own("")
    parent_path, _, attr = family.layers.rpartition(".")
    parent = own(parent_path)
    setattr(parent, attr, nn.ModuleList(list(getattr(parent, attr))[start:]))
    for path, how in family.entry:
        holder_path, _, name = path.rpartition(".")
        holder = own(holder_path)
        if getattr(holder, name, None) is not None:
            setattr(holder, name, _Zero() if how == "zero" else nn.Identity())
    return root
