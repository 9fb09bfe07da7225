"""The process model: supervisor, workers, CPU and memory budgets, the loop's health."""
