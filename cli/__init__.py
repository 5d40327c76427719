"""The ``persona-router`` command line: one module per area of sub-commands, registered by ``main``."""
