"""The one-shot pipeline (``pipelines/full_run.sh``): its config, its stages, the driver and the demo report.
Nothing in the project imports this package; it runs the project's commands."""
