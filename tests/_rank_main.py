"""Entry point of one rank started by tests.mpirun.run_ranks (python -m tests._rank_main PAYLOAD OUTDIR)."""
import importlib
import os
import pickle
import sys
import traceback
from pathlib import Path


def _wait_for_all_ranks() -> None:
    """Exit together: Horovod shuts down for everyone when one rank exits, which would break ranks
    still working in another process set."""
    if "mpi4py.MPI" in sys.modules:
        from mpi4py import MPI

        if MPI.Is_initialized() and not MPI.Is_finalized():
            MPI.COMM_WORLD.Barrier()


def main() -> int:
    payload, out = Path(sys.argv[1]), Path(sys.argv[2])
    rank = int(os.environ.get("OMPI_COMM_WORLD_RANK", os.environ.get("PMI_RANK", "0")))
    try:
        target, args, kwargs = pickle.loads(payload.read_bytes())
        module_name, func_name = target.split(":")
        func = getattr(importlib.import_module(module_name), func_name)
        result = func(*args, **kwargs)
        tmp = out / f"rank{rank}.pkl.tmp"
        tmp.write_bytes(pickle.dumps(result))
        tmp.rename(out / f"rank{rank}.pkl")
        _wait_for_all_ranks()
        return 0
    except BaseException:  # noqa: BLE001 - every failure must reach the test report
        (out / f"rank{rank}.err").write_text(traceback.format_exc())
        sys.stderr.flush()
        # The other ranks may be blocked in a collective with this one: end the job now.
        from mpi4py import MPI

        MPI.COMM_WORLD.Abort(1)
        return 1


if __name__ == "__main__":
    sys.exit(main())
