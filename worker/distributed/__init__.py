"""Several ranks behind one worker: mx.distributed (group.py) and starting the ranks (launch.py)."""
