"""Model families: only what differs between them, as data."""
