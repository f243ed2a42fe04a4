"""Generation evaluation: metrics, references, generation and the evaluation run."""
