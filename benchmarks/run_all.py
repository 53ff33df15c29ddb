"""Run every benchmark, each in its own process, then print one summary table.

Usage::

    .venv/bin/python benchmarks/run_all.py            # about 2-3 minutes on 2 cores
    .venv/bin/python benchmarks/run_all.py --quick    # a smoke run with fewer iterations
    .venv/bin/python benchmarks/run_all.py --only lock,warm_cache --json results.json
    .venv/bin/python benchmarks/run_all.py --markdown summary.md   # the tables for the docs

Figures are reported, never asserted: the exit status is non-zero only if a benchmark crashed.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from _common import Row, fmt_ns, library_line, machine_line, render_markdown, render_table

HERE = Path(__file__).resolve().parent
BENCHMARKS = ("warm_cache", "first_call", "lock", "at_head")


def main() -> int:
    """Run the selected benchmarks; print their output as it comes, then the summary."""
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--quick", action="store_true", help="fewer iterations (smoke run)")
    parser.add_argument(
        "--only", help=f"comma-separated subset of: {', '.join(BENCHMARKS)}", default=""
    )
    parser.add_argument("--json", metavar="PATH", help="write every row to PATH as JSON")
    parser.add_argument(
        "--markdown", metavar="PATH", help="write the summary to PATH as a Markdown table"
    )
    args = parser.parse_args()
    chosen = [b.strip() for b in args.only.split(",") if b.strip()] or list(BENCHMARKS)
    unknown = set(chosen) - set(BENCHMARKS)
    if unknown:
        parser.error(f"unknown benchmark(s): {', '.join(sorted(unknown))}")

    started = time.perf_counter_ns()
    rows: list[Row] = []
    results: dict[str, object] = {}
    failed: list[str] = []
    with tempfile.TemporaryDirectory() as tmp:
        for name in chosen:
            out = Path(tmp) / f"{name}.json"
            cmd = [sys.executable, str(HERE / f"bench_{name}.py"), "--json", str(out)]
            if args.quick:
                cmd.append("--quick")
            t0 = time.perf_counter_ns()
            code = subprocess.call(cmd, cwd=HERE.parent)
            took = time.perf_counter_ns() - t0
            print(f"(bench_{name}.py took {fmt_ns(took)}, exit status {code})", flush=True)
            if code != 0 or not out.exists():
                failed.append(name)
                continue
            data = json.loads(out.read_text())
            results[name] = data
            rows += [Row.from_dict(r) for r in data["rows"]]
    total = time.perf_counter_ns() - started

    print()
    print("=" * 100)
    print(f"SUMMARY ({', '.join(chosen)}; total {fmt_ns(total)})")
    print(machine_line())
    print(library_line())
    print("ratio = ours median / baseline median. PASS/FAIL compares ours median with the target.")
    print()
    print(render_table(rows))
    verdicts = [r.verdict for r in rows if r.verdict != "-"]
    print()
    print(
        f"{verdicts.count('PASS')} row(s) within target, {verdicts.count('FAIL')} over target "
        "(reported, not asserted)."
    )
    if failed:
        print(f"CRASHED: {', '.join(failed)} (see their output above)")
    if args.markdown:
        Path(args.markdown).write_text(
            f"{machine_line()}\n{library_line()}\n\n{render_markdown(rows)}\n"
        )
    if args.json:
        Path(args.json).write_text(
            json.dumps({"total_ns": total, "machine": machine_line(), "results": results}, indent=1)
        )
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
