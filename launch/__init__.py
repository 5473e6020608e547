"""Cluster job submission (Ray Jobs API) and runtime environment for dist-prune."""
