"""Errors the user can cause (bad input, missing or corrupted experts): the CLI prints them as one line,
the server as an OpenAI-style error body."""
from __future__ import annotations

from coeserve.formats.checkpoint import ImportError_
from coeserve.formats.image import ImageError
from coeserve.store.disk import ExpertNotFound

USER_ERRORS = (ImportError_, ImageError, ExpertNotFound, ValueError, RuntimeError, FileNotFoundError)
