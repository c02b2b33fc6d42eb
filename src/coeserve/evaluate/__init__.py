"""CoE evaluation: run experts on each category's held-out items and score them (automatic scorers,
a sandbox for generated code, an LLM judge), giving the expert × category matrix the mapping optimises."""
