"""The model: a frozen causal LM backbone with PROPER's population, group-expert and user adapters wrapped around
its linears, the routing they share, and the precision it runs in."""
