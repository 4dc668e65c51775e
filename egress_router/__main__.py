"""`python -m egress_router` runs the CLI."""

from .cli import main

main()
