"""Merge methods, one per module, registered by name.

A recipe names its method by string (``method: ties``); ``get_method(name)`` returns it and an
unknown name raises ``UnknownNameError`` listing the known ones. Built-in methods:

=================  =====  ==========================================================
name               base   what it does (see each module's docstring for the choices)
=================  =====  ==========================================================
linear             no     weighted average of the models
task_arithmetic    yes    base + lambda * sum w_i tau_i (Ilharco et al. 2023)
slerp              no     spherical interpolation between two models
ties               yes    trim, elect sign, disjoint mean (Yadav et al. 2023)
dare_linear        yes    random drop + 1/(1-p) rescale, then task arithmetic (Yu et al. 2024)
dare_ties          yes    random drop + rescale, then TIES election and disjoint mean
breadcrumbs        yes    drop largest and smallest magnitudes (Davari & Belilovsky 2023)
=================  =====  ==========================================================

Add a method by subclassing ``MergeMethod`` in a new module and decorating it with
``@register``; import that module here.

Example:
    >>> import torch
    >>> from evolution.merge_methods import MergeParams, get_method
    >>> ties = get_method("ties")
    >>> ties.merge_tensor("w", torch.zeros(2), [torch.ones(2)], MergeParams.uniform(1))
    tensor([1., 1.])
"""

from evolution.merge_methods._base import MergeMethod, MergeParams, OptionValue
from evolution.merge_methods.registry import get_method, known_methods, register

# Importing a method module registers it (keep this list in step with the table above).
from evolution.merge_methods import (  # noqa: F401  (isort: skip)
    breadcrumbs,
    dare_linear,
    dare_ties,
    linear,
    slerp,
    task_arithmetic,
    ties,
)

__all__ = ["MergeMethod", "MergeParams", "OptionValue", "get_method", "known_methods", "register"]
