"""The two-step router: an embedder and a trained classifier put a prompt in a category (or, when unsure,
in the fallback category), and a table maps the category to an expert chosen under a parameter budget."""
