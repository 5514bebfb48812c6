"""Settings for the whole test session.

XLA's LLVM backend at optimisation level 0: the suite compiles hundreds of
small programs and runs each for a few steps, so compilation dominates its
time, and level 0 roughly halves it (measured: the main study's --quick form
takes 29 s instead of 67 s). Every comparison a test makes runs under the same
flags (subprocesses inherit them), and the benchmarks, studies and commands run
outside the tests at the default level.
"""

import os

os.environ["XLA_FLAGS"] = " ".join(
    [os.environ.get("XLA_FLAGS", ""), "--xla_backend_optimization_level=0"]).strip()
