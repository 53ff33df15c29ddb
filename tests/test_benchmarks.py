"""Every benchmark script still runs: a --quick smoke run of each (figures are never asserted
here; benchmarks/ prints them and docs/performance.md records them). A script that no longer
matches the library (a renamed private constant, a changed statement) fails here, not on the
day someone wants the figures. The plot script draws from the quick runs' figures."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
from support import REPO, worker_env

# the first test's set-up runs every script (about 1.5 min on 2 busy cores)
pytestmark = pytest.mark.timeout(900)

BENCHMARKS = sorted(p.name for p in (REPO / "benchmarks").glob("bench_*.py"))


def _run(argv: list[str], timeout: float = 600) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, *argv],
        capture_output=True,
        text=True,
        cwd=REPO,
        env=worker_env(),
        timeout=timeout,
        check=False,
    )


@pytest.fixture(scope="module")
def quick_runs(tmp_path_factory: pytest.TempPathFactory) -> dict[str, tuple[Path, str, int]]:
    """Each script run once with --quick: (its JSON figures, its output, its exit status)."""
    out = tmp_path_factory.mktemp("figures")
    runs = {}
    for script in BENCHMARKS:
        figures = out / f"{script}.json"
        done = _run([str(REPO / "benchmarks" / script), "--quick", "--json", str(figures)])
        runs[script] = (figures, done.stdout[-2000:] + done.stderr[-4000:], done.returncode)
    return runs


@pytest.mark.parametrize("script", BENCHMARKS)
def test_each_benchmark_runs_quick_and_writes_its_figures(
    script: str, quick_runs: dict[str, tuple[Path, str, int]]
) -> None:
    figures, output, code = quick_runs[script]
    assert code == 0, output
    assert json.loads(figures.read_text()), "no figures written"


def test_plot_draws_the_curves_from_the_figures(
    tmp_path: Path, quick_runs: dict[str, tuple[Path, str, int]]
) -> None:
    """benchmarks/plot.py turns the cold-start and stampede figures into the PNGs of
    docs/performance.md."""
    cold = str(quick_runs["bench_cold_start.py"][0])
    fleet = str(quick_runs["bench_stampede.py"][0])
    out = tmp_path / "img"
    plot = str(REPO / "benchmarks" / "plot.py")
    done = _run([plot, "--cold", cold, "--stampede", fleet, "--out", str(out)], timeout=120)
    assert done.returncode == 0, done.stderr
    for name in ("cold_start.png", "stampede.png"):
        assert (out / name).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_run_all_summarises(tmp_path: Path) -> None:
    summary = tmp_path / "summary.md"
    runner = str(REPO / "benchmarks" / "run_all.py")
    done = _run([runner, "--quick", "--only", "warm_cache", "--markdown", str(summary)], 300)
    assert done.returncode == 0, done.stderr[-4000:]
    assert "|" in summary.read_text()
