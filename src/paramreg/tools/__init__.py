"""The tools on top: specs for checkpoints, folded copies and the plain check, the report, the
command line, shrinking, factorizing and cost."""
