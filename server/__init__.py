"""gradhub.server."""
