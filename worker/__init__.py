"""gradhub.worker."""
