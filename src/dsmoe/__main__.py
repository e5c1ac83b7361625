"""`python -m dsmoe ...`: the same as the `dsmoe` console script (and what torchrun runs)."""

from .cli import main

raise SystemExit(main())
