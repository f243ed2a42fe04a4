"""From dataset_info.json names to model-ready batches."""
