"""Expand a Slurm hostlist expression, for when ``scontrol`` is not on PATH.

    $ python3 jobs/hostlist.py 'node[01-03,07],gpu-[1-2]-ib'
    node01
    node02
    node03
    node07
    gpu-1-ib
    gpu-2-ib

``jobs/lib/launch.sh`` prefers ``scontrol show hostnames`` (it knows every syntax the site's Slurm
accepts) and falls back to this file. Standard library only, so any ``python3`` runs it.

Supported syntax, as in Slurm: comma-separated names; bracket groups of comma-separated numbers and
``lo-hi`` ranges, zero-padded to the width of ``lo``; several bracket groups in one name expand to
their product (``r[1-2]n[1-2]`` -> r1n1 r1n2 r2n1 r2n2).
"""
from __future__ import annotations

import argparse
import itertools
import sys


def _split_top_level(expr: str) -> list[str]:
    """Split on commas that are outside brackets: ``a[1,2],b`` -> ``["a[1,2]", "b"]``."""
    parts, depth, start = [], 0, 0
    for i, ch in enumerate(expr):
        if ch == "[":
            depth += 1
            if depth > 1:
                raise ValueError(f"nested '[' in hostlist {expr!r}")
        elif ch == "]":
            depth -= 1
            if depth < 0:
                raise ValueError(f"unbalanced ']' in hostlist {expr!r}")
        elif ch == "," and depth == 0:
            parts.append(expr[start:i])
            start = i + 1
    if depth != 0:
        raise ValueError(f"unbalanced '[' in hostlist {expr!r}")
    parts.append(expr[start:])
    return [p.strip() for p in parts if p.strip()]


def _expand_range_set(body: str, expr: str) -> list[str]:
    """``01-03,07`` -> ``["01", "02", "03", "07"]``; the width of ``lo`` sets the zero padding."""
    values: list[str] = []
    for item in body.split(","):
        lo, sep, hi = item.strip().partition("-")
        if not lo.isdigit() or (sep and not hi.isdigit()):
            raise ValueError(f"bad range {item!r} in hostlist {expr!r}")
        if not sep:
            values.append(lo)
            continue
        if int(hi) < int(lo):
            raise ValueError(f"range {item!r} runs backwards in hostlist {expr!r}")
        values.extend(str(n).zfill(len(lo)) for n in range(int(lo), int(hi) + 1))
    return values


def _expand_name(name: str, expr: str) -> list[str]:
    """One comma-free element: literal text and bracket groups, expanded to their product."""
    pieces: list[list[str]] = []
    rest = name
    while "[" in rest:
        head, _, tail = rest.partition("[")
        body, closed, rest = tail.partition("]")
        if not closed:
            raise ValueError(f"unbalanced '[' in hostlist {expr!r}")
        pieces.append([head])
        pieces.append(_expand_range_set(body, expr))
    pieces.append([rest])
    return ["".join(combo) for combo in itertools.product(*pieces)]


def expand_hostlist(expr: str) -> list[str]:
    """Expand a Slurm hostlist expression into host names, in order.

    Args:
        expr: e.g. ``SLURM_JOB_NODELIST``'s value, ``node[01-04]``.

    Returns:
        The host names, in the order Slurm lists them (duplicates kept, as scontrol does).

    >>> expand_hostlist("node[01-03],login")
    ['node01', 'node02', 'node03', 'login']
    """
    if not expr.strip():
        raise ValueError("empty hostlist")
    return [host for name in _split_top_level(expr.strip()) for host in _expand_name(name, expr)]


def get_args_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("hostlist", help="Slurm hostlist expression, e.g. 'node[01-04]'")
    return parser


def main(argv: list[str] | None = None) -> int:
    args = get_args_parser().parse_args(argv)
    try:
        hosts = expand_hostlist(args.hostlist)
    except ValueError as err:
        print(f"hostlist.py: {err}", file=sys.stderr)
        return 2
    print("\n".join(hosts))
    return 0


if __name__ == "__main__":
    sys.exit(main())
