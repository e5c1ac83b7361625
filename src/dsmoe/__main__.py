"""`python -m dsmoe ...`: the same as the `dsmoe` console script (and what torchrun runs)."""

from ._startup import command_interrupt_guard, spin_openmp_threads_for_decoding

spin_openmp_threads_for_decoding()  # before torch loads its OpenMP runtime

with command_interrupt_guard():
    from .cli import main

raise SystemExit(main())
