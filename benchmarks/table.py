"""Print the rows `benchmarks/_report.record` appended to FILE as one Markdown table."""

import json
import sys


def main(path: str) -> None:
    rows = [json.loads(line) for line in open(path) if line.strip()]
    print("| benchmark | figure | value | device | command |")
    print("|---|---|---|---|---|")
    for r in rows:
        value = r["value"]
        shown = (f"{value:.0f}" if abs(value) >= 100 else f"{value:.3g}") \
            if isinstance(value, float) else str(value)
        print(f"| {r['benchmark']} | {r['figure']} | {shown} {r['unit']} | {r['device']} | "
              f"`{r['command']}` |")


if __name__ == "__main__":
    main(sys.argv[1])
