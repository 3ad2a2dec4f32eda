"""proper-fed: PROPER (population -> group experts -> user LoRA) personalization of causal LLMs."""

__version__ = "0.1.0"
