"""Image classification by transfer: preprocessing, the network, strategies, the feature cache, fine-tuning, inference, export, explanations."""
