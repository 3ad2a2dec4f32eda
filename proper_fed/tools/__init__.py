"""Tools beside the main path: the training-step speed and memory benchmark."""
