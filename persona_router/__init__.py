"""persona-router: answer questions in the style of the asker's persona.

One distribution, one import name. The repository keeps one folder per area (``core/``, ``adapters/``,
``router/``, ``training/``, ``eval/``, ``service/``, ``cli/``); setuptools installs each as a subpackage of
``persona_router`` (``package-dir`` in pyproject.toml). Imports point one way only:
core <- adapters <- router, training <- eval <- service <- cli (checked by ``tests/unit/test_layers.py``).
"""

__version__ = "0.1.0"
