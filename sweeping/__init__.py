"""sweep.py's hyper-parameter search, by concern: config, study, trials, report, cli.

sweeping/, not sweeps/: that folder holds the search files (sweeps/<name>.yaml).
"""
