"""The earlier ``src.preprocess_jax``: its preprocessors, which are the engine's own.

:class:`BaseJAXPreprocessor` (subclass it, implement ``_preprocess_single_jax``) and
:class:`JAXImagePreprocessor` live in :mod:`engine.preprocess`, since the worker and the query
API build them from the settings too (``preprocess.class``); this module keeps the earlier
import path.
"""

from engine.preprocess import BaseJAXPreprocessor, JAXImagePreprocessor

__all__ = ["BaseJAXPreprocessor", "JAXImagePreprocessor"]
