"""Helpers shared by the scripts the integration tests launch (imported from their own folder)."""

from __future__ import annotations


def count_allreduce_calls(engine) -> dict[str, int]:
    """Wrap ``engine.allreduce_gradients`` so that ``calls["allreduce"]`` counts the engine's own all-reduces."""
    calls = {"allreduce": 0}
    original = engine.allreduce_gradients

    def counting_allreduce(*args, **kwargs):
        calls["allreduce"] += 1
        return original(*args, **kwargs)

    engine.allreduce_gradients = counting_allreduce
    return calls
