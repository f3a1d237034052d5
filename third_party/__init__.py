"""Code that reproduces third-party layouts (networks whose weights come from elsewhere); see each package's README.

weights_io.py holds what their converters share: the readers and writers of the weights files and the state-dict
checks (our own code).
"""
