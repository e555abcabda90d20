"""Language models: loading, lean GPT-2 decoding, generation, the user's text, fine-tuning, history."""
