#!/usr/bin/env python3
"""Container entrypoint: hands over to the egress-router CLI (the `egress-router` console script)."""
from egress_router.entry import main

if __name__ == "__main__":
    main()
