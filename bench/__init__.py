"""Benchmark harness for sharechat: a load generator, a bare reference server, one runner."""
