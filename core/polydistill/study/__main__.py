"""The entry point of a run in its own process: ``python -m polydistill.study SPEC``."""

import sys

from polydistill.study.run import _worker_main

if __name__ == "__main__":
    sys.exit(_worker_main(sys.argv[1]))
