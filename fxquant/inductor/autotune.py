"""What fxquant's lowerings share: Inductor's `autotune_select_algorithm` on every torch they run on, and
sizes read as static or not."""

from __future__ import annotations

from torch._inductor.select_algorithm import autotune_select_algorithm


def select_node(name: str, choices: list, inputs: list, layout, **kwargs):
    """The IR node of the chosen kernel: torch 2.11 returns the node, torch >= 2.13 (node, choice)."""
    selected = autotune_select_algorithm(name, choices, inputs, layout, **kwargs)
    return selected[0] if isinstance(selected, tuple) else selected


def static_size(expr) -> int | None:
    """A size of an IR node as an int, or None where it is symbolic (known at run time only)."""
    try:
        return int(expr)
    except TypeError:
        return None
