"""Model builders: functions that return an nn.Module. No config objects, no I/O beyond weight files."""
