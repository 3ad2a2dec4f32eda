"""Training and running a PROPER model on examples: batching, the one optimisation loop, the three stages,
data-parallel ranks, generation and ranking, and what a device does to personalize."""
