"""The engine: config -> objects (`build`), the loop (`loop`), checkpoints, logging, metrics."""
