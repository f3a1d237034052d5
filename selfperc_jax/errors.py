"""Errors that mean "the user asked for something that cannot work": main prints them without a traceback."""


class UserError(Exception):
  """A problem with the inputs (config, workdir, data, checkpoint) that the message tells how to fix."""


class ConfigError(UserError, ValueError):
  """An invalid config value."""


class CheckpointError(UserError):
  """A checkpoint that is missing, incompatible with the config, or unreadable."""


class CorruptCheckpointError(CheckpointError):
  """A checkpoint that cannot be read back as it was written (unreadable files, a checksum mismatch)."""


class EvaluationError(UserError):
  """Inputs to an evaluation that cannot work (wrong shapes, a missing or malformed statistics file)."""


class WorkdirLockedError(UserError):
  """Another live run holds the workdir."""


class NonFiniteError(UserError):
  """The loss or the gradient became NaN/inf (on_nonfinite='stop')."""


EXIT_STOPPED = 75  # the exit code of a run stopped before its end with a checkpoint (EX_TEMPFAIL): run it again


class Stopped(Exception):
  """The run stopped before its end, on purpose (SIGTERM, preemption, Ctrl-C), with a checkpoint at the step it
  reached: not finished, not failed. main exits with EXIT_STOPPED."""
