"""Code that reproduces third-party layouts (networks whose weights come from elsewhere); see each package's README."""
