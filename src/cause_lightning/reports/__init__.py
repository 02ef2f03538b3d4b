"""What runs report: the evaluation's metrics.json and tables, plots, W&B tracking and sweep
summaries."""
