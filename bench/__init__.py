"""The benchmark suite: a raw-socket load generator, the servers under test, the workloads."""
