"""Benchmark suites; each module has ``main(argv)``."""
