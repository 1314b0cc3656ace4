"""Files a run writes and reads back: atomic writes, safe model files, checkpoints, resume, run logs.

Nothing here unpickles: every file read back is safetensors, JSON or a checked zip, read within the
limits of :mod:`rollback_rl.persistence.limits` and never through a link out of its folder. Every
write goes to a fresh file renamed over the target, so a link planted in a run folder is replaced,
never written through.
"""
