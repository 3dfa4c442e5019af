"""A startup hook for CLI runs that simulates preemption (see sitecustomize.py); never shipped."""
