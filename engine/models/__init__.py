"""Which models exist and where their weights come from: the backbone registry, weight sources (offline first), the model manager."""
