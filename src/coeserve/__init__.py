"""coeserve: a Composition-of-Experts LLM server (router, three-tier expert store, batched engine)."""
__version__ = "0.1.0"
