"""``hvd-megdet-prep <command> ...`` (also ``python -m data_prep <command> ...``).

Commands:
    coco_to_hdf5   pack a COCO detection split into HDF5 shards (runs under mpirun too)
    verify         check the shards of a packed split against its manifest
    synthetic      write a small synthetic COCO-format dataset (demos and tests)

``hvd-megdet-prep <command> --help`` shows each command's options.
"""
from __future__ import annotations

import sys
from typing import Callable, Sequence

from data_prep import coco_to_hdf5, synthetic, verify

COMMANDS: dict[str, Callable[[Sequence[str] | None], int]] = {
    "coco_to_hdf5": coco_to_hdf5.main,
    "verify": verify.main,
    "synthetic": synthetic.main,
}


def main(argv: Sequence[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0] in ("-h", "--help"):
        print(__doc__)
        return 0 if argv else 2
    command = argv[0].replace("-", "_")
    if command not in COMMANDS:
        print(f"unknown command {argv[0]!r}; choose one of {', '.join(COMMANDS)}", file=sys.stderr)
        return 2
    return COMMANDS[command](argv[1:])


if __name__ == "__main__":
    sys.exit(main())
