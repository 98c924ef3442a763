"""Inductor's `autotune_select_algorithm` for fxquant's lowerings, on every torch they run on."""

from __future__ import annotations

from torch._inductor.select_algorithm import autotune_select_algorithm


def select_node(name: str, choices: list, inputs: list, layout, **kwargs):
    """The IR node of the chosen kernel: torch 2.11 returns the node, torch >= 2.13 (node, choice)."""
    selected = autotune_select_algorithm(name, choices, inputs, layout, **kwargs)
    return selected[0] if isinstance(selected, tuple) else selected
