"""What reproduce.py builds on: the paper's table and the summary (paper), what a run folder holds (folders),
and the submitit job that trains runs with the executors that run it (engine)."""
