"""torchrun, with the stop a training run expects: `python -m asymkd.torchrun [torchrun options] -m asymkd.cli train ...`

    python -m asymkd.torchrun --standalone --nproc_per_node=2 -m asymkd.cli train --config run.yaml

The options are torchrun's own (it parses them). The difference is what happens on SIGINT/SIGTERM (Ctrl-C, a
SLURM or Kubernetes pre-emption): torchrun forwards the signal to the ranks, which stop after their step and
write a checkpoint (student_trainer/interrupt.py), and then torchrun itself dies with a 25-line traceback of
its own SignalException. Here it exits with 128 + the signal and one line instead. Everything else (exit
codes, torchrun's report of a failed rank) is torchrun's.
"""

from __future__ import annotations

import signal
import sys


def main(argv: list[str] | None = None) -> int:
    from torch.distributed.elastic.multiprocessing.api import SignalException
    from torch.distributed.run import main as torchrun

    try:
        torchrun(argv)
    except SignalException as e:
        print(f"asymkd.torchrun: stopped by {signal.Signals(e.sigval).name}", file=sys.stderr, flush=True)
        return 128 + int(e.sigval)
    return 0


if __name__ == "__main__":
    sys.exit(main())
