"""Experiments on one set of plumbing (``common``: process pool, provenance, atomic JSON records, option
parsing): ``compare`` (the arms against vanilla SB3) and ``forgetting`` (task switching, and the replay
buffer before stationary collapses)."""
