"""Benchmarks and the differential harness: scripts run as ``python benchmarks/NAME.py``, importable from the
repository root as ``benchmarks.NAME`` (the test suite imports ``benchmarks.differential``). Not part of the wheel."""
