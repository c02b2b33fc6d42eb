"""Our batched inference engine: sequences, the slot KV cache, sampling, one forward step, the step loop."""
