"""Two checkouts of the server, measured in turns: the before/after of a change on a noisy machine.

    python bench/ab.py /path/to/before-checkout . --rounds 5 --streams 1,8

Starts `main.py` of each checkout as `bench/run.py` starts the server (tiny checkpoint,
PRELOAD_MODEL=1, extra settings from the environment), warms both up, then for each round
measures every stream count on one and then the other (the order alternates per round),
so both see the same minutes of the machine. Prints each side's median aggregate tokens/s
per stream count, and every round's figure.
"""

from __future__ import annotations

import argparse
import asyncio
import statistics
import sys
from pathlib import Path

BENCH = Path(__file__).resolve().parent
sys.path.insert(0, str(BENCH))

from run import Server, build_model, concurrent  # noqa: E402


def server(checkout: Path, model: str) -> Server:
    ours = Server.ours(model)
    ours.cmd = [sys.executable, str(checkout.resolve() / "main.py")]
    return ours


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("before", type=Path)
    parser.add_argument("after", type=Path)
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--streams", default="1,8", help="comma list of concurrent stream counts")
    parser.add_argument("--tokens", type=int, default=256)
    args = parser.parse_args()
    counts = [int(n) for n in args.streams.split(",")]
    model = build_model()
    figures: dict[str, dict[int, list[float]]] = {"before": {}, "after": {}}
    with server(args.before, model) as before, server(args.after, model) as after:
        sides = [("before", before), ("after", after)]
        for _, side in sides:
            asyncio.run(concurrent(side, max(counts), 32))
        for round_ in range(args.rounds):
            for name, side in sides if round_ % 2 == 0 else sides[::-1]:
                for n in counts:
                    figures[name].setdefault(n, []).append(
                        asyncio.run(concurrent(side, n, args.tokens))["aggregate_tokens_per_s"])
    for name, by_count in figures.items():
        medians = {n: round(statistics.median(v)) for n, v in by_count.items()}
        print(name, "median tok/s by streams:", medians, "rounds:", {n: [round(x) for x in v] for n, v in by_count.items()})


if __name__ == "__main__":
    main()
