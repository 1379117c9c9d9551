"""Studies, sweeps and the executors that run their tasks."""
