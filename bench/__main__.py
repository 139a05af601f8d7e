"""`python -m bench [NAME ...]`: run the benchmarks (every bench/bench_*.py, or the ones named).

`python -m bench NAME --flag ...` passes the flags to that one benchmark (e.g. `python -m bench scale --json`)."""

from __future__ import annotations

import argparse
import importlib
import pkgutil
import sys
from pathlib import Path


def available() -> list[str]:
    modules = pkgutil.iter_modules([str(Path(__file__).parent)])
    return sorted(m.name.removeprefix("bench_") for m in modules if m.name.startswith("bench_"))


def main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench", description=__doc__)
    parser.add_argument("names", nargs="*", help=f"benchmarks to run (default all): {', '.join(available())}")
    args, flags = parser.parse_known_args(argv)
    if flags and len(args.names) != 1:
        parser.error(f"flags {' '.join(flags)} go to one named benchmark (python -m bench NAME {' '.join(flags)})")
    for name in args.names or available():
        if not flags:
            print(f"\n=== bench {name} ===", flush=True)
        module = importlib.import_module(f"bench.bench_{name}")
        module.main(flags) if flags else module.main()
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
