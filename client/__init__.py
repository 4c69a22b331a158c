"""gradhub.client."""
