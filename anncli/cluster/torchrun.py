"""`python -m anncli.cluster.torchrun ARGS`: torchrun itself (torch.distributed.run's `main`, same arguments),
ending in an exit code instead of a Python traceback.

torchrun ends a preempted run (SIGTERM/SIGUSR1 handed to its workers, which save and exit) by raising
SignalException, and a failed worker by raising ChildFailedError; both reach the interpreter as 20- to
40-line tracebacks, although the workers already said what happened in one line and `ann`'s supervisor
turns the exit into its own one-line message and exit code. Here a failure is one line naming the rank
that failed first and its host, and the exit code is that rank's.
"""

from __future__ import annotations

import socket
import sys


def main(argv: list[str] | None = None) -> int:
    from torch.distributed.elastic.multiprocessing.api import SignalException
    from torch.distributed.elastic.multiprocessing.errors import ChildFailedError
    from torch.distributed.run import main as torchrun

    try:
        torchrun(argv)
    except SignalException as e:
        return 128 + int(e.sigval)  # the supervisor maps a preemption signal to EXIT_PREEMPTED
    except ChildFailedError as e:
        rank, failure = e.get_first_failure()
        print(f"ann: rank {rank} (local rank {failure.local_rank}, pid {failure.pid}) on {socket.gethostname()} "
              f"failed first, exit code {failure.exitcode}", file=sys.stderr, flush=True)
        return failure.exitcode if failure.exitcode > 0 else 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
