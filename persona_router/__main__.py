"""``python -m persona_router`` runs the ``persona-router`` command line."""

from persona_router.cli.main import main

if __name__ == "__main__":
    raise SystemExit(main())
