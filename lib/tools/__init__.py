"""Developer tools: benchmarks and the synthetic corpus maker, apart from the user's jobs.

Each starts like a job, through lib.cli.run_job (`python -m lib.tools.bench key=value ...`),
and runs the jobs it measures as their own processes (`python -m jobs.train ...`), never by
importing them. Nothing else in lib/ imports this package (tests/house/test_layout.py says so).
"""
