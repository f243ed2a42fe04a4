"""Model and tokenizer loading, and the offline tiny model."""
