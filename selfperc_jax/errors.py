"""Errors that mean "the user asked for something that cannot work": main prints them without a traceback."""


class UserError(Exception):
  """A problem with the inputs (config, workdir, data, checkpoint) that the message tells how to fix."""


class ConfigError(UserError, ValueError):
  """An invalid config value."""


class CheckpointError(UserError):
  """A checkpoint that is missing, incompatible with the config, or unreadable."""
