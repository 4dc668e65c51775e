"""`python -m egress_router` runs the CLI."""

from .entry import main

main()
