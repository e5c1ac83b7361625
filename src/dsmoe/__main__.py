"""`python -m dsmoe ...`: the same as the `dsmoe` console script (and what torchrun runs)."""

from ._startup import command_interrupt_guard

with command_interrupt_guard():
    from .cli import main

raise SystemExit(main())
