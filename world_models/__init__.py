"""World-model agents: Dreamer V1, V2 and V3 (``python -m world_models.dreamer --version K``)."""
