"""Analysis tools that rebuild a run through the engine's builders and look at it."""
