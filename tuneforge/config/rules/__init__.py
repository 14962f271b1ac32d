"""Every recipe rule lives here."""
