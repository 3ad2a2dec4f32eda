"""The unit every training stage consumes: one user's prompt and the target the model should produce."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class Example:
    """A training or evaluation example.

    user_id: who wrote it; the group stage routes by it, the population stage ignores it.
    prompt: the model input (the task prompt already filled in; the chat template is applied by the backbone).
    target: the text the model should generate; only its tokens count in the loss.
    """

    user_id: str
    prompt: str
    target: str
